"""The figures (PNG and SVG) and the per-cell CSVs `dvc plots` draws: test accuracy against
iteration (`test_acc`, CSVs in `results/curves/`), VSGD's adaptive momentum (`beta1`, CSVs
in `results/beta1/`) and validation accuracy against each tuned value (`sensitivity`).

Every optimizer key has a look of its own (`style`): STYLES for the built-ins, one derived
from its sorted position for any other.

matplotlib is imported in the functions that draw: its import costs more than all of the
report's other imports together, and `--help` and the tables never need it."""

import csv
from collections import defaultdict
from pathlib import Path

from vsgd.outputs import BETA1_COLUMNS

from ..plan import CELL_COLUMNS, POINT_COLUMNS
from .cells import choice_caption, label, mean_or_none, model_label
from .runs import parse_number
from .table import write_csv

# Colour and line style per optimizer: curves that coincide (Adam and AdamW at short budgets)
# stay visible as a dashed line over a solid one.
STYLES = {
    "sgd": ("tab:green", "-", "o"),
    "adam": ("tab:orange", "-", "s"),
    "adamw": ("tab:purple", "--", "^"),
    "vsgd": ("tab:blue", "-", "D"),
}
# Any other optimizer: the tab10 colours STYLES leaves free (gray is the chance line's).
EXTRA_COLORS = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
EXTRA_LINES = ("-", "--", "-.", ":")
EXTRA_MARKERS = ("v", "P", "X", "*", "h")
NUM_CLASSES = {"cifar100": 100, "tinyimagenet": 200}  # chance level in the figure
# The chance level: its lines in the panels and its entry in the legend.
CHANCE_STYLE = {"color": "gray", "ls": ":", "lw": 1}
BETA1_STATS = BETA1_COLUMNS[1:]  # beta1.csv's columns besides `step`
ADAM_BETA1 = 0.9  # Adam's fixed momentum: PyTorch's default, what the paper compares with


def style(opt: str, opts) -> tuple:
    """(colour, line style, marker) of optimizer `opt` among the grid's `opts`: STYLES for
    the built-ins; any other key takes EXTRA_COLORS and EXTRA_MARKERS by its sorted
    position among the grid's other keys (the line style changes once the colours run out),
    so its look depends on which keys the grid has, not on their order or on results."""
    if opt in STYLES:
        return STYLES[opt]
    extras = sorted((set(opts) - set(STYLES)) | {opt})
    i = extras.index(opt)
    return (
        EXTRA_COLORS[i % len(EXTRA_COLORS)],
        EXTRA_LINES[i // len(EXTRA_COLORS) % len(EXTRA_LINES)],
        EXTRA_MARKERS[i % len(EXTRA_MARKERS)],
    )


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    # SVG element ids from the content alone, not from a random salt per process.
    matplotlib.rcParams["svg.hashsalt"] = "vsgd-repro"
    import matplotlib.pyplot as plt

    return plt


def panel_grid(plt, params):
    """A figure with one panel per dataset (rows) x architecture (columns)."""
    datasets, archs = params["datasets"], params["archs"]
    return plt.subplots(
        len(datasets),
        len(archs),
        squeeze=False,
        # At least 6.4 in wide: one panel's legend and title need it.
        figsize=(max(6.4, 4.2 * len(archs)), 3.4 * len(datasets) + 0.6),
    )


def legend_handles(axes) -> dict:
    """Each legend text of the panels once, with its first handle: one legend for all."""
    handles = {}
    for ax in axes.flat:
        for h, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, h)
    return handles


def bottom_legend(fig, handles: list, labels: list) -> int:
    """One legend for all panels, below them (it never hides a curve), with as many entries
    a row as the figure's width holds (about 2.1 in each), wrapping onto more rows rather
    than running off the figure; how many rows it takes (for `tight_layout`'s margin)."""
    ncol = max(1, min(len(handles), int(fig.get_figwidth() / 2.1)))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    return -(-len(handles) // ncol)


def save(plt, fig, out: Path, name: str, dpi=150, **options) -> None:
    """`<name>.png` and `<name>.svg`, without the date and software stamps, so that the same
    results give the same bytes."""
    for ext in ("png", "svg"):
        stamps = {"Date": None} if ext == "svg" else {"Software": None}
        fig.savefig(out / f"{name}.{ext}", dpi=dpi, metadata=stamps, **options)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# test accuracy


def mean_curve(runs: list[dict]):
    """steps, mean, low, high of test accuracy over the runs (band: min..max over seeds)."""
    by_step = defaultdict(list)
    for r in runs:
        for row in r["curve"]:
            if row.get("test_acc") is not None:
                by_step[int(row["step"])].append(row["test_acc"])
    steps = sorted(by_step)
    return (
        steps,
        [mean_or_none(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def write_curves(cells, out: Path):
    """One CSV per cell for `dvc plots show` (x: step, y: test_acc)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.csv"):
        old.unlink()
    for (ds, arch, opt), cell in cells.items():
        steps, mean, low, high = mean_curve(cell["runs"])
        if steps:
            write_csv(
                out / f"{ds}_{arch}_{opt}.csv",
                [
                    {"step": s, "test_acc": m, "test_acc_min": lo, "test_acc_max": hi}
                    for s, m, lo, hi in zip(steps, mean, low, high)
                ],
            )


def write_test_acc(cells, params, refs, out: Path):
    """`test_acc.{png,svg}`: per panel one line per optimizer (mean over seeds, band min-max),
    the published value where our runs end at its iteration, the chance level."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    opts = params["optimizers"]
    fig, axes = panel_grid(plt, params)
    published = False  # whether any panel shows a published value
    for i, ds in enumerate(params["datasets"]):
        for j, arch in enumerate(params["archs"]):
            ax = axes[i][j]
            iterations = max((cells[(ds, arch, o)]["iterations"] or 0 for o in opts), default=0)
            for opt in opts:
                cell = cells[(ds, arch, opt)]
                steps, mean, low, high = mean_curve(cell["runs"])
                if not steps:
                    continue
                color, ls, marker = style(opt, opts)
                # Short budgets give a handful of evaluations: show them as points too.
                ax.plot(
                    steps,
                    mean,
                    color=color,
                    ls=ls,
                    label=label(opt),
                    lw=1.6,
                    marker=marker if len(steps) <= 12 else None,
                    ms=4,
                    alpha=0.9,
                )
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
                ref = refs.get((ds, arch, opt))
                # The published value only means something at the iteration it was read at.
                if ref and cell["iterations"] == ref["iterations"]:
                    published = True
                    ax.errorbar(
                        [ref["iterations"]],
                        [ref["value"]],
                        yerr=ref["precision"],
                        fmt="x",
                        color=color,
                        ms=7,
                        capsize=3,
                    )
            ax.set_title(f"{label(ds)}: {model_label(params, ds, arch)}", fontsize=10)
            ax.set_xlabel("iteration")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            if ax.lines:
                if ds in NUM_CLASSES:
                    chance_line(ax, [NUM_CLASSES[ds]])
                # The whole run on the x axis (one evaluation is a point, not a zoomed axis).
                ax.set_xlim(0, iterations * 1.03 or None)
                ax.set_ylim(bottom=0)
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no finished runs",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="gray",
                )
    # One legend for all panels, outside them: it never hides a curve.
    handles, labels = legend_handles(axes), {}
    seeds = {
        opt: sorted({cells[k]["n"] for k in cells if k[2] == opt and cells[k]["n"]}) for opt in opts
    }
    for opt in opts:
        if label(opt) in handles:
            n = seeds[opt]
            labels[label(opt)] = (
                f"{label(opt)} (n={n[0]})" if len(n) == 1 else f"{label(opt)} (n={n[0]}–{n[-1]})"
            )
    chance = plt.Line2D([], [], **CHANCE_STYLE)
    entries = [labels[k] for k in handles] + ["chance"] if handles else []
    legend_rows = bottom_legend(fig, list(handles.values()) + [chance], entries)
    fig.suptitle(
        "Test accuracy vs iteration (line: mean over seeds; band: min–max"
        + ("; x: published value" if published else "")
        + ")\n"
        + choice_caption(cells, params),
        fontsize=9,
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.05 * legend_rows, 1, 1))
    save(plt, fig, out, "test_acc")


def chance_line(ax, classes: list) -> None:
    """Accuracy by guessing (1 / classes) for each number of classes, dotted, named once at
    the left end of the highest (before the first evaluation: no curve there yet)."""
    for n in classes:
        ax.axhline(1 / n, **CHANCE_STYLE)
    ax.annotate(
        f"chance ({', '.join(f'1/{n}' for n in sorted(classes))})",
        (0, 1 / min(classes)),
        xycoords=("axes fraction", "data"),
        xytext=(3, 2),
        textcoords="offset points",
        ha="left",
        va="bottom",
        fontsize=7,
        color="gray",
    )


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
    return [
        {
            "step": s,
            **{k: mean_or_none([row.get(k) for row in by_step[s]]) for k in BETA1_STATS},
            "n": len(by_step[s]),
        }
        for s in sorted(by_step)
    ]


def write_beta1(cells, params, curves: Path, figures: Path) -> None:
    """The adaptive-momentum figure (`beta1.{png,svg}`) and its per-cell CSVs for `dvc plots`
    (`<curves>/<dataset>_<arch>.csv`: step, the beta1.csv columns averaged over seeds, n).

    One panel per dataset x architecture: VSGD's beta1 over iterations, the median over
    parameter elements as a line with the 25-75% and 10-90% quantile bands, averaged over
    the cell's reported runs (seeds); Adam's fixed beta1 as a dashed line; y from 0 to 1. A
    panel without data says why; the figure is written whatever there is."""
    plt = pyplot()
    curves.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    for old in curves.glob("*.csv"):
        old.unlink()
    fig, axes = panel_grid(plt, params)
    color = STYLES["vsgd"][0]
    for i, ds in enumerate(params["datasets"]):
        for j, arch in enumerate(params["archs"]):
            ax = axes[i][j]
            cell = cells.get((ds, arch, "vsgd"))
            curve = beta1_curve(cell["runs"]) if cell else []
            if curve:
                write_csv(curves / f"{ds}_{arch}.csv", curve, fields=["step", *BETA1_STATS, "n"])
            points = [r for r in curve if all(r[k] is not None for k in BETA1_STATS)]
            seeds = f" (n={cell['n']})" if cell and cell["n"] else ""
            ax.set_title(f"{label(ds)}: {model_label(params, ds, arch)}{seeds}", fontsize=10)
            if points:
                steps = [r["step"] for r in points]
                for low, high, alpha, share in (
                    ("q10", "q90", 0.15, "10–90%"),
                    ("q25", "q75", 0.35, "25–75%"),
                ):
                    ax.fill_between(
                        steps,
                        [r[low] for r in points],
                        [r[high] for r in points],
                        color=color,
                        alpha=alpha,
                        lw=0,
                        label=f"{share} of parameters",
                    )
                ax.plot(
                    steps,
                    [r["median"] for r in points],
                    color=color,
                    lw=1.6,
                    marker="D" if len(points) <= 12 else None,
                    ms=4,
                    label="VSGD median",
                )
                ax.set_xlim(0, max(cell["iterations"] or 0, steps[-1]) * 1.03 or None)
            else:
                why = (
                    "VSGD is not in the grid"
                    if cell is None
                    else "no finished VSGD run"
                    if not cell["runs"]
                    else "no beta1 values in the VSGD runs\n(no beta1.csv, or only NaN)"
                )
                ax.text(
                    0.5,
                    0.5,
                    why,
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="gray",
                    fontsize=9,
                )
            ax.axhline(
                ADAM_BETA1,
                color=STYLES["adam"][0],
                ls="--",
                lw=1.2,
                label=f"Adam β1 = {ADAM_BETA1} (fixed)",
            )
            ax.set_ylim(0, 1)
            ax.set_xlabel("iteration")
            ax.set_ylabel("β1")
            ax.grid(alpha=0.3)
    handles = legend_handles(axes)
    legend_rows = bottom_legend(fig, list(handles.values()), list(handles))
    fig.suptitle(
        "VSGD's adaptive momentum β1 over parameter elements (line: median; bands: "
        "quantiles, hidden by the line where they are narrower; mean over seeds) and Adam's "
        "fixed β1",
        fontsize=9,
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.05 * legend_rows, 1, 1))
    save(plt, fig, figures, "beta1")


# ---------------------------------------------------------------------------------------------
# hyperparameter sensitivity


def write_sensitivity(params, tuning_csv: Path, out: Path) -> None:
    """Validation accuracy against each tuned hyperparameter's value, one line per cell
    (the best over the grid's other keys at each value), from the tune stage's table;
    diverged points as crosses at the bottom, each cell's chosen point ringed, accuracy from
    0 with the chance level. PNG and SVG; a note when nothing was tuned."""
    plt = pyplot()
    rows = list(csv.DictReader(tuning_csv.open())) if tuning_csv.exists() else []
    keys = [k for k in (rows[0] if rows else {}) if k not in CELL_COLUMNS + POINT_COLUMNS]
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(
        1, max(1, len(keys)), figsize=(5.5 * max(1, len(keys)), 4), squeeze=False
    )
    if not keys:
        axes[0][0].text(
            0.5,
            0.5,
            "no hyperparameter was tuned\n(every grid empty, or tune.enabled false)",
            ha="center",
            va="center",
        )
        axes[0][0].set_axis_off()
    for ax, key in zip(axes[0], keys):
        lines: dict = defaultdict(dict)
        crosses, chosen = [], []
        for r in rows:
            if r[key] == "":
                continue
            cell = (r["dataset"], r["arch"], r["optimizer"])
            x = parse_number(r[key].strip("[]").split(",")[0])
            if r["diverged"] == "True" or r["val_acc"] == "":
                crosses.append(x)
                continue
            acc = float(r["val_acc"])
            lines[cell][x] = max(acc, lines[cell].get(x, -1.0))
            if r["chosen"] == "True":
                chosen.append((x, acc))
        for (ds, arch, opt), points in sorted(lines.items()):
            xs = sorted(points)
            color, ls, marker = style(opt, params["optimizers"])
            ax.plot(
                xs,
                [points[x] for x in xs],
                color=color,
                linestyle=ls,
                marker=marker,
                label=f"{label(ds)} {model_label(params, ds, arch)} {label(opt)}",
            )
        if crosses:
            ax.scatter(
                crosses, [0] * len(crosses), marker="x", color="black", label="diverged", zorder=3
            )
        if chosen:
            ax.scatter(*zip(*chosen), s=150, facecolors="none", edgecolors="black", label="chosen")
        values = [x for p in lines.values() for x in p] + crosses
        # Grids are multiplicative (0.01, 0.03, 0.1): on a log axis, ticked at the values tried.
        if values and min(values) > 0 and max(values) / min(values) >= 3:
            ax.set_xscale("log")
            ax.set_xticks(sorted(set(values)), [f"{v:g}" for v in sorted(set(values))])
            ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel("validation accuracy (final iterate)")
        ax.set_title(f"sensitivity to {key}")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        classes = {NUM_CLASSES[r["dataset"]] for r in rows if r["dataset"] in NUM_CLASSES}
        if classes:
            chance_line(ax, sorted(classes))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.suptitle("Tuning: validation accuracy per grid point (results/tuning/tuning.csv)")
    fig.tight_layout()
    save(plt, fig, out, "sensitivity", dpi=120, bbox_inches="tight")
