"""`python -m pipeline train` (the DVC train stage): run every run of the grid that has no
whole finished result (`pipeline.execute.run_stage`), show the grid's results in
`results/runs/`, and write their final metrics to `results/runs.json` (DVC metrics)."""

import json
from pathlib import Path

from .config import add_params_arguments, load_params
from .execute import check_prepared, run_stage
from .grid import RESULTS_DIR
from .plan import plan
from .results import read_metrics

SUMMARY = Path("results/runs.json")


def add_arguments(parser):
    add_params_arguments(parser)


def run(args) -> int:
    params = load_params(args.params, args.set)
    check_prepared(params, "train")
    specs = plan(params).final
    report = run_stage(params, specs, "train", view=True)
    write_summary(SUMMARY, specs)
    return 1 if report.failed else 0


def write_summary(path: Path, specs: list[dict]) -> None:
    """Final metrics of every finished run of the grid: the train stage's DVC metrics."""
    runs = {}
    for spec in specs:
        m = read_metrics(Path(RESULTS_DIR) / spec["name"])
        if m is None:
            continue
        # Few keys on purpose: `dvc metrics show` / `dvc exp show` print one column each.
        runs[spec["name"]] = {
            k: m[k] for k in ("test_acc", "val_acc", "seconds_per_iter") if m.get(k) is not None
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=2, sort_keys=True) + "\n")
