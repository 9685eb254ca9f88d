"""Finished results in the remote store, by run hash: where a run publishes (`run_env`,
`publish_result`), and how a launcher finds and fetches one (the store, then MLflow).
"""

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vsgd.tracking import mlflow_http_settings, tracking_uri

from ..contract import ENDPOINT_ENV, RESULTS_ENV
from ..redact import redact
from .objects import open_store

log = logging.getLogger(__name__)

RESULTS_PREFIX = "results"
# A run's result files; metrics.json last: it marks the run done. beta1.csv: VSGD runs only;
# train.log (pipeline.train.LOG_NAME): the run's log, where the executor or the run kept one.
RESULT_FILES = ("config.json", "curve.csv", "beta1.csv", "train.log", "metrics.json")


def results_uri(remote: str, run_hash: str) -> str:
    return f"{remote.rstrip('/')}/{RESULTS_PREFIX}/{run_hash}"


def run_env(params: dict, spec: dict) -> dict:
    """What a run started on this machine needs in its environment to use the remote store
    of params.yaml: where to publish its results and, for an S3-compatible service, the
    endpoint (a run reads its checkpoint and data URIs from the spec, the endpoint from
    here). Empty without `storage.remote`."""
    remote = params["storage"]["remote"]
    if not remote:
        return {}
    env = {RESULTS_ENV: results_uri(remote, spec["run_hash"])}
    if params["storage"].get("endpoint_url"):
        env[ENDPOINT_ENV] = params["storage"]["endpoint_url"]
    return env


def publish_result(
    output_dir, uri: str | None = None, endpoint_url: str | None = None
) -> str | None:
    """Copy a finished run's files to `uri` (default: $VSGD_RESULTS_URI); None without one.
    metrics.json goes last: a result with metrics.json is complete."""
    uri = uri or os.environ.get(RESULTS_ENV)
    if not uri:
        return None
    store = open_store(uri.rstrip("/"), endpoint_url)
    for name in RESULT_FILES:
        path = Path(output_dir) / name
        if path.is_file():
            store.put_file(name, path)
    return store.uri


@dataclass
class Result:
    run_hash: str
    source: str  # "store" or "mlflow"
    location: str  # results URI or MLflow run id
    metrics: dict | None = None


def find_result(params: dict, spec: dict) -> Result | None:
    """A finished result of `spec`'s run hash: `<storage.remote>/results/<hash>/metrics.json`,
    else a FINISHED MLflow run tagged with the hash that holds metrics.json as an artifact."""
    remote, endpoint = params["storage"]["remote"], params["storage"].get("endpoint_url")
    if remote:
        uri = results_uri(remote, spec["run_hash"])
        raw = open_store(uri, endpoint).get_bytes("metrics.json")
        if raw is not None:
            # Anything there is the run's result, to be checked once fetched: a damaged one
            # is then set aside and the run trained again, not taken for "no result".
            try:
                metrics = json.loads(raw)
            except ValueError:
                metrics = None
            return Result(
                spec["run_hash"], "store", uri, metrics if isinstance(metrics, dict) else None
            )
    return _find_in_mlflow(params, spec["run_hash"])


def _tracking_uri(params: dict) -> str | None:
    uri = tracking_uri(params["tracking"]["uri"])
    if uri is None:
        return None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return None  # nothing tracked yet; opening it would create an empty database
    return uri


def _find_in_mlflow(params: dict, run_hash: str) -> Result | None:
    uri = _tracking_uri(params)
    if uri is None:
        return None
    from mlflow.tracking import MlflowClient

    try:
        with mlflow_http_settings():
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(params["tracking"]["experiment"])
            if exp is None:
                return None
            runs = client.search_runs(
                [exp.experiment_id],
                f"tags.run_hash = '{run_hash}' and attributes.status = 'FINISHED'",
                order_by=["attributes.end_time DESC"],
                max_results=5,
            )
            for run in runs:
                if any(a.path == "metrics.json" for a in client.list_artifacts(run.info.run_id)):
                    return Result(run_hash, "mlflow", run.info.run_id)
    except Exception as exc:  # noqa: BLE001 - a tracking outage only means "not known there"
        log.warning(
            "MLflow lookup of run %s failed (%s); treating it as not finished",
            run_hash,
            redact(str(exc).splitlines()[0] if str(exc) else repr(exc)),
        )
    return None


def fetch_result(params: dict, spec: dict, output_dir=None, result: Result | None = None) -> Path:
    """Copy the finished result of `spec` (`result`, else looked up with `find_result`) into
    `output_dir` (default: the spec's); FileNotFoundError if there is none. The copy is not
    checked here: `pipeline.results` decides whether it is whole."""
    result = result or find_result(params, spec)
    if result is None:
        raise FileNotFoundError(
            f"no finished result for run {spec['run_hash']} "
            f"({spec.get('name')}) in the store or MLflow"
        )
    dest = Path(output_dir or spec["output_dir"])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as tmp:
        if result.source == "store":
            store = open_store(result.location, params["storage"].get("endpoint_url"))
            for name in RESULT_FILES:
                if store.exists(name):
                    store.get_file(name, Path(tmp) / name)
        else:
            import mlflow.artifacts

            for name in RESULT_FILES:
                try:
                    with mlflow_http_settings():
                        mlflow.artifacts.download_artifacts(
                            run_id=result.location,
                            artifact_path=name,
                            dst_path=tmp,
                            tracking_uri=_tracking_uri(params),
                        )
                except Exception:  # noqa: BLE001 - curve/config are optional artifacts
                    if name == "metrics.json":
                        raise
        for name in RESULT_FILES:  # metrics.json last, as everywhere
            if (Path(tmp) / name).is_file():
                os.replace(Path(tmp) / name, dest / name)
    return dest
