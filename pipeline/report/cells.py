"""The grid's runs as cells (dataset x architecture x optimizer), how keys are shown, and
the paper's claim per row: VSGD above SGD, Adam and AdamW (`RIVALS`), beyond one std or
within it.

A diverged run is counted in its cell and left out of the cell's mean: a run that stopped
at a non-finite loss has no final accuracy to average."""

import statistics
from collections import defaultdict

from ..cells import tuned_cells
from .table import DASH

LABELS = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "vsgd": "VSGD",
    "cifar100": "CIFAR-100",
    "tinyimagenet": "Tiny ImageNet",
    "vgg16": "VGG16-bn",
    "vgg19": "VGG19-bn",
    "convmixer_256_8": "ConvMixer-256/8",
    "resnext18": "ResNeXt-18",
}
RIVALS = ("sgd", "adam", "adamw")  # the paper's claim: VSGD above each of these


def label(key: str) -> str:
    """How a dataset, model or optimizer key is shown: its LABELS entry, else the key."""
    return LABELS.get(key, key)


def model_label(params, dataset: str, arch: str) -> str:
    """The display name of the model a grid's architecture key stands for on a dataset (the
    key itself for one the params no longer list, e.g. in an older tuning table)."""
    model = params["protocol"].get(dataset, {}).get("models", {}).get(arch)
    return label(model) if model else arch


def mean_or_none(values):
    """The mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def build_cells(runs: list[dict], params: dict) -> dict:
    """(dataset, arch_key, optimizer) -> its runs (the grid's seeds) and their statistics.

    Diverged runs are counted (`diverged`) and kept out of `runs`, the mean and the std."""
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
                    "runs": selected,
                    "n": len(selected),
                    "diverged": len(cell_runs) - len(selected),
                    "lr": cell_runs[0]["lr"] if cell_runs else None,
                    "tuned": (ds, arch, opt) in tuned,
                    "model": params["protocol"][ds]["models"][arch],
                    "mean": mean_or_none(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else None,
                    "seconds_per_iter": mean_or_none([r["seconds_per_iter"] for r in selected]),
                    "images_per_sec": mean_or_none([r["images_per_sec"] for r in selected]),
                    "devices": sorted(
                        {r.get("device_name") or r.get("device") or "?" for r in selected}
                    ),
                    "iterations": max((r["iterations"] for r in selected), default=None),
                }
    return cells


def rows_of(params) -> list[tuple[str, str]]:
    """The tables' rows: every (dataset, arch_key) of the grid, in the grid's order."""
    return [(ds, arch) for ds in params["datasets"] for arch in params["archs"]]


def accuracies(cell) -> list[float]:
    """A cell's final test accuracies over its reported seeds (diverged runs left out, as in
    its mean)."""
    return [r["test_acc"] for r in cell["runs"]]


def best_in_row(cells, ds, arch, params) -> set:
    """The optimizers with the best mean of the row (all of them on a tie)."""
    means = {
        o: cells[(ds, arch, o)]["mean"]
        for o in params["optimizers"]
        if cells[(ds, arch, o)]["mean"] is not None
    }
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
        return claim_text(verdict)
    vsgd = cells[(ds, arch, "vsgd")]
    rivals = [cells[(ds, arch, o)] for o in RIVALS]
    if any(c["std"] is None for c in [vsgd, *rivals]):
        return "holds (n=1: no std)"
    beyond = all(vsgd["mean"] - r["mean"] > max(vsgd["std"], r["std"]) for r in rivals)
    return "holds beyond 1 std" if beyond else "holds within 1 std"


def paper_claim(refs, ds, arch) -> bool | None:
    """Does the claim hold in the published numbers of this row (VSGD's against those of
    the rivals that were published)? None without VSGD's or any rival's."""
    vsgd = refs.get((ds, arch, "vsgd"))
    rivals = [refs[(ds, arch, o)]["value"] for o in RIVALS if (ds, arch, o) in refs]
    if not vsgd or not rivals:
        return None
    return all(vsgd["value"] > r for r in rivals)


def claim_text(verdict: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: DASH}[verdict]


def choice_caption(cells, params) -> str:
    """How the hyperparameters and numerics of the reported runs were chosen."""
    tuned = sorted({label(o) for (_, _, o), c in cells.items() if c["tuned"]})
    pinned = sorted({label(o) for (_, _, o), c in cells.items() if not c["tuned"]})
    parts = []
    if tuned:
        t = params["tune"]
        parts.append(
            f"Hyperparameters of {', '.join(tuned)} tuned on validation accuracy "
            f"({t['validation_size']} held-out training images, {t['budget']:g} of "
            "the iterations; every point: `results/tuning/tuning.md`)."
        )
    if pinned:
        parts.append(f"{', '.join(pinned)}: values pinned in params.yaml, not tuned.")
    parts.append(f"Precision: {params['training']['precision']}.")
    return " ".join(parts)
