"""Regenerate the paper's results from the finished runs in `results/runs/`.

Table 1 (final test accuracy, mean +- std over seeds, next to the published numbers, and
whether VSGD beats SGD, Adam and AdamW, beyond one std or within it), the differences between
every pair of optimizers per cell with their Welch intervals and the standing they add up to
(best, tied within noise, worse: `pipeline/stats.py`), Table 2 (seconds per iteration: the
timing stage's ratios to SGD first, then seconds, then the runs' own), the test-accuracy
figure, VSGD's adaptive-momentum figure (from the runs' beta1.csv), the
hyperparameter-sensitivity figure (validation accuracy of every tuning point, from the tune
stage's results/tuning/tuning.csv), per-cell curves for `dvc plots`, a summary for `dvc
metrics`, and every MLflow run in a CSV. The hyperparameters of each cell were chosen by the
tune stage on validation accuracy, or pinned; the test set never chooses anything. A
diverged run is counted, marked, and left out of its cell's mean.

Every table and figure takes the optimizers of `params["optimizers"]`, whatever their keys: a
key without an entry in LABELS is shown as itself, one without STYLES gets a style of its own
(`style`). The paper's claim stays about VSGD and RIVALS alone.

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

from vsgd.outputs import check_result
from vsgd.spec import ConfigError
from vsgd.tracking import mlflow_http_settings, tracking_uri

from . import stats
from .config import load_params
from .redact import redact
from .timing import load as load_timing

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
# Any other optimizer: the tab10 colours STYLES leaves free (gray is the chance line's).
EXTRA_COLORS = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
EXTRA_LINES = ("-", "--", "-.", ":")
EXTRA_MARKERS = ("v", "P", "X", "*", "h")
LEVEL = 0.95  # of every confidence interval in the tables (two-sided)
DASH = "–"
BETA1_STATS = ("mean", "q10", "q25", "median", "q75", "q90")  # beta1.csv, besides `step`
ADAM_BETA1 = 0.9  # Adam's fixed momentum: PyTorch's default, what the paper compares with
LINEAGE_TAGS = ("mlflow.source.git.commit",)   # kept in mlflow_runs.csv
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
    params = load_params(args.params, args.set, build_imported=False)
    root = Path(args.results)
    runs = load_runs(root / "runs", params)
    cells = build_cells(runs, params)
    refs = load_references()
    write_table1(cells, params, refs, root / "tables")
    write_differences(cells, params, root / "tables")
    write_standing(cells, params, root / "tables")
    write_table2(cells, params, root / "tables", load_timing(root / "timing"))
    write_sensitivity(params, root / "tuning" / "tuning.csv", root / "figures")
    write_curves(cells, root / "curves")
    write_figure(cells, params, refs, root / "figures")
    write_beta1(cells, params, root / "beta1", root / "figures")
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
    """Finished runs (those with metrics.json) of the grid's datasets/archs/optimizers.

    Every one must be whole (`vsgd.outputs.check_result`): a damaged result is refused,
    with what is wrong with it, rather than counted into a table (ConfigError: the train
    stage sets it aside and trains its run again)."""
    damaged = []
    for metrics_path in sorted(runs_dir.glob("*/metrics.json")):
        wrong = check_result(metrics_path.parent)
        if wrong:
            damaged.append(f"{metrics_path.parent}: damaged result: {'; '.join(wrong)}")
    if damaged:
        raise ConfigError(damaged + [
            "run the train stage (`dvc repro train` or `python -m pipeline train`): it sets "
            "damaged results aside and trains their runs again"])
    runs = []
    for metrics_path in sorted(runs_dir.glob("*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        if (m["dataset"] in params["datasets"] and m["arch_key"] in params["archs"]
                and m["optimizer"] in params["optimizers"]):
            m["curve"] = read_curve(metrics_path.parent / "curve.csv")
            m["beta1"] = read_curve(metrics_path.parent / "beta1.csv")  # VSGD runs: [] if none
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
    """(dataset, arch_key, optimizer) -> its runs (the grid's seeds) and their statistics.

    Diverged runs are counted (`diverged`) and kept out of the mean and std: a run that
    stopped at a non-finite loss has no final accuracy to average.
    """
    from .config import tuned_cells
    grouped = defaultdict(list)
    for r in runs:
        grouped[(r["dataset"], r["arch_key"], r["optimizer"])].append(r)
    tuned = set(tuned_cells(params))
    cells = {}
    for ds in params["datasets"]:
        for arch in params["archs"]:
            for opt in params["optimizers"]:
                cell_runs = grouped.get((ds, arch, opt), [])
                selected = [r for r in cell_runs if not r.get("diverged")]
                accs = [r["test_acc"] for r in selected]
                cells[(ds, arch, opt)] = {
                    "runs": selected, "n": len(selected),
                    "diverged": len(cell_runs) - len(selected),
                    "lr": cell_runs[0]["lr"] if cell_runs else None,
                    "tuned": (ds, arch, opt) in tuned,
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


def label(key: str) -> str:
    """How a dataset, model or optimizer key is shown: its LABELS entry, else the key."""
    return LABELS.get(key, key)


def style(opt: str, opts) -> tuple:
    """(colour, line style, marker) of optimizer `opt` among the grid's `opts`: STYLES for
    the built-ins; any other key takes EXTRA_COLORS and EXTRA_MARKERS by its sorted
    position among the grid's other keys (the line style changes once the colours run out),
    so its look depends on which keys the grid has, not on their order or on results."""
    if opt in STYLES:
        return STYLES[opt]
    extras = sorted((set(opts) - set(STYLES)) | {opt})
    i = extras.index(opt)
    return (EXTRA_COLORS[i % len(EXTRA_COLORS)],
            EXTRA_LINES[i // len(EXTRA_COLORS) % len(EXTRA_LINES)],
            EXTRA_MARKERS[i % len(EXTRA_MARKERS)])


def best_in_row(cells, ds, arch, params) -> set:
    """The optimizers with the best mean of the row (all of them on a tie)."""
    means = {o: cells[(ds, arch, o)]["mean"] for o in params["optimizers"]
             if cells[(ds, arch, o)]["mean"] is not None}
    return {o for o, m in means.items() if m == max(means.values())} if means else set()


def claim_missing(params) -> list[str]:
    """The optimizers of the paper's claim (VSGD and RIVALS) that the grid lacks. With any
    of them missing the claim is not tested: against fewer rivals it would be another claim;
    optimizers beyond them are not part of it."""
    return [o for o in ("vsgd", *RIVALS) if o not in params["optimizers"]]


def claim(cells, ds, arch, params) -> bool | None:
    """Is VSGD's mean above every rival's in this row? None when it cannot be told (a cell
    without finished runs) or is not tested (`claim_missing`)."""
    if claim_missing(params) or cells[(ds, arch, "vsgd")]["mean"] is None:
        return None
    rivals = [cells[(ds, arch, o)]["mean"] for o in RIVALS]
    if any(m is None for m in rivals):
        return None
    return all(cells[(ds, arch, "vsgd")]["mean"] > m for m in rivals)


def claim_strength(cells, ds, arch, params) -> str:
    """The paper's ordering in this row, told against the seed-to-seed spread: "beyond 1
    std" when VSGD's mean exceeds every rival's by more than the larger of the two stds,
    "within 1 std" when it is above but not by that much, "n=1" when a cell has one run
    (no std to tell noise from a difference), "not tested" when the grid lacks VSGD or a
    rival (`claim_missing`)."""
    missing = claim_missing(params)
    if missing:
        return f"not tested: {', '.join(label(o) for o in missing)} not in the grid"
    verdict = claim(cells, ds, arch, params)
    if verdict is not True:
        return _yes_no(verdict)
    vsgd = cells[(ds, arch, "vsgd")]
    rivals = [cells[(ds, arch, o)] for o in RIVALS]
    if any(c["std"] is None for c in [vsgd, *rivals]):
        return "holds (n=1: no std)"
    beyond = all(vsgd["mean"] - r["mean"] > max(vsgd["std"], r["std"]) for r in rivals)
    return "holds beyond 1 std" if beyond else "holds within 1 std"


def cell_text(cell, bold, fmt):
    diverged = f", {cell['diverged']} diverged" if cell["diverged"] else ""
    if cell["mean"] is None:
        return f"diverged ({cell['diverged']})" if cell["diverged"] else DASH
    std = f" ± {cell['std']:.3f}" if cell["std"] is not None else ""
    if fmt == "tex":
        std = std.replace("±", r"$\pm$")
        value = f"{cell['mean']:.3f}{std}"
        return (rf"\textbf{{{value}}}" if bold else value) + f" ({cell['n']}{diverged})"
    value = f"{cell['mean']:.3f}{std}"
    return (f"**{value}**" if bold else value) + f" (n={cell['n']}{diverged})"


def choice_caption(cells, params) -> str:
    """How the hyperparameters and numerics of the reported runs were chosen."""
    tuned = sorted({label(o) for (_, _, o), c in cells.items() if c["tuned"]})
    pinned = sorted({label(o) for (_, _, o), c in cells.items() if not c["tuned"]})
    parts = []
    if tuned:
        t = params["tune"]
        parts.append(f"Hyperparameters of {', '.join(tuned)} tuned on validation accuracy "
                     f"({t['validation_size']} held-out training images, {t['budget']:g} of "
                     "the iterations; every point: `results/tuning/tuning.md`).")
    if pinned:
        parts.append(f"{', '.join(pinned)}: values pinned in params.yaml, not tuned.")
    parts.append(f"Precision: {params['training']['precision']}.")
    return " ".join(parts)


def write_table1(cells, params, refs, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    opts = params["optimizers"]
    head = ["dataset", "architecture"] + [label(o) for o in opts]
    md = ["# Table 1: final test accuracy", "",
          "Mean ± sample std over seeds (n = number of finished seeds; diverged runs are "
          "counted apart and not averaged); best mean per row in bold (all of them on a "
          "tie; whether a difference is larger than the seed-to-seed noise: "
          f"`differences.md` and `standing.md`). {choice_caption(cells, params)}", "",
          _md_row(head), _md_row(["---"] * len(head))]
    tex = [r"\begin{tabular}{ll" + "c" * len(opts) + "}", r"\toprule",
           " & ".join(["Dataset", "Architecture"] + [_tex_escape(label(o)) for o in opts])
           + r" \\",
           r"\midrule"]
    for ds, arch in rows_of(params):
        best = best_in_row(cells, ds, arch, params)
        model = label(cells[(ds, arch, opts[0])]["model"])
        md.append(_md_row([label(ds), model] + [cell_text(cells[(ds, arch, o)], o in best, "md")
                                                 for o in opts]))
        tex.append(" & ".join([label(ds), _tex_escape(model)] +
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
            md.append(_md_row([label(ds), label(c["model"]), label(o),
                               _fmt(c["mean"]),
                               f"{ref['value']:.3f} ± {ref['precision']}" if ref else DASH,
                               f"{delta:+.3f}" if delta is not None else DASH]))
            csv_rows.append({"dataset": ds, "arch": arch, "model": c["model"], "optimizer": o,
                             "lr": c["lr"], "tuned": c["tuned"], "n": c["n"],
                             "diverged": c["diverged"], "test_acc_mean": c["mean"],
                             "test_acc_std": c["std"],
                             "best_in_row": o in best_in_row(cells, ds, arch, params),
                             "paper": ref["value"] if ref else None,
                             "paper_precision": ref["precision"] if ref else None,
                             "delta": delta})
    md += ["", "## The paper's claim: VSGD above Adam, AdamW and SGD", "",
           "Per row: does VSGD's mean beat SGD's, Adam's and AdamW's, and by more than the "
           "seed-to-seed spread (the larger of the two stds)? Other optimizers of the grid "
           "are not part of the claim; without VSGD or one of those three in the grid it is "
           "not tested. The paper column compares the published values that exist (AdamW "
           "and SGD).", "",
           _md_row(["dataset", "architecture", "ours", "paper"]), _md_row(["---"] * 4)]
    for ds, arch in rows_of(params):
        model = label(cells[(ds, arch, opts[0])]["model"])
        md.append(_md_row([label(ds), model, claim_strength(cells, ds, arch, params),
                           _yes_no(_paper_claim(refs, ds, arch))]))
    (out / "table1.md").write_text("\n".join(md) + "\n")
    (out / "table1.tex").write_text("\n".join(tex) + "\n")
    _write_csv(out / "table1.csv", csv_rows)


# ---------------------------------------------------------------------------------------------
# differences beyond seed noise, and the standing they add up to


def accuracies(cell) -> list[float]:
    """A cell's final test accuracies over its reported seeds (diverged runs left out, as in
    its Table 1 mean)."""
    return [r["test_acc"] for r in cell["runs"]]


def pairs(opts) -> list[tuple[str, str]]:
    """Every unordered pair of the grid's optimizers once, as (a, b) for a - b: VSGD's pairs
    first (the paper's subject, so its differences lead each cell), then the grid's order.
    All pairs rather than VSGD's alone: k optimizers give k(k-1)/2 per cell, cheap, and a new
    optimizer is then compared with every other too."""
    order = sorted(opts, key=lambda o: o != "vsgd")  # stable: the grid's order otherwise
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]


def difference_verdict(d: stats.Difference, a: str, b: str) -> str:
    """The table's "excludes zero" column for `d` = a - b."""
    if d.note == stats.NOT_ENOUGH:
        fewest = min(d.n_a, d.n_b)
        return (f"{fewest} seed" if fewest else "no finished runs") + ": no interval, no winner"
    if not d.excludes_zero:
        return "no: within noise"
    above = label(a) if d.mean_diff > 0 else label(b)
    return f"yes: {above} above" + (" (no spread: point interval)"
                                    if d.note == stats.POINT else "")


def differences_caption() -> str:
    level = f"{LEVEL:.0%}"
    return ("Per dataset and architecture, every pair of the grid's optimizers (VSGD's pairs "
            "first, then the others in the grid's order): A − B, the difference of their mean "
            "final test accuracies in percentage points, with its two-sided "
            f"{level} Welch's t confidence interval (unequal variances, Welch–Satterthwaite "
            "degrees of freedom) over the seeds (n: finished seeds per side; diverged runs "
            "are left out, as in Table 1). \"Excludes zero\": yes when the interval lies "
            f"wholly above or below zero, i.e. the difference is larger than the seed-to-seed "
            f"noise at {level} confidence, and the higher side is named; no when it contains "
            "zero, i.e. these seeds cannot tell the two apart. A side with fewer than 2 "
            "finished seeds has no spread to measure: \"1 seed: no interval, no winner\". "
            "When neither side varies at all the interval is the point difference. Each "
            "interval is for its pair alone, not corrected for the number of pairs.")


def write_differences(cells, params, out: Path) -> None:
    """`differences.{md,tex,csv}`: per cell and pair (`pairs`), the Welch interval of the
    difference in test accuracy (`stats.welch`) and whether it excludes zero."""
    out.mkdir(parents=True, exist_ok=True)
    head = ["dataset", "architecture", "A − B", "difference (pp)",
            f"{LEVEL:.0%} interval (pp)", "n (A, B)", "excludes zero"]
    md_rows, tex_rows, csv_rows = [], [], []
    for ds, arch in rows_of(params):
        model = cells[(ds, arch, params["optimizers"][0])]["model"]
        for a, b in pairs(params["optimizers"]):
            ca, cb = cells[(ds, arch, a)], cells[(ds, arch, b)]
            d = stats.welch(accuracies(ca), accuracies(cb), LEVEL)
            diff = DASH if d.mean_diff is None else _pp(d.mean_diff)
            interval = DASH if d.low is None else f"[{_pp(d.low)}, {_pp(d.high)}]"
            verdict = difference_verdict(d, a, b)
            md_rows.append([label(ds), label(model), f"{label(a)} − {label(b)}", diff,
                            interval, f"{d.n_a}, {d.n_b}", verdict])
            tex_rows.append([_tex_escape(label(ds)), _tex_escape(label(model)),
                             f"{_tex_escape(label(a))} $-$ {_tex_escape(label(b))}",
                             diff.replace(DASH, "--"), interval.replace(DASH, "--"),
                             f"{d.n_a}, {d.n_b}", _tex_escape(verdict)])
            csv_rows.append({
                "dataset": ds, "arch": arch, "model": model, "optimizer_a": a,
                "optimizer_b": b, "n_a": d.n_a, "n_b": d.n_b, "mean_a": ca["mean"],
                "mean_b": cb["mean"], "difference_pp": _scaled(d.mean_diff),
                "low_pp": _scaled(d.low), "high_pp": _scaled(d.high), "df": d.df,
                "level": LEVEL, "excludes_zero": d.excludes_zero, "note": d.note})
    caption = differences_caption()
    md = ["# Differences between optimizers, per cell", "", caption, "",
          *_md_table(head, md_rows)]
    tex = [f"% Differences between optimizers, per cell. {caption}",
           r"\begin{tabular}{lllcccl}", r"\toprule",
           r"Dataset & Architecture & $A - B$ & Difference (pp) & "
           rf"{LEVEL:.0%} interval (pp) & $n$ & Excludes zero \\".replace("%", r"\%"),
           r"\midrule", *[" & ".join(r) + r" \\" for r in tex_rows],
           r"\bottomrule", r"\end{tabular}"]
    (out / "differences.md").write_text("\n".join(md) + "\n")
    (out / "differences.tex").write_text("\n".join(tex) + "\n")
    _write_csv(out / "differences.csv", csv_rows,
               fields=["dataset", "arch", "model", "optimizer_a", "optimizer_b", "n_a", "n_b",
                       "mean_a", "mean_b", "difference_pp", "low_pp", "high_pp", "df",
                       "level", "excludes_zero", "note"])


def cell_standings(cells, params) -> dict:
    """(dataset, arch) -> optimizer -> its standing there (`stats.standing`, a key of
    `stats.STANDING`), over every optimizer of the grid."""
    return {(ds, arch): stats.standing({o: accuracies(cells[(ds, arch, o)])
                                        for o in params["optimizers"]}, LEVEL)
            for ds, arch in rows_of(params)}


def standing_counts(cells, params) -> dict:
    """optimizer -> standing -> in how many cells (every cell counts once per optimizer)."""
    per_cell = cell_standings(cells, params)
    return {o: {w: sum(s[o] == w for s in per_cell.values()) for w in stats.STANDING}
            for o in params["optimizers"]}


def standing_caption(n_cells: int) -> str:
    rules = "; ".join(f"**{w}**: {meaning}" for w, meaning in stats.STANDING.items())
    return (f"For each optimizer, in how many of the {n_cells} cells (dataset × "
            "architecture) it is best, tied within noise or worse, comparing every optimizer "
            f"of the grid by the two-sided {LEVEL:.0%} Welch's t intervals of "
            f"`differences.md` (final test accuracy over seeds). {rules}. Each cell counts "
            "once per optimizer. The paper's claim (VSGD above SGD, Adam and AdamW) is "
            "judged in Table 1, not here.")


def write_standing(cells, params, out: Path) -> None:
    """`standing.{md,tex,csv}`: `standing_counts` per optimizer (md also per cell). Not
    "summary": `results/summary.json` is the metrics file."""
    out.mkdir(parents=True, exist_ok=True)
    opts = params["optimizers"]
    counts = standing_counts(cells, params)
    per_cell = cell_standings(cells, params)
    words = list(stats.STANDING)
    rows = [[label(o)] + [str(counts[o][w]) for w in words] for o in opts]
    caption = standing_caption(len(per_cell))
    md = ["# Standing: best, tied within noise, or worse, per optimizer", "", caption, "",
          *_md_table(["optimizer", *words], rows), "", "## Per cell", "",
          *_md_table(["dataset", "architecture"] + [label(o) for o in opts],
                     [[label(ds), label(cells[(ds, arch, opts[0])]["model"])]
                      + [_standing_text(s[o], cells[(ds, arch, o)]) for o in opts]
                      for (ds, arch), s in per_cell.items()])]
    plain = caption.replace("**", "")
    tex = [f"% Standing per optimizer. {plain}", r"\begin{tabular}{l" + "c" * len(words) + "}",
           r"\toprule", " & ".join(["Optimizer"] + [w.capitalize() for w in words]) + r" \\",
           r"\midrule", *[" & ".join(_tex_escape(c) for c in r) + r" \\" for r in rows],
           r"\bottomrule", r"\end{tabular}"]
    (out / "standing.md").write_text("\n".join(md) + "\n")
    (out / "standing.tex").write_text("\n".join(tex) + "\n")
    _write_csv(out / "standing.csv",
               [{"optimizer": o, **{_slug(w): counts[o][w] for w in words},
                 "cells": len(per_cell)} for o in opts],
               fields=["optimizer", *map(_slug, words), "cells"])


def _standing_text(word: str, cell) -> str:
    """A cell's standing, with the seed count of the optimizers that left it unranked."""
    return f"{word} (n={cell['n']})" if word == stats.NOT_ENOUGH and cell["n"] < 2 else word


def _pp(fraction: float) -> str:
    """A difference of accuracies (fractions) in signed percentage points."""
    return f"{100 * fraction:+.2f}"


def _scaled(fraction):
    return None if fraction is None else 100 * fraction


def _slug(word: str) -> str:
    return word.replace(" ", "_")


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


def write_table2(cells, params, out: Path, timing: dict | None = None):
    """Table 2, as the paper measures it and fair to every optimizer.

    First what the timing stage measured (`timing`: its timing.json; every configuration of
    the grid in one process on one device, interleaved): (a) each optimizer's seconds per
    step as a multiple of SGD's on the same dataset and architecture, then (b) the seconds
    per step themselves, with the device. Then (c) the grid's runs' own time per training
    step (`seconds_per_iter`), each on whatever device it ran on, which compares across
    optimizers only as far as those devices and their load were alike. Without a timing
    measurement, (a) and (b) say so and (c) is all there is.
    """
    out.mkdir(parents=True, exist_ok=True)
    opts = params["optimizers"]
    precision = params["training"]["precision"]
    rows_a, rows_b, rows_c, csv_rows = [], [], [], []
    measured = {(r["dataset"], r["arch"], r["optimizer"]): r
                for r in (timing or {}).get("rows", [])}
    for ds, arch in rows_of(params):
        row_cells = [cells[(ds, arch, o)] for o in opts]
        timed = [measured.get((ds, arch, o)) for o in opts]
        model = label(row_cells[0]["model"])
        batch = str(params["protocol"][ds]["batch_size"][arch])
        timed_batch = "/".join(sorted({str(t["batch_size"]) for t in timed if t},
                                      key=int)) or batch
        rows_a.append([label(ds), model, timed_batch] +
                      [DASH if t is None or t["ratio_to_sgd"] is None else
                       f"{t['ratio_to_sgd']:.2f}" for t in timed])
        rows_b.append([label(ds), model, timed_batch] +
                      [DASH if t is None else
                       f"{t['seconds_per_step']:.4f} ({t['images_per_sec']:.0f})"
                       for t in timed] +
                      [", ".join(sorted({t["device_name"] for t in timed if t})) or DASH])
        rows_c.append([label(ds), model, batch] +
                      [DASH if c["seconds_per_iter"] is None else
                       f"{c['seconds_per_iter']:.4f} ({c['images_per_sec']:.0f})"
                       for c in row_cells] +
                      [", ".join(sorted({d for c in row_cells for d in c["devices"]})) or DASH])
        for o, c, t in zip(opts, row_cells, timed):
            csv_rows.append({
                "dataset": ds, "arch": arch, "model": c["model"], "optimizer": o,
                "batch_size": int(batch),
                "ratio_to_sgd": t["ratio_to_sgd"] if t else None,
                "timing_seconds_per_step": t["seconds_per_step"] if t else None,
                "timing_batch_size": t["batch_size"] if t else None,
                "timing_device": f"{t['device_name']} ({t['device']})" if t else None,
                "n": c["n"], "seconds_per_iter": c["seconds_per_iter"],
                "images_per_sec": c["images_per_sec"], "device": ";".join(c["devices"]),
                "precision": precision})
    head = ["dataset", "architecture", "batch"] + [label(o) for o in opts]
    head_tex = ["Dataset", "Architecture", "Batch"] + [label(o) for o in opts]
    md = ["# Table 2: seconds per training iteration", "",
          "The training step alone (batch, forward, backward, optimizer step), precision "
          f"{precision} (`training.precision` of the runs). The paper measured on a "
          f"{PAPER_DEVICE}. Absolute times depend on the device, so the ratios to SGD, "
          "measured side by side on one device, come first.", ""]
    tex = [f"% Table 2: seconds per training iteration; precision {precision}; the paper "
           f"measured on a {PAPER_DEVICE}."]
    if timing:
        where = f"{timing['device_name']} ({timing['device']})"
        own = timing.get("precision")
        md += ["## (a) Relative to SGD (timing stage)", "",
               "Seconds per step divided by SGD's on the same dataset and architecture. "
               f"Measured by the timing stage (`results/timing/timing.csv`) on {where}, "
               "every configuration in one process, interleaved: "
               f"{timing['rounds']} round(s) of {timing['steps']} timed steps after "
               f"{timing['warmup']} warm-up steps each, the median over rounds; torch "
               f"{timing['torch_version']}, precision {own}"
               + (f" (the runs: {precision})" if own and own != precision else "") + ".", "",
               *_md_table(head, rows_a), "",
               "## (b) Seconds per step (timing stage)", "",
               f"Median seconds per step (images/s in parentheses) on {where}.", "",
               *_md_table(head + ["device"], rows_b), ""]
        tex += [f"% (a) relative to SGD, timing stage on {where}",
                *_tex_table(head_tex, rows_a),
                f"% (b) seconds per step (images/s), timing stage on {where}",
                *_tex_table(head_tex + ["Device"], rows_b)]
    else:
        md += ["## (a) Relative to SGD (timing stage)", "",
               "No timing measurement: `results/timing/timing.json` was not found. "
               "`python -m pipeline timing` (or `dvc repro timing`) measures every "
               "configuration in one process on one device; until then there are only the "
               "runs' own times below, which may come from different devices.", ""]
        tex += ["% (a), (b): no timing measurement (results/timing/timing.json not found)"]
    md += ["## (c) Seconds per iteration of the grid's runs", "",
           "Each cell: the mean over its reported runs of the run's own time per training "
           "step (`seconds_per_iter` in its metrics.json: the step alone, without evaluation, "
           "logging and checkpoints; images/s in parentheses), on the device each run used. "
           "Runs on different devices, or sharing one, compare poorly with each other.", "",
           *_md_table(head + ["device"], rows_c)]
    tex += ["% (c) seconds per iteration (images/s) of the grid's runs, each on its device",
            *_tex_table(head_tex + ["Device"], rows_c)]
    (out / "table2.md").write_text("\n".join(md) + "\n")
    (out / "table2.tex").write_text("\n".join(tex) + "\n")
    _write_csv(out / "table2.csv", csv_rows)


def _md_table(head, rows) -> list[str]:
    return [_md_row(head), _md_row(["---"] * len(head))] + [_md_row(r) for r in rows]


def _tex_table(head, rows) -> list[str]:
    """A booktabs tabular: the text columns left-aligned, the optimizers' centred."""
    align = "".join("l" if h in ("Dataset", "Architecture", "Batch", "Device") else "c"
                    for h in head)
    return ([rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(_tex_escape(h) for h in head) + r" \\",
             r"\midrule"] + [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in rows]
            + [r"\bottomrule", r"\end{tabular}"])


def write_sensitivity(params, tuning_csv: Path, out: Path) -> None:
    """Validation accuracy against each tuned hyperparameter's value, one line per cell
    (the best over the grid's other keys at each value), from the tune stage's table;
    diverged points as crosses at the bottom. PNG and SVG; a note when nothing was tuned."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(tuning_csv.open())) if tuning_csv.exists() else []
    from .tune import CELL_COLUMNS, POINT_COLUMNS
    keys = [k for k in (rows[0] if rows else {}) if k not in CELL_COLUMNS + POINT_COLUMNS]
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5.5 * max(1, len(keys)), 4),
                             squeeze=False)
    if not keys:
        axes[0][0].text(0.5, 0.5, "no hyperparameter was tuned\n(every grid empty, or "
                        "tune.enabled false)", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, key in zip(axes[0], keys):
        lines: dict = defaultdict(dict)
        crosses = []
        for r in rows:
            if r[key] == "":
                continue
            cell = (r["dataset"], r["arch"], r["optimizer"])
            x = _number(r[key].strip("[]").split(",")[0])
            if r["diverged"] == "True" or r["val_acc"] == "":
                crosses.append(x)
                continue
            acc = float(r["val_acc"])
            lines[cell][x] = max(acc, lines[cell].get(x, -1.0))
        for (ds, arch, opt), points in sorted(lines.items()):
            xs = sorted(points)
            color, ls, marker = style(opt, params["optimizers"])
            ax.plot(xs, [points[x] for x in xs], color=color, linestyle=ls, marker=marker,
                    label=f"{label(ds)} {arch} {label(opt)}")
        if crosses:
            ax.scatter(crosses, [0] * len(crosses), marker="x", color="black",
                       label="diverged", zorder=3)
        values = [x for p in lines.values() for x in p] + crosses
        if values and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("validation accuracy (final iterate)")
        ax.set_title(f"sensitivity to {key}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize="small")
    fig.suptitle("Tuning: validation accuracy per grid point (results/tuning/tuning.csv)")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"sensitivity.{ext}", bbox_inches="tight", dpi=120)
    plt.close(fig)



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
                color, ls, marker = style(opt, opts)
                # Short budgets give a handful of evaluations: show them as points too.
                ax.plot(steps, mean, color=color, ls=ls, label=label(opt), lw=1.6,
                        marker=marker if len(steps) <= 12 else None, ms=4, alpha=0.9)
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
                ref = refs.get((ds, arch, opt))
                # The published value only means something at the iteration it was read at.
                if ref and cell["iterations"] == ref["iterations"]:
                    ax.errorbar([ref["iterations"]], [ref["value"]], yerr=ref["precision"],
                                fmt="x", color=color, ms=7, capsize=3)
            model = label(params["protocol"][ds]["models"][arch])
            ax.set_title(f"{label(ds)}: {model}", fontsize=10)
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
        for h, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, h)
    seeds = {opt: sorted({cells[k]["n"] for k in cells if k[2] == opt and cells[k]["n"]})
             for opt in opts}
    for opt in opts:
        if label(opt) in handles:
            n = seeds[opt]
            labels[label(opt)] = (f"{label(opt)} (n={n[0]})" if len(n) == 1 else
                                   f"{label(opt)} (n={n[0]}–{n[-1]})")
    chance = matplotlib.lines.Line2D([], [], color="gray", ls=":", lw=1)
    # At most 6 entries a row, and room below the panels for every row: a long grid of
    # optimizers wraps instead of running off the figure.
    ncol = min(len(handles) + 1, 6)
    legend_rows = -(-(len(handles) + 1) // ncol)
    if handles:
        fig.legend(list(handles.values()) + [chance],
                   [labels[k] for k in handles] + ["chance"], loc="lower center",
                   ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle("Test accuracy vs iteration (line: mean over seeds; band: min–max; "
                 "x: published value)\n" + choice_caption(cells, params), fontsize=9,
                 wrap=True)
    fig.tight_layout(rect=(0, 0.05 * legend_rows, 1, 1))
    for ext in ("png", "svg"):
        # Fixed metadata keeps the files byte-stable across identical runs.
        fig.savefig(out / f"test_acc.{ext}", dpi=150,
                    metadata={"Date": None} if ext == "svg" else {"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# VSGD's adaptive momentum


def beta1_curve(runs: list[dict]) -> list[dict]:
    """Per step: each beta1.csv column (the distribution of beta1 over parameter elements)
    averaged over the runs (seeds) that have that step, and `n`, how many do."""
    by_step = defaultdict(list)
    for r in runs:
        for row in r.get("beta1") or []:
            if row.get("step") is not None:
                by_step[int(row["step"])].append(row)
    return [{"step": s, **{k: _mean([row.get(k) for row in by_step[s]]) for k in BETA1_STATS},
             "n": len(by_step[s])} for s in sorted(by_step)]


def write_beta1(cells, params, curves: Path, figures: Path) -> None:
    """The adaptive-momentum figure (`beta1.{png,svg}`) and its per-cell CSVs for `dvc plots`
    (`<curves>/<dataset>_<arch>.csv`: step, the beta1.csv columns averaged over seeds, n).

    One panel per dataset x architecture: VSGD's beta1 over iterations, the median over
    parameter elements as a line with the 25-75% and 10-90% quantile bands, averaged over
    the cell's reported runs (seeds); Adam's fixed beta1 as a dashed line; y from 0 to 1. A
    panel without data says why; the figure is written whatever there is."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    for old in curves.glob("*.csv"):
        old.unlink()
    datasets, archs = params["datasets"], params["archs"]
    fig, axes = plt.subplots(len(datasets), len(archs), squeeze=False,
                             figsize=(4.2 * len(archs), 3.4 * len(datasets) + 0.6))
    color = STYLES["vsgd"][0]
    for i, ds in enumerate(datasets):
        for j, arch in enumerate(archs):
            ax = axes[i][j]
            cell = cells.get((ds, arch, "vsgd"))
            curve = beta1_curve(cell["runs"]) if cell else []
            if curve:
                _write_csv(curves / f"{ds}_{arch}.csv", curve,
                           fields=["step", *BETA1_STATS, "n"])
            points = [r for r in curve if all(r[k] is not None for k in BETA1_STATS)]
            model = label(params["protocol"][ds]["models"][arch])
            seeds = f" (n={cell['n']})" if cell and cell["n"] else ""
            ax.set_title(f"{label(ds)}: {model}{seeds}", fontsize=10)
            if points:
                steps = [r["step"] for r in points]
                ax.fill_between(steps, [r["q10"] for r in points], [r["q90"] for r in points],
                                color=color, alpha=0.15, lw=0, label="10–90% of parameters")
                ax.fill_between(steps, [r["q25"] for r in points], [r["q75"] for r in points],
                                color=color, alpha=0.35, lw=0, label="25–75% of parameters")
                ax.plot(steps, [r["median"] for r in points], color=color, lw=1.6,
                        marker="D" if len(points) <= 12 else None, ms=4, label="VSGD median")
                ax.set_xlim(0, max(cell["iterations"] or 0, steps[-1]) * 1.03 or None)
            else:
                why = ("VSGD is not in the grid" if cell is None else
                       "no finished VSGD run" if not cell["runs"] else
                       "no beta1 values in the VSGD runs\n(no beta1.csv, or only NaN)")
                ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes,
                        color="gray", fontsize=9)
            ax.axhline(ADAM_BETA1, color=STYLES["adam"][0], ls="--", lw=1.2,
                       label=f"Adam β1 = {ADAM_BETA1} (fixed)")
            ax.set_ylim(0, 1)
            ax.set_xlabel("iteration")
            ax.set_ylabel("β1")
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles),
               fontsize=9, frameon=False)
    fig.suptitle("VSGD's adaptive momentum β1 over parameter elements (line: median; bands: "
                 "quantiles; mean over seeds) and Adam's fixed β1", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    for ext in ("png", "svg"):
        fig.savefig(figures / f"beta1.{ext}", dpi=150,
                    metadata={"Date": None} if ext == "svg" else {"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# summary metrics and MLflow export


def build_summary(cells, params, refs) -> dict:
    """`dvc metrics show` / `dvc exp show`: mean test accuracy per cell, the claim and each
    optimizer's standing counts (`run` adds the state of the MLflow export)."""
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
        row["vsgd_best_strength"] = claim_strength(cells, ds, arch, params)
        table.setdefault(ds, {})[arch] = row
    return {"test_acc": table,
            "claim": {"holds": sum(v is True for v in verdicts),
                      "rows": sum(v is not None for v in verdicts)},
            "standing": {o: {_slug(w): n for w, n in c.items()}
                         for o, c in standing_counts(cells, params).items()}}


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
                # MLflow's own tags are its bookkeeping, except the lineage it shows:
                # the commit each run's code came from.
                row.update({f"tags.{k}": v for k, v in r.data.tags.items()
                            if not k.startswith("mlflow.") or k in LINEAGE_TAGS})
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
