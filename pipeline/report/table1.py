"""Table 1: final test accuracy per dataset x architecture and optimizer, next to the
published numbers with our delta, and whether the paper's claim holds in each row."""

from .cells import (
    best_in_row,
    choice_caption,
    claim_strength,
    claim_text,
    label,
    paper_claim,
    rows_of,
)
from .table import DASH, Table, TableFile, tex_escape


def build_table1(cells, params, refs) -> TableFile:
    """`table1.{md,tex,csv}`: mean ± std (n) per cell, best per row bold; in markdown also
    ours against the published numbers and the claim per row; the CSV one record per cell."""
    opts = params["optimizers"]
    accuracy = Table(
        ["dataset", "architecture"] + [label(o) for o in opts],
        [],
        align="ll" + "c" * len(opts),
        tex_head=["Dataset", "Architecture"] + [tex_escape(label(o)) for o in opts],
        tex_rows=[],
    )
    versus = Table(
        ["dataset", "architecture", "optimizer", "ours", "paper", "Δ (ours − paper)"], []
    )
    claims = Table(["dataset", "architecture", "ours", "paper"], [])
    records = []
    for ds, arch in rows_of(params):
        best = best_in_row(cells, ds, arch, params)
        model = label(cells[(ds, arch, opts[0])]["model"])
        row = [cells[(ds, arch, o)] for o in opts]
        accuracy.rows.append(
            [label(ds), model]
            + [accuracy_text(c, o in best, latex=False) for o, c in zip(opts, row)]
        )
        accuracy.tex_rows.append(
            [tex_escape(label(ds)), tex_escape(model)]
            + [accuracy_text(c, o in best, latex=True) for o, c in zip(opts, row)]
        )
        for o, c in zip(opts, row):
            ref = refs.get((ds, arch, o))
            delta = (c["mean"] - ref["value"]) if (ref and c["mean"] is not None) else None
            versus.rows.append(
                [
                    label(ds),
                    model,
                    label(o),
                    DASH if c["mean"] is None else f"{c['mean']:.3f}",
                    f"{ref['value']:.3f} ± {ref['precision']}" if ref else DASH,
                    f"{delta:+.3f}" if delta is not None else DASH,
                ]
            )
            records.append(
                {
                    "dataset": ds,
                    "arch": arch,
                    "model": c["model"],
                    "optimizer": o,
                    "lr": c["lr"],
                    "tuned": c["tuned"],
                    "n": c["n"],
                    "diverged": c["diverged"],
                    "test_acc_mean": c["mean"],
                    "test_acc_std": c["std"],
                    "best_in_row": o in best,
                    "paper": ref["value"] if ref else None,
                    "paper_precision": ref["precision"] if ref else None,
                    "delta": delta,
                }
            )
        claims.rows.append(
            [
                label(ds),
                model,
                claim_strength(cells, ds, arch, params),
                claim_text(paper_claim(refs, ds, arch)),
            ]
        )
    markdown = [
        "# Table 1: final test accuracy",
        "Mean ± sample std over seeds (n = number of finished seeds; diverged runs are "
        "counted apart and not averaged); best mean per row in bold (all of them on a "
        "tie; whether a difference is larger than the seed-to-seed noise: "
        f"`differences.md` and `standing.md`). {choice_caption(cells, params)}",
        accuracy,
        "## Versus the published numbers",
        "Published values: see `pipeline/reference_results.yaml` for source and precision "
        f"({sources(refs)}). {DASH}: no published number.",
        versus,
        "## The paper's claim: VSGD above Adam, AdamW and SGD",
        "Per row: does VSGD's mean beat SGD's, Adam's and AdamW's, and by more than the "
        "seed-to-seed spread (the larger of the two stds)? Other optimizers of the grid "
        "are not part of the claim; without VSGD or one of those three in the grid it is "
        "not tested. The paper column compares the published values that exist (AdamW "
        "and SGD).",
        claims,
    ]
    return TableFile("table1", markdown, [accuracy], records)


def accuracy_text(cell, bold: bool, latex: bool) -> str:
    """A cell of Table 1: mean ± std (n, diverged), bold when best in its row; a dash when
    nothing finished, "diverged (k)" when every run diverged."""
    diverged = f", {cell['diverged']} diverged" if cell["diverged"] else ""
    if cell["mean"] is None:
        return f"diverged ({cell['diverged']})" if cell["diverged"] else DASH
    std = f" ± {cell['std']:.3f}" if cell["std"] is not None else ""
    if latex:
        std = std.replace("±", r"$\pm$")
        value = f"{cell['mean']:.3f}{std}"
        return (rf"\textbf{{{value}}}" if bold else value) + f" ({cell['n']}{diverged})"
    value = f"{cell['mean']:.3f}{std}"
    return (f"**{value}**" if bold else value) + f" (n={cell['n']}{diverged})"


def sources(refs) -> str:
    """Each published source once: its name, the iteration its numbers were read at and
    their precision."""
    return "; ".join(
        sorted(
            {
                f"{r['source'].split('(')[0].strip()} at {r['iterations']} "
                f"iterations, ±{r['precision']}"
                for r in refs.values()
            }
        )
    )
