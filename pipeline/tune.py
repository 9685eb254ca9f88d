"""The tune stage: each tuned cell's hyperparameters, chosen on validation accuracy.

For every (dataset, arch, optimizer) with a `grid` (`pipeline.cells.tuned_cells`), one run
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

import yaml

from vsgd.files import atomic_write

from .cells import resolve_run
from .config import add_params_arguments, load_params
from .execute import check_prepared, run_stage
from .plan import (
    CELL_COLUMNS,
    LEAVE_OUT,
    POINT_COLUMNS,
    POINTS,
    SELECTED,
    TUNING_DIR,
    plan,
    selection_digest,
)
from .results import read_metrics


def add_arguments(parser):
    add_params_arguments(parser)


def run(args) -> int:
    """Train every grid point of the tuned cells, pick each cell's values on validation."""
    params = load_params(args.params, args.set)
    check_prepared(params, "tune")
    specs = plan(params, LEAVE_OUT).tuning
    report = run_stage(params, specs, "tune")
    if report.failed:
        print(
            "tune: selection not written: every grid point must finish (or diverge) "
            "before a cell's values are chosen",
            file=sys.stderr,
        )
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
    rows = []
    for spec in specs:
        metrics = read_metrics(spec["output_dir"]) or {}
        grid = resolve_run(params, spec["dataset"], spec["arch_key"], spec["optimizer"]["name"])[
            "optimizer"
        ]["grid"]
        rows.append(
            {
                "cell": (spec["dataset"], spec["arch_key"], spec["optimizer"]["name"]),
                "values": {key: spec["optimizer"][key] for key in grid},
                "val_acc": metrics.get("val_acc"),
                "diverged": bool(metrics.get("diverged")),
                "run": spec["name"],
                "run_hash": spec["run_hash"],
                "iterations": spec["schedule"]["iterations"],
            }
        )
    return rows


def select(rows: list[dict]) -> dict:
    """cell -> the values of its best point (validation accuracy; ties: smaller values,
    lr first); None where no point has a finite validation accuracy."""
    by_cell: dict = {}
    for row in rows:
        by_cell.setdefault(row["cell"], []).append(row)
    chosen = {}
    for cell, cell_rows in by_cell.items():
        finished = [
            r
            for r in cell_rows
            if not r["diverged"] and r["val_acc"] is not None and math.isfinite(r["val_acc"])
        ]
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


def write_outputs(params: dict, rows: list[dict], selection: dict) -> None:
    TUNING_DIR.mkdir(parents=True, exist_ok=True)
    tree: dict = {}
    for (ds, arch, opt), values in sorted(selection.items()):
        tree.setdefault(ds, {}).setdefault(arch, {})[opt] = values
    header = (
        "# Hyperparameters chosen by the tune stage on validation accuracy "
        f"(tune.budget {params['tune']['budget']}, {params['tune']['validation_size']} "
        "held-out images); every point: tuning.csv\n"
    )
    keys = sorted({k for r in rows for k in r["values"]}, key=lambda k: (k != "lr", k))
    points = io.StringIO()
    writer = csv.DictWriter(points, fieldnames=[*CELL_COLUMNS, *keys, *POINT_COLUMNS], restval="")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                "dataset": r["cell"][0],
                "arch": r["cell"][1],
                "optimizer": r["cell"][2],
                **{k: _csv_value(v) for k, v in r["values"].items()},
                "val_acc": r["val_acc"],
                "diverged": r["diverged"],
                "chosen": selection.get(r["cell"]) == r["values"],
                "iterations": r["iterations"],
                "run": r["run"],
                "run_hash": r["run_hash"],
            }
        )
    # The points first: a choice is current only with them (`load_selection`), so a stage
    # stopped between the two writes leaves a choice that reads as stale, never one that
    # reads as made on points it was not made on.
    atomic_write(POINTS, points.getvalue())
    digest = selection_digest(tree, points.getvalue())
    header += f"# sha256: {digest} (of these choices and tuning.csv: checked when read)\n"
    atomic_write(SELECTED, header + yaml.safe_dump(tree, sort_keys=True))
    md = [
        "# Tuning: validation accuracy of every grid point",
        "",
        f"Each point trained {params['tune']['budget']:g} of the iterations on the training "
        f"split minus {params['tune']['validation_size']} held-out validation images "
        f"(seed {params['tune']['seed']}); the test set was not evaluated. Chosen: the best "
        "validation accuracy (ties: the smaller values); a diverged point is never chosen.",
        "",
        "| dataset | arch | optimizer | values | val acc | |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = (
            "chosen"
            if selection.get(r["cell"]) == r["values"]
            else "diverged"
            if r["diverged"]
            else ""
        )
        acc = "–" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        md.append(
            f"| {r['cell'][0]} | {r['cell'][1]} | {r['cell'][2]} | "
            f"{_values_text(r['values'])} | {acc} | {mark} |"
        )
    atomic_write(TUNING_DIR / "tuning.md", "\n".join(md) + "\n")


def _csv_value(value):
    return (
        "[" + ", ".join(f"{v:g}" for v in value) + "]" if isinstance(value, list) else f"{value:g}"
    )


def _values_text(values: dict) -> str:
    return ", ".join(f"{k} {_csv_value(v)}" for k, v in values.items())
