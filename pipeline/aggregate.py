"""Regenerate the paper's results from the finished runs in `results/runs/`.

Table 1 (final test accuracy, mean +- std over seeds, next to the published numbers, and
whether VSGD beats the others), Table 2 (seconds per iteration), the test-accuracy figure,
per-cell curves for `dvc plots`, a summary for `dvc metrics`, and every MLflow run in a CSV.
Where an optimizer has an lr grid, each cell uses the lr with the best mean *validation*
accuracy; the test set never chooses anything.

The MLflow export comes last and never costs the rest: with the tracking store unreachable
the tables and figure are written all the same, one warning line on stderr says what failed,
`summary.json` records `"mlflow_export": {"complete": false, ...}` and `mlflow_runs.csv` holds
the runs fetched until then (possibly none); the stage still exits 0.
"""

import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from vsgd.tracking import mlflow_http_settings, tracking_uri

from .config import load_params
from .redact import redact

RESULTS = Path("results")
REFERENCES = Path(__file__).with_name("reference_results.yaml")
LABELS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "vsgd": "VSGD",
          "cifar100": "CIFAR-100", "tinyimagenet": "Tiny ImageNet",
          "vgg16": "VGG16-bn", "vgg19": "VGG19-bn", "convmixer_256_8": "ConvMixer-256/8",
          "resnext18": "ResNeXt-18"}
RIVALS = ("sgd", "adam", "adamw")  # the paper's claim: VSGD above each of these
PAPER_DEVICE = "GeForce RTX 2080 Ti"
NUM_CLASSES = {"cifar100": 100, "tinyimagenet": 200}  # chance level in the figure
# Colour and line style per optimizer: curves that coincide (Adam and AdamW at short budgets)
# stay visible as a dashed line over a solid one.
STYLES = {"sgd": ("tab:green", "-", "o"), "adam": ("tab:orange", "-", "s"),
          "adamw": ("tab:purple", "--", "^"), "vsgd": ("tab:blue", "-", "D")}
DASH = "–"
REDO = ("re-run `python -m pipeline aggregate` (or `dvc repro --force aggregate`) once the "
        "tracking server is reachable")


def add_arguments(parser):
    parser.add_argument("--params", default="params.yaml",
                        help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. datasets=[cifar100] (repeatable)")
    parser.add_argument("--results", default=str(RESULTS),
                        help="results directory: runs are read from <results>/runs, tables, "
                             "figures, curves, summary.json and mlflow_runs.csv are written "
                             f"there (default: {RESULTS})")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="skip the MLflow export (summary.json records it as skipped; "
                             "mlflow_runs.csv is left as it is)")


def run(args) -> int:
    params = load_params(args.params, args.set)
    root = Path(args.results)
    runs = load_runs(root / "runs", params)
    cells = build_cells(runs, params)
    refs = load_references()
    write_table1(cells, params, refs, root / "tables")
    write_table2(cells, params, root / "tables")
    write_lr_selection(cells, root / "tables")
    write_curves(cells, root / "curves")
    write_figure(cells, params, refs, root / "figures")
    summary = build_summary(cells, params, refs)
    print(f"aggregate: {len(runs)} runs, {sum(1 for c in cells.values() if c['n'])} cells; "
          f"VSGD best in {summary['claim']['holds']} of {summary['claim']['rows']} rows")
    if args.no_mlflow:
        summary["mlflow_export"] = {"complete": False, "skipped": True, "reason": "--no-mlflow"}
        write_json(root / "summary.json", summary)
        return 0
    # Written before the export too, so that an export that never ends (killed, interrupted)
    # leaves a summary that says so rather than none.
    summary["mlflow_export"] = {"complete": False, "cause": "the export did not finish"}
    write_json(root / "summary.json", summary)
    summary["mlflow_export"] = export_status(params, root / "mlflow_runs.csv")
    write_json(root / "summary.json", summary)
    return 0


# ---------------------------------------------------------------------------------------------
# inputs


def load_runs(runs_dir: Path, params: dict) -> list[dict]:
    """Finished runs (those with metrics.json) of the grid's datasets/archs/optimizers."""
    runs = []
    for metrics_path in sorted(runs_dir.glob("*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        if (m["dataset"] in params["datasets"] and m["arch_key"] in params["archs"]
                and m["optimizer"] in params["optimizers"]):
            m["curve"] = read_curve(metrics_path.parent / "curve.csv")
            runs.append(m)
    return runs


def read_curve(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_references(path: Path = REFERENCES) -> dict:
    """(dataset, arch_key, optimizer) -> {value, precision, iterations, source}."""
    out = {}
    for src in yaml.safe_load(path.read_text()):
        for arch, values in src["values"].items():
            for opt, value in values.items():
                out[(src["dataset"], arch, opt)] = {
                    "value": value, "precision": src["precision"],
                    "iterations": src["iterations"], "source": " ".join(src["source"].split())}
    return out


def build_cells(runs: list[dict], params: dict) -> dict:
    """(dataset, arch_key, optimizer) -> the runs reported for it and their statistics.

    With several lrs in a cell (an lr grid), only the lr with the best mean validation
    accuracy is reported; `lr_table` keeps every lr's numbers.
    """
    grouped = defaultdict(lambda: defaultdict(list))
    for r in runs:
        grouped[(r["dataset"], r["arch_key"], r["optimizer"])][r["lr"]].append(r)
    cells = {}
    for ds in params["datasets"]:
        for arch in params["archs"]:
            for opt in params["optimizers"]:
                by_lr = grouped.get((ds, arch, opt), {})
                lr_table = [{"lr": lr, "n": len(rs),
                             "val_acc": _mean([r["val_acc"] for r in rs]),
                             "test_acc": _mean([r["test_acc"] for r in rs])}
                            for lr, rs in sorted(by_lr.items())]
                chosen = None
                if len(by_lr) == 1:
                    chosen = next(iter(by_lr))
                elif by_lr:
                    scored = [row for row in lr_table if row["val_acc"] is not None]
                    if scored:
                        chosen = max(scored, key=lambda row: row["val_acc"])["lr"]
                selected = by_lr.get(chosen, [])
                accs = [r["test_acc"] for r in selected]
                cells[(ds, arch, opt)] = {
                    "runs": selected, "n": len(selected), "lr": chosen,
                    "lr_table": lr_table if len(by_lr) > 1 else [],
                    "model": params["protocol"][ds]["models"][arch],
                    "mean": _mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else None,
                    "seconds_per_iter": _mean([r["seconds_per_iter"] for r in selected]),
                    "images_per_sec": _mean([r["images_per_sec"] for r in selected]),
                    "devices": sorted({r.get("device_name") or r.get("device") or "?"
                                       for r in selected}),
                    "iterations": max((r["iterations"] for r in selected), default=None),
                }
    return cells


# ---------------------------------------------------------------------------------------------
# Table 1


def rows_of(params):
    return [(ds, arch) for ds in params["datasets"] for arch in params["archs"]]


def best_in_row(cells, ds, arch, params) -> set:
    """The optimizers with the best mean of the row (all of them on a tie)."""
    means = {o: cells[(ds, arch, o)]["mean"] for o in params["optimizers"]
             if cells[(ds, arch, o)]["mean"] is not None}
    return {o for o, m in means.items() if m == max(means.values())} if means else set()


def claim(cells, ds, arch, params) -> bool | None:
    """Is VSGD's mean above every rival's in this row? None when it cannot be told."""
    if "vsgd" not in params["optimizers"] or cells[(ds, arch, "vsgd")]["mean"] is None:
        return None
    rivals = [cells[(ds, arch, o)]["mean"] for o in RIVALS if o in params["optimizers"]]
    if not rivals or any(m is None for m in rivals):
        return None
    return all(cells[(ds, arch, "vsgd")]["mean"] > m for m in rivals)


def cell_text(cell, bold, fmt):
    if cell["mean"] is None:
        return DASH
    std = f" ± {cell['std']:.3f}" if cell["std"] is not None else ""
    if fmt == "tex":
        std = std.replace("±", r"$\pm$")
        value = f"{cell['mean']:.3f}{std}"
        return (rf"\textbf{{{value}}}" if bold else value) + f" ({cell['n']})"
    value = f"{cell['mean']:.3f}{std}"
    return (f"**{value}**" if bold else value) + f" (n={cell['n']})"


def write_table1(cells, params, refs, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    opts = params["optimizers"]
    head = ["dataset", "architecture"] + [LABELS[o] for o in opts]
    md = ["# Table 1: final test accuracy", "",
          "Mean ± sample std over seeds (n = number of seeds); best mean per row in bold (all "
          "of them on a tie). "
          "Where an lr grid ran, the lr with the best validation accuracy is reported "
          "(`lr_selection.csv`).", "",
          _md_row(head), _md_row(["---"] * len(head))]
    tex = [r"\begin{tabular}{ll" + "c" * len(opts) + "}", r"\toprule",
           " & ".join(["Dataset", "Architecture"] + [LABELS[o] for o in opts]) + r" \\",
           r"\midrule"]
    for ds, arch in rows_of(params):
        best = best_in_row(cells, ds, arch, params)
        model = LABELS[cells[(ds, arch, opts[0])]["model"]]
        md.append(_md_row([LABELS[ds], model] + [cell_text(cells[(ds, arch, o)], o in best, "md")
                                                 for o in opts]))
        tex.append(" & ".join([LABELS[ds], _tex_escape(model)] +
                              [cell_text(cells[(ds, arch, o)], o in best, "tex") for o in opts])
                   + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}"]

    # Side by side with the published numbers, and the paper's claim per row.
    cmp_head = ["dataset", "architecture", "optimizer", "ours", "paper", "Δ (ours − paper)"]
    md += ["", "## Versus the published numbers", "",
           "Published values: see `pipeline/reference_results.yaml` for source and precision "
           f"({_sources(refs)}). {DASH}: no published number.", "",
           _md_row(cmp_head), _md_row(["---"] * len(cmp_head))]
    csv_rows = []
    for ds, arch in rows_of(params):
        for o in opts:
            c = cells[(ds, arch, o)]
            ref = refs.get((ds, arch, o))
            delta = (c["mean"] - ref["value"]) if (ref and c["mean"] is not None) else None
            md.append(_md_row([LABELS[ds], LABELS[c["model"]], LABELS[o],
                               _fmt(c["mean"]),
                               f"{ref['value']:.3f} ± {ref['precision']}" if ref else DASH,
                               f"{delta:+.3f}" if delta is not None else DASH]))
            csv_rows.append({"dataset": ds, "arch": arch, "model": c["model"], "optimizer": o,
                             "lr": c["lr"], "n": c["n"], "test_acc_mean": c["mean"],
                             "test_acc_std": c["std"],
                             "best_in_row": o in best_in_row(cells, ds, arch, params),
                             "paper": ref["value"] if ref else None,
                             "paper_precision": ref["precision"] if ref else None,
                             "delta": delta})
    md += ["", "## The paper's claim: VSGD above Adam, AdamW and SGD", "",
           "Per row: does VSGD's mean beat every other optimizer's? The paper column compares "
           "the published values that exist (AdamW and SGD).", "",
           _md_row(["dataset", "architecture", "ours", "paper"]), _md_row(["---"] * 4)]
    for ds, arch in rows_of(params):
        model = LABELS[cells[(ds, arch, opts[0])]["model"]]
        md.append(_md_row([LABELS[ds], model, _yes_no(claim(cells, ds, arch, params)),
                           _yes_no(_paper_claim(refs, ds, arch))]))
    (out / "table1.md").write_text("\n".join(md) + "\n")
    (out / "table1.tex").write_text("\n".join(tex) + "\n")
    _write_csv(out / "table1.csv", csv_rows)


def _paper_claim(refs, ds, arch):
    vsgd = refs.get((ds, arch, "vsgd"))
    rivals = [refs[(ds, arch, o)]["value"] for o in RIVALS if (ds, arch, o) in refs]
    if not vsgd or not rivals:
        return None
    return all(vsgd["value"] > r for r in rivals)


def _yes_no(value):
    return {True: "holds", False: "does not hold", None: DASH}[value]


def _sources(refs):
    return "; ".join(sorted({f"{r['source'].split('(')[0].strip()} at {r['iterations']} "
                             f"iterations, ±{r['precision']}" for r in refs.values()}))


# ---------------------------------------------------------------------------------------------
# Table 2, lr selection


def write_table2(cells, params, out: Path):
    opts = params["optimizers"]
    head = ["dataset", "architecture", "batch"] + [LABELS[o] for o in opts] + ["device"]
    md = ["# Table 2: seconds per training iteration", "",
          "Mean wall-clock seconds per iteration over the reported runs (images/s in "
          f"parentheses). The paper measured on a {PAPER_DEVICE}.", "",
          _md_row(head), _md_row(["---"] * len(head))]
    tex = [r"\begin{tabular}{lll" + "c" * len(opts) + "l}", r"\toprule",
           " & ".join(["Dataset", "Architecture", "Batch"] + [LABELS[o] for o in opts] +
                      ["Device"]) + r" \\", r"\midrule"]
    rows = []
    for ds, arch in rows_of(params):
        row_cells = [cells[(ds, arch, o)] for o in opts]
        model = LABELS[row_cells[0]["model"]]
        batch = params["protocol"][ds]["batch_size"][arch]
        devices = ", ".join(sorted({d for c in row_cells for d in c["devices"]})) or DASH
        texts = [DASH if c["seconds_per_iter"] is None else
                 f"{c['seconds_per_iter']:.4f} ({c['images_per_sec']:.0f})" for c in row_cells]
        md.append(_md_row([LABELS[ds], model, str(batch)] + texts + [devices]))
        tex.append(" & ".join([LABELS[ds], _tex_escape(model), str(batch)] + texts +
                              [_tex_escape(devices)]) + r" \\")
        for o, c in zip(opts, row_cells):
            rows.append({"dataset": ds, "arch": arch, "model": c["model"], "optimizer": o,
                         "batch_size": batch, "n": c["n"],
                         "seconds_per_iter": c["seconds_per_iter"],
                         "images_per_sec": c["images_per_sec"],
                         "device": ";".join(c["devices"])})
    tex += [r"\bottomrule", r"\end{tabular}"]
    (out / "table2.md").write_text("\n".join(md) + "\n")
    (out / "table2.tex").write_text("\n".join(tex) + "\n")
    _write_csv(out / "table2.csv", rows)


def write_lr_selection(cells, out: Path):
    """Every lr of every lr-grid cell with its validation and test accuracy (the choice is
    made on validation only); header only when no grid ran."""
    rows = [{"dataset": ds, "arch": arch, "optimizer": opt, "lr": row["lr"], "n": row["n"],
             "val_acc_mean": row["val_acc"], "test_acc_mean": row["test_acc"],
             "chosen": row["lr"] == cell["lr"]}
            for (ds, arch, opt), cell in cells.items() for row in cell["lr_table"]]
    _write_csv(out / "lr_selection.csv", rows, fields=["dataset", "arch", "optimizer", "lr", "n",
                                                       "val_acc_mean", "test_acc_mean",
                                                       "chosen"])


# ---------------------------------------------------------------------------------------------
# curves and figure


def mean_curve(runs: list[dict]):
    """steps, mean, low, high of test accuracy over the runs (band: min..max over seeds)."""
    by_step = defaultdict(list)
    for r in runs:
        for row in r["curve"]:
            if row.get("test_acc") is not None:
                by_step[int(row["step"])].append(row["test_acc"])
    steps = sorted(by_step)
    return (steps, [_mean(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def write_curves(cells, out: Path):
    """One CSV per cell for `dvc plots show` (x: step, y: test_acc)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.csv"):
        old.unlink()
    for (ds, arch, opt), cell in cells.items():
        steps, mean, low, high = mean_curve(cell["runs"])
        if steps:
            _write_csv(out / f"{ds}_{arch}_{opt}.csv",
                       [{"step": s, "test_acc": m, "test_acc_min": lo, "test_acc_max": hi}
                        for s, m, lo, hi in zip(steps, mean, low, high)])


def write_figure(cells, params, refs, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    datasets, archs, opts = params["datasets"], params["archs"], params["optimizers"]
    fig, axes = plt.subplots(len(datasets), len(archs), squeeze=False,
                             figsize=(4.2 * len(archs), 3.4 * len(datasets) + 0.6))
    for i, ds in enumerate(datasets):
        for j, arch in enumerate(archs):
            ax = axes[i][j]
            iterations = max((cells[(ds, arch, o)]["iterations"] or 0 for o in opts), default=0)
            for opt in opts:
                cell = cells[(ds, arch, opt)]
                steps, mean, low, high = mean_curve(cell["runs"])
                if not steps:
                    continue
                color, ls, marker = STYLES.get(opt, (None, "-", "o"))
                # Short budgets give a handful of evaluations: show them as points too.
                ax.plot(steps, mean, color=color, ls=ls, label=LABELS[opt], lw=1.6,
                        marker=marker if len(steps) <= 12 else None, ms=4, alpha=0.9)
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
                ref = refs.get((ds, arch, opt))
                # The published value only means something at the iteration it was read at.
                if ref and cell["iterations"] == ref["iterations"]:
                    ax.errorbar([ref["iterations"]], [ref["value"]], yerr=ref["precision"],
                                fmt="x", color=color, ms=7, capsize=3)
            model = LABELS[params["protocol"][ds]["models"][arch]]
            ax.set_title(f"{LABELS[ds]}: {model}", fontsize=10)
            ax.set_xlabel("iteration")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            if ax.lines:
                if ds in NUM_CLASSES:
                    ax.axhline(1 / NUM_CLASSES[ds], color="gray", ls=":", lw=1)
                # The whole run on the x axis (one evaluation is a point, not a zoomed axis).
                ax.set_xlim(0, iterations * 1.03 or None)
                ax.set_ylim(bottom=0)
            else:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
    # One legend for all panels, outside them: it never hides a curve.
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    seeds = {opt: sorted({cells[k]["n"] for k in cells if k[2] == opt and cells[k]["n"]})
             for opt in opts}
    for opt in opts:
        if LABELS[opt] in handles:
            n = seeds[opt]
            labels[LABELS[opt]] = (f"{LABELS[opt]} (n={n[0]})" if len(n) == 1 else
                                   f"{LABELS[opt]} (n={n[0]}–{n[-1]})")
    chance = matplotlib.lines.Line2D([], [], color="gray", ls=":", lw=1)
    if handles:
        fig.legend(list(handles.values()) + [chance],
                   [labels[k] for k in handles] + ["chance"], loc="lower center",
                   ncol=len(handles) + 1, fontsize=9, frameon=False)
    fig.suptitle("Test accuracy vs iteration (line: mean over seeds; band: min–max; "
                 "x: published value)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    for ext in ("png", "svg"):
        # Fixed metadata keeps the files byte-stable across identical runs.
        fig.savefig(out / f"test_acc.{ext}", dpi=150,
                    metadata={"Date": None} if ext == "svg" else {"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# summary metrics and MLflow export


def build_summary(cells, params, refs) -> dict:
    """`dvc metrics show` / `dvc exp show`: mean test accuracy per cell and the claim (`run`
    adds the state of the MLflow export)."""
    table = {}
    verdicts = []
    for ds, arch in rows_of(params):
        row = {}
        for o in params["optimizers"]:
            c = cells[(ds, arch, o)]
            row[o] = {"test_acc": _round(c["mean"]), "n": c["n"]}
            ref = refs.get((ds, arch, o))
            if ref and c["mean"] is not None:
                row[o]["delta_to_paper"] = _round(c["mean"] - ref["value"])
        verdict = claim(cells, ds, arch, params)
        verdicts.append(verdict)
        row["vsgd_best"] = verdict
        table.setdefault(ds, {})[arch] = row
    return {"test_acc": table,
            "claim": {"holds": sum(v is True for v in verdicts),
                      "rows": sum(v is not None for v in verdicts)}}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_status(params, path: Path) -> dict:
    """Run `export_mlflow` and say how it went, for summary.json: `{"complete": true,
    "runs": N}`, or, when the tracking store cannot be reached or fails, `{"complete":
    false, "uri", "cause", "runs"}` (the runs fetched before it failed, which the CSV holds)
    after one warning line on stderr. Anything else (a bug) is raised. (Not "error": `dvc
    metrics show` takes a key of that name for a failure to read the file.)"""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout
    from urllib3.exceptions import HTTPError as Urllib3Error

    uri = tracking_uri(params["tracking"]["uri"])
    if uri is None:
        return {"complete": False, "skipped": True, "reason": "no tracking URI"}
    fetched: list[dict] = []
    try:
        with mlflow_http_settings():
            n = export_mlflow(params, path, fetched)
    except (MlflowException, RequestsConnectionError, Timeout, Urllib3Error, OSError) as exc:
        shown, cause = redact(uri), _cause(exc)
        print(f"aggregate: warning: MLflow export incomplete: tracking store {shown} failed "
              f"({cause}); {path} holds only the {len(fetched)} runs fetched before that; "
              f"the tables and figure are complete; {REDO}", file=sys.stderr, flush=True)
        return {"complete": False, "uri": shown, "cause": cause, "runs": len(fetched)}
    print(f"aggregate: {n} MLflow runs exported to {path}")
    return {"complete": True, "runs": n}


def export_mlflow(params, path: Path, fetched: list | None = None) -> int:
    """Every run of the tracking experiment (params, tags, latest metrics) into one CSV.

    What MLflow raises is raised; the CSV is written anyway, with the runs fetched until then
    (also appended to `fetched`, when given)."""
    from mlflow.tracking import MlflowClient

    rows = [] if fetched is None else fetched
    try:
        client = MlflowClient(tracking_uri=tracking_uri(params["tracking"]["uri"]))
        experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
        token = None
        while experiment is not None:
            page = client.search_runs([experiment.experiment_id], max_results=1000,
                                      page_token=token, order_by=["attributes.start_time ASC"])
            for r in page:
                row = {"run_id": r.info.run_id, "run_name": r.info.run_name,
                       "status": r.info.status, "start_time": r.info.start_time,
                       "end_time": r.info.end_time}
                row.update({f"tags.{k}": v for k, v in r.data.tags.items()
                            if not k.startswith("mlflow.")})
                row.update({f"params.{k}": v for k, v in r.data.params.items()})
                row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
                rows.append(row)
            token = page.token
            if not token:
                break
    finally:
        fields = list(dict.fromkeys(["run_id", "run_name", "status", "start_time",
                                     "end_time"] + sorted({k for row in rows for k in row})))
        _write_csv(path, rows, fields=fields)
    return len(rows)



def _cause(exc: BaseException) -> str:
    """The innermost error of `exc`'s chain on one line, masked and cut short: "Connection
    refused" rather than MLflow's wrapper text with the whole request."""
    root, seen = exc, {id(exc)}
    while True:
        inner = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        root = inner
    text = " ".join(str(root).split()) or " ".join(str(exc).split())
    text = redact(f"{type(root).__name__}: {text}")
    return text if len(text) <= 300 else text[:299] + "…"


# ---------------------------------------------------------------------------------------------
# helpers


def _write_csv(path: Path, rows: list[dict], fields=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = fields or (list(rows[0]) if rows else [])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _md_row(cells):
    return "| " + " | ".join(cells) + " |"


def _tex_escape(text):
    return text.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(value):
    return DASH if value is None else f"{value:.3f}"


def _round(value):
    return None if value is None else round(value, 4)


def _number(text):
    if text in ("", None):
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return None if math.isnan(value) else value
