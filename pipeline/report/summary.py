"""`results/summary.json`, what `dvc metrics show` and `dvc exp show` read: the mean test
accuracy per cell with its delta to the paper, the claim's count of rows, and each
optimizer's standing counts."""

import json
from pathlib import Path

from .cells import claim, claim_strength, rows_of
from .differences import standing_counts


def build_summary(cells, params, refs) -> dict:
    """The summary without the state of the MLflow export (the aggregate adds that)."""
    table = {}
    verdicts = []
    for ds, arch in rows_of(params):
        row = {}
        for o in params["optimizers"]:
            c = cells[(ds, arch, o)]
            row[o] = {"test_acc": rounded(c["mean"]), "n": c["n"]}
            ref = refs.get((ds, arch, o))
            if ref and c["mean"] is not None:
                row[o]["delta_to_paper"] = rounded(c["mean"] - ref["value"])
        verdict = claim(cells, ds, arch, params)
        verdicts.append(verdict)
        row["vsgd_best"] = verdict
        row["vsgd_best_strength"] = claim_strength(cells, ds, arch, params)
        table.setdefault(ds, {})[arch] = row
    return {
        "test_acc": table,
        "claim": {
            "holds": sum(v is True for v in verdicts),
            "rows": sum(v is not None for v in verdicts),
        },
        "standing": standing_counts(cells, params),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def rounded(value):
    """Four decimals, enough for an accuracy; None stays None."""
    return None if value is None else round(value, 4)
