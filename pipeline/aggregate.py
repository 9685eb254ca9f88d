"""`python -m pipeline aggregate`: the paper's results from the finished runs in
`results/runs/`, written by `pipeline.report`: Table 1, the differences between optimizers
and their standing, Table 2, the figures with their per-cell CSVs, `summary.json`, and every
MLflow run in a CSV (last: an unreachable tracking store costs only the export)."""

from pathlib import Path

from .config import load_params
from .report.cells import build_cells
from .report.differences import build_differences, build_standing
from .report.figures import write_beta1, write_curves, write_sensitivity, write_test_acc
from .report.mlflow_export import export_status
from .report.runs import comparable_references, load_references, load_runs
from .report.summary import build_summary, write_json
from .report.table1 import build_table1
from .report.table2 import build_table2
from .timing_results import load as load_timing

RESULTS = Path("results")


def add_arguments(parser):
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. datasets=[cifar100] (repeatable)",
    )
    parser.add_argument(
        "--results",
        default=str(RESULTS),
        help="results directory: runs are read from <results>/runs, tables, "
        "figures, curves, summary.json and mlflow_runs.csv are written "
        f"there (default: {RESULTS})",
    )
    parser.add_argument(
        "--no-mlflow",
        action="store_true",
        help="skip the MLflow export (summary.json records it as skipped; "
        "mlflow_runs.csv is left as it is)",
    )


def run(args) -> int:
    params = load_params(args.params, args.set, build_imported=False)
    root = Path(args.results)
    runs = load_runs(root / "runs", params)
    cells = build_cells(runs, params)
    refs = comparable_references(load_references(), params)
    for table in (
        build_table1(cells, params, refs),
        build_differences(cells, params),
        build_standing(cells, params),
        build_table2(cells, params, load_timing(root / "timing")),
    ):
        table.write(root / "tables")
    write_sensitivity(params, root / "tuning" / "tuning.csv", root / "figures")
    write_curves(cells, root / "curves")
    write_test_acc(cells, params, refs, root / "figures")
    write_beta1(cells, params, root / "beta1", root / "figures")
    summary = build_summary(cells, params, refs)
    print(
        f"aggregate: {len(runs)} runs, {sum(1 for c in cells.values() if c['n'])} cells; "
        f"VSGD best in {summary['claim']['holds']} of {summary['claim']['rows']} rows"
    )
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
