"""The tune stage: each tuned cell's hyperparameters, chosen on validation accuracy.

For every (dataset, arch, optimizer) with a `grid` (`pipeline.config.tuned_cells`), one run
per grid point (`pipeline.grid.tuning_specs`): trained on the training split minus
`tune.validation_size` held-out images, for `tune.budget` of the iterations (StepLR
milestones scaled alike), with seed `tune.seed`, never evaluating the test set. The point
with the best final validation accuracy wins; ties go to the smaller values (lr first, then
the grid's other keys in order); a diverged point is never chosen. A cell whose every point
diverged gets no final runs, and the tables say so.

Outputs (the stage's DVC outs, under results/tuning/):
- `selected.yaml`: dataset -> arch -> optimizer -> the chosen values (null where every point
  diverged); the train stage reads it;
- `tuning.csv` and `tuning.md`: every point's validation accuracy, whether it diverged, and
  which one was chosen (Table 1's caption and the figures cite it).
"""

import csv
import io
import math
import sys
from pathlib import Path

import yaml

from vsgd.files import atomic_write

from .config import add_params_arguments, load_params, resolve_run, tuned_cells
from .grid import expand, tuning_specs

TUNING_DIR = Path("results/tuning")
SELECTED = TUNING_DIR / "selected.yaml"
POINTS = TUNING_DIR / "tuning.csv"
# tuning.csv: the cell, then one column per tuned hyperparameter, then the point's outcome.
CELL_COLUMNS = ("dataset", "arch", "optimizer")
POINT_COLUMNS = ("val_acc", "diverged", "chosen", "iterations", "run", "run_hash")


def add_arguments(parser):
    add_params_arguments(parser)


def run(args) -> int:
    """Train every grid point of the tuned cells, pick each cell's values on validation."""
    from .execute import check_prepared, run_stage
    params = load_params(args.params, args.set)
    check_prepared(params, "tune")
    specs = tuning_specs(params)
    report = run_stage(params, specs, "tune")
    if report.failed:
        print("tune: selection not written: every grid point must finish (or diverge) "
              "before a cell's values are chosen", file=sys.stderr)
        return 1
    rows = points(params, specs)
    selection = select(rows)
    write_outputs(params, rows, selection)
    for cell, values in sorted(selection.items()):
        shown = "every point diverged" if values is None else _values_text(values)
        print(f"tune: {'/'.join(cell)}: {shown}")
    return 0


def points(params: dict, specs: list[dict]) -> list[dict]:
    """One row per grid point: its cell, values, final validation accuracy, divergence."""
    from .results import read_metrics
    rows = []
    for spec in specs:
        metrics = read_metrics(spec["output_dir"]) or {}
        grid = resolve_run(params, spec["dataset"], spec["arch_key"],
                           spec["optimizer"]["name"])["optimizer"]["grid"]
        rows.append({
            "cell": (spec["dataset"], spec["arch_key"], spec["optimizer"]["name"]),
            "values": {key: spec["optimizer"][key] for key in grid},
            "val_acc": metrics.get("val_acc"),
            "diverged": bool(metrics.get("diverged")),
            "run": spec["name"], "run_hash": spec["run_hash"],
            "iterations": spec["schedule"]["iterations"],
        })
    return rows


def select(rows: list[dict]) -> dict:
    """cell -> the values of its best point (validation accuracy; ties: smaller values,
    lr first); None where no point has a finite validation accuracy."""
    by_cell: dict = {}
    for row in rows:
        by_cell.setdefault(row["cell"], []).append(row)
    chosen = {}
    for cell, cell_rows in by_cell.items():
        finished = [r for r in cell_rows if not r["diverged"] and r["val_acc"] is not None
                    and math.isfinite(r["val_acc"])]
        if not finished:
            chosen[cell] = None
            continue
        best = max(r["val_acc"] for r in finished)
        ties = [r for r in finished if r["val_acc"] == best]
        chosen[cell] = min(ties, key=lambda r: _order(r["values"]))["values"]
    return chosen


def _order(values: dict) -> tuple:
    """Smaller first, lr before the other keys (then the grid's order)."""
    keys = sorted(values, key=lambda k: (k != "lr",))
    return tuple(tuple(values[k]) if isinstance(values[k], list) else values[k] for k in keys)


def planned_runs(params: dict) -> tuple[list[dict], list[dict]]:
    """(the tune stage's runs, the grid's final runs); raises ConfigError while a tuned
    cell has no selection yet (the final runs are not known before the tune stage)."""
    return tuning_specs(params), expand(params, load_selection(params))


def load_selection(params: dict, path: Path = SELECTED) -> dict:
    """(dataset, arch, optimizer) -> chosen values (None: every point diverged), for the
    tuned cells of `params` whose choice in `path` was made on the current grid and tuning
    settings; {} when the file does not exist yet.

    A choice counts only if the tune stage made it among exactly the runs the current params
    give the cell: the run hashes recorded in tuning.csv beside `path` are those of
    `grid.tuning_specs` (they hold every grid point, the budget, the held-out split, the
    seed, the data and the code). A cell whose grid or tuning settings changed since is left
    out: it must be tuned again, and the train stage refuses until it is (`grid.expand`)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        tuned_on = _tuned_runs(Path(path).with_name(POINTS.name))
    except FileNotFoundError:
        return {}
    current: dict = {}
    for spec in tuning_specs(params):
        cell = (spec["dataset"], spec["arch_key"], spec["optimizer"]["name"])
        current.setdefault(cell, set()).add(spec["run_hash"])
    out = {}
    for cell in tuned_cells(params):
        ds, arch, opt = cell
        entry = (data.get(ds) or {}).get(arch, {}).get(opt, "absent") \
            if isinstance(data, dict) else "absent"
        if entry == "absent" or tuned_on.get(cell) != current.get(cell):
            continue
        grid = resolve_run(params, *cell)["optimizer"]["grid"]
        if entry is None:
            out[cell] = None
        elif isinstance(entry, dict) and set(entry) == set(grid) and all(
                any(_same(value, g) for g in grid[key]) for key, value in entry.items()):
            out[cell] = entry
    return out


def _tuned_runs(points_csv: Path) -> dict:
    """cell -> the run hashes of the points the tune stage chose among (tuning.csv); a file
    written before it recorded them gives none, so its choices count as not current."""
    with points_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict = {}
    for row in rows:
        if row.get("run_hash"):
            cell = tuple(row.get(key) for key in CELL_COLUMNS)
            out.setdefault(cell, set()).add(row["run_hash"])
    return out


def _same(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            float(x) == float(y) for x, y in zip(a, b))
    return float(a) == float(b)


def write_outputs(params: dict, rows: list[dict], selection: dict) -> None:
    TUNING_DIR.mkdir(parents=True, exist_ok=True)
    tree: dict = {}
    for (ds, arch, opt), values in sorted(selection.items()):
        tree.setdefault(ds, {}).setdefault(arch, {})[opt] = values
    header = ("# Hyperparameters chosen by the tune stage on validation accuracy "
              f"(tune.budget {params['tune']['budget']}, {params['tune']['validation_size']} "
              "held-out images); every point: tuning.csv\n")
    keys = sorted({k for r in rows for k in r["values"]}, key=lambda k: (k != "lr", k))
    points = io.StringIO()
    writer = csv.DictWriter(points, fieldnames=[*CELL_COLUMNS, *keys, *POINT_COLUMNS],
                            restval="")
    writer.writeheader()
    for r in rows:
        writer.writerow({"dataset": r["cell"][0], "arch": r["cell"][1],
                         "optimizer": r["cell"][2],
                         **{k: _csv_value(v) for k, v in r["values"].items()},
                         "val_acc": r["val_acc"], "diverged": r["diverged"],
                         "chosen": selection.get(r["cell"]) == r["values"],
                         "iterations": r["iterations"], "run": r["run"],
                         "run_hash": r["run_hash"]})
    # The points first: a choice is current only with them (`load_selection`), so a stage
    # stopped between the two writes leaves a choice that reads as stale, never one that
    # reads as made on points it was not made on.
    atomic_write(POINTS, points.getvalue())
    atomic_write(SELECTED, header + yaml.safe_dump(tree, sort_keys=True))
    md = ["# Tuning: validation accuracy of every grid point", "",
          f"Each point trained {params['tune']['budget']:g} of the iterations on the training "
          f"split minus {params['tune']['validation_size']} held-out validation images "
          f"(seed {params['tune']['seed']}); the test set was not evaluated. Chosen: the best "
          "validation accuracy (ties: the smaller values); a diverged point is never chosen.",
          "", "| dataset | arch | optimizer | values | val acc | |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = ("chosen" if selection.get(r["cell"]) == r["values"] else
                "diverged" if r["diverged"] else "")
        acc = "–" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        md.append(f"| {r['cell'][0]} | {r['cell'][1]} | {r['cell'][2]} | "
                  f"{_values_text(r['values'])} | {acc} | {mark} |")
    atomic_write(TUNING_DIR / "tuning.md", "\n".join(md) + "\n")


def _csv_value(value):
    return "[" + ", ".join(f"{v:g}" for v in value) + "]" if isinstance(value, list) \
        else f"{value:g}"


def _values_text(values: dict) -> str:
    return ", ".join(f"{k} {_csv_value(v)}" for k, v in values.items())
