"""Differences beyond seed noise: per cell (dataset x architecture) and pair of optimizers,
the difference of their mean test accuracies with its Welch interval (`differences.*`), and
the standing that adds them up, best / tied within noise / worse (`standing.*`; the
definitions: `stats.STANDING`)."""

from . import stats
from .cells import accuracies, label, rows_of
from .table import DASH, Table, TableFile, tex_escape

LEVEL = 0.95  # of every confidence interval in the tables (two-sided)


def pairs(opts) -> list[tuple[str, str]]:
    """Every unordered pair of the grid's optimizers once, as (a, b) for a - b: VSGD's pairs
    first (the paper's subject, so its differences lead each cell), then the grid's order.
    All pairs rather than VSGD's alone: k optimizers give k(k-1)/2 per cell, cheap, and a new
    optimizer is then compared with every other too."""
    order = sorted(opts, key=lambda o: o != "vsgd")  # stable: the grid's order otherwise
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1 :]]


def difference_verdict(d: stats.Difference, a: str, b: str) -> str:
    """The table's "excludes zero" column for `d` = a - b."""
    if d.note == stats.NOT_ENOUGH:
        fewest = min(d.n_a, d.n_b)
        return (f"{fewest} seed" if fewest else "no finished runs") + ": no interval, no winner"
    if not d.excludes_zero:
        return "no: within noise"
    above = label(a) if d.mean_diff > 0 else label(b)
    return f"yes: {above} above" + (" (no spread: point interval)" if d.note == stats.POINT else "")


def differences_caption() -> str:
    level = f"{LEVEL:.0%}"
    return (
        "Per dataset and architecture, every pair of the grid's optimizers (VSGD's pairs "
        "first, then the others in the grid's order): A − B, the difference of their mean "
        "final test accuracies in percentage points, with its two-sided "
        f"{level} Welch's t confidence interval (unequal variances, Welch–Satterthwaite "
        "degrees of freedom) over the seeds (n: finished seeds per side; diverged runs "
        'are left out, as in Table 1). "Excludes zero": yes when the interval lies '
        f"wholly above or below zero, i.e. the difference is larger than the seed-to-seed "
        f"noise at {level} confidence, and the higher side is named; no when it contains "
        "zero, i.e. these seeds cannot tell the two apart. A side with fewer than 2 "
        'finished seeds has no spread to measure: "1 seed: no interval, no winner". '
        "When neither side varies at all the interval is the point difference. Each "
        "interval is for its pair alone, not corrected for the number of pairs."
    )


def build_differences(cells, params) -> TableFile:
    """`differences.{md,tex,csv}`: per cell and pair (`pairs`), the Welch interval of the
    difference in test accuracy (`stats.welch`) and whether it excludes zero."""
    table = Table(
        [
            "dataset",
            "architecture",
            "A − B",
            "difference (pp)",
            f"{LEVEL:.0%} interval (pp)",
            "n (A, B)",
            "excludes zero",
        ],
        [],
        align="lllcccl",
        tex_head=[
            "Dataset",
            "Architecture",
            "$A - B$",
            "Difference (pp)",
            tex_escape(f"{LEVEL:.0%} interval (pp)"),
            "$n$",
            "Excludes zero",
        ],
        tex_rows=[],
    )
    records = []
    for ds, arch in rows_of(params):
        model = cells[(ds, arch, params["optimizers"][0])]["model"]
        for a, b in pairs(params["optimizers"]):
            ca, cb = cells[(ds, arch, a)], cells[(ds, arch, b)]
            d = stats.welch(accuracies(ca), accuracies(cb), LEVEL)
            diff = DASH if d.mean_diff is None else signed_points(d.mean_diff)
            interval = (
                DASH if d.low is None else f"[{signed_points(d.low)}, {signed_points(d.high)}]"
            )
            verdict = difference_verdict(d, a, b)
            table.rows.append(
                [
                    label(ds),
                    label(model),
                    f"{label(a)} − {label(b)}",
                    diff,
                    interval,
                    f"{d.n_a}, {d.n_b}",
                    verdict,
                ]
            )
            # LaTeX's dash for "no value" here is `--`, and A - B a math minus.
            table.tex_rows.append(
                [
                    tex_escape(label(ds)),
                    tex_escape(label(model)),
                    f"{tex_escape(label(a))} $-$ {tex_escape(label(b))}",
                    diff.replace(DASH, "--"),
                    interval.replace(DASH, "--"),
                    f"{d.n_a}, {d.n_b}",
                    tex_escape(verdict),
                ]
            )
            records.append(
                {
                    "dataset": ds,
                    "arch": arch,
                    "model": model,
                    "optimizer_a": a,
                    "optimizer_b": b,
                    "n_a": d.n_a,
                    "n_b": d.n_b,
                    "mean_a": ca["mean"],
                    "mean_b": cb["mean"],
                    "difference_pp": points(d.mean_diff),
                    "low_pp": points(d.low),
                    "high_pp": points(d.high),
                    "df": d.df,
                    "level": LEVEL,
                    "excludes_zero": d.excludes_zero,
                    "note": d.note,
                }
            )
    caption = differences_caption()
    return TableFile(
        "differences",
        ["# Differences between optimizers, per cell", caption, table],
        [f"% Differences between optimizers, per cell. {caption}", table],
        records,
        fields=[
            "dataset",
            "arch",
            "model",
            "optimizer_a",
            "optimizer_b",
            "n_a",
            "n_b",
            "mean_a",
            "mean_b",
            "difference_pp",
            "low_pp",
            "high_pp",
            "df",
            "level",
            "excludes_zero",
            "note",
        ],
    )


def cell_standings(cells, params) -> dict:
    """(dataset, arch) -> optimizer -> its standing there (`stats.standing`, a key of
    `stats.STANDING`), over every optimizer of the grid."""
    return {
        (ds, arch): stats.standing(
            {o: accuracies(cells[(ds, arch, o)]) for o in params["optimizers"]}, LEVEL
        )
        for ds, arch in rows_of(params)
    }


def standing_counts(cells, params) -> dict:
    """optimizer -> standing, as a field name (`tied_within_noise`) -> in how many cells
    (every cell counts once per optimizer): the standing CSV's and summary.json's counts."""
    per_cell = cell_standings(cells, params)
    return {
        o: {field_name(w): sum(s[o] == w for s in per_cell.values()) for w in stats.STANDING}
        for o in params["optimizers"]
    }


def standing_caption(n_cells: int) -> str:
    rules = "; ".join(f"**{w}**: {meaning}" for w, meaning in stats.STANDING.items())
    return (
        f"For each optimizer, in how many of the {n_cells} cells (dataset × "
        "architecture) it is best, tied within noise or worse, comparing every optimizer "
        f"of the grid by the two-sided {LEVEL:.0%} Welch's t intervals of "
        f"`differences.md` (final test accuracy over seeds). {rules}. Each cell counts "
        "once per optimizer. The paper's claim (VSGD above SGD, Adam and AdamW) is "
        "judged in Table 1, not here."
    )


def build_standing(cells, params) -> TableFile:
    """`standing.{md,tex,csv}`: `standing_counts` per optimizer (md also per cell). Not
    "summary": `results/summary.json` is the metrics file."""
    opts = params["optimizers"]
    counts = standing_counts(cells, params)
    per_cell = cell_standings(cells, params)
    words = list(stats.STANDING)
    totals = Table(
        ["optimizer", *words],
        [[label(o)] + [str(counts[o][field_name(w)]) for w in words] for o in opts],
        align="l" + "c" * len(words),
        tex_head=["Optimizer"] + [w.capitalize() for w in words],
    )
    by_cell = Table(
        ["dataset", "architecture"] + [label(o) for o in opts],
        [
            [label(ds), label(cells[(ds, arch, opts[0])]["model"])]
            + [standing_text(s[o], cells[(ds, arch, o)]) for o in opts]
            for (ds, arch), s in per_cell.items()
        ],
    )
    caption = standing_caption(len(per_cell))
    return TableFile(
        "standing",
        [
            "# Standing: best, tied within noise, or worse, per optimizer",
            caption,
            totals,
            "## Per cell",
            by_cell,
        ],
        [f"% Standing per optimizer. {caption.replace('**', '')}", totals],
        [{"optimizer": o, **counts[o], "cells": len(per_cell)} for o in opts],
        fields=["optimizer", *map(field_name, words), "cells"],
    )


def standing_text(word: str, cell) -> str:
    """A cell's standing, with the seed count of the optimizers that left it unranked."""
    return f"{word} (n={cell['n']})" if word == stats.NOT_ENOUGH and cell["n"] < 2 else word


def signed_points(fraction: float) -> str:
    """A difference of accuracies (fractions) in signed percentage points."""
    return f"{100 * fraction:+.2f}"


def points(fraction):
    """A fraction in percentage points, for the CSV; None stays None."""
    return None if fraction is None else 100 * fraction


def field_name(word: str) -> str:
    """A standing word as a CSV column and summary.json key."""
    return word.replace(" ", "_")
