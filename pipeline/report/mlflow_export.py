"""Every MLflow run of the tracking experiment (params, tags, latest metrics) in one CSV,
`results/mlflow_runs.csv`.

The export comes last and never costs the rest: with the tracking store unreachable the
tables and figures are written all the same, one warning line on stderr says what failed,
summary.json records `"mlflow_export": {"complete": false, ...}` and the CSV holds the runs
fetched until then (possibly none); the stage still exits 0.

mlflow is imported in the functions that use it: its import takes about a second, and
`--help`, `--no-mlflow` and a grid without a tracking URI never need it."""

import sys
from pathlib import Path

from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import Timeout
from urllib3.exceptions import HTTPError as Urllib3Error

from vsgd.tracking import mlflow_http_settings, tracking_uri

from ..redact import redact
from .table import write_csv

LINEAGE_TAGS = ("mlflow.source.git.commit",)  # kept in mlflow_runs.csv
REDO = (
    "re-run `python -m pipeline aggregate` (or `dvc repro --force aggregate`) once the "
    "tracking server is reachable"
)


def export_status(params, path: Path) -> dict:
    """Run `export_mlflow` and say how it went, for summary.json: `{"complete": true,
    "runs": N}`, or, when the tracking store cannot be reached or fails, `{"complete":
    false, "uri", "cause", "runs"}` (the runs fetched before it failed, which the CSV holds)
    after one warning line on stderr. Anything else (a bug) is raised. (Not "error": `dvc
    metrics show` takes a key of that name for a failure to read the file.)"""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params["tracking"]["uri"])
    if uri is None:
        return {"complete": False, "skipped": True, "reason": "no tracking URI"}
    fetched: list[dict] = []
    try:
        with mlflow_http_settings():
            n = export_mlflow(params, path, fetched)
    except (MlflowException, RequestsConnectionError, Timeout, Urllib3Error, OSError) as exc:
        shown, cause = redact(uri), innermost_cause(exc)
        print(
            f"aggregate: warning: MLflow export incomplete: tracking store {shown} failed "
            f"({cause}); {path} holds only the {len(fetched)} runs fetched before that; "
            f"the tables and figure are complete; {REDO}",
            file=sys.stderr,
            flush=True,
        )
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
            page = client.search_runs(
                [experiment.experiment_id],
                max_results=1000,
                page_token=token,
                order_by=["attributes.start_time ASC"],
            )
            for r in page:
                row = {
                    "run_id": r.info.run_id,
                    "run_name": r.info.run_name,
                    "status": r.info.status,
                    "start_time": r.info.start_time,
                    "end_time": r.info.end_time,
                }
                # MLflow's own tags are its bookkeeping, except the lineage it shows:
                # the commit each run's code came from.
                row.update(
                    {
                        f"tags.{k}": v
                        for k, v in r.data.tags.items()
                        if not k.startswith("mlflow.") or k in LINEAGE_TAGS
                    }
                )
                row.update({f"params.{k}": v for k, v in r.data.params.items()})
                row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
                rows.append(row)
            token = page.token
            if not token:
                break
    finally:
        fields = list(
            dict.fromkeys(
                ["run_id", "run_name", "status", "start_time", "end_time"]
                + sorted({k for row in rows for k in row})
            )
        )
        write_csv(path, rows, fields=fields)
    return len(rows)


def innermost_cause(exc: BaseException) -> str:
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
