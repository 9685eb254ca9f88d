"""MLflow for the trainer: one MLflow run per training run, continued on resume, never fatal.

* The run is found again after a restart by the id stored in the checkpoint, else by the
  `run_hash` tag, else created. Params already in the run are not logged again (MLflow
  refuses to change one), and a metric step is only logged if it is beyond the last step the
  run holds for that key, so replaying iterations after a resume adds no duplicates.
* Every call into MLflow is caught. Metrics go into a bounded queue; at each log point the
  trainer hands it to a background sender thread (`flush_in_background`), so a slow or
  hanging server never holds up training. After a failure the next attempt waits an
  exponentially growing backoff, and `finish` keeps retrying for a while before giving up.
  A run that cannot reach its server at start is created later, at a flush.
* Params are the flattened spec minus the `tracking` section, the `stage` (a tag) and
  anything that looks like a credential; URLs lose their `user:password@` part.
* Lineage in MLflow's own terms, so its UI shows what a run was trained on: the prepared
  dataset is the run's dataset input (name, the manifest checksum as digest, where it came
  from as source; logged once per run), the code is `mlflow.source.git.commit` with the
  entry point as `mlflow.source.name`, and the stage that asked for the run is the tag
  `stage`.
* A SQLite store is created (schema migrations) and its experiment found or created under a
  file lock next to the database (`ensure_tracking_store`): parallel runs, or two stages
  started at once, would otherwise run the migrations together and fail.
* System metrics (GPU, CPU, memory: `vsgd.system_metrics`), where the spec's
  `tracking.system_metrics` asks (auto: runs on CUDA), are sampled from the moment the run is
  open until `finish`, and queued and sent with the other metrics.
"""

import collections
import contextlib
import importlib.util
import json
import logging
import os
import re
import threading
import time

from .lineage import dataset_input, entry_point, git_commit
from .lineage import without_userinfo as _redact
from .spec import STAGE_KEY
from .system_metrics import SystemMetrics
from .tracking_store import DEFAULT_EXPERIMENT, ensure_tracking_store

log = logging.getLogger(__name__)

MAX_QUEUE = 100_000  # buffered metric values while the server is unreachable
BATCH = 1000  # MLflow's limit of metrics per log_batch
BACKOFF = (1.0, 60.0)  # first and largest wait between attempts, seconds
FINISH_TIMEOUT = 120.0  # how long `finish` keeps retrying
SECRET_KEY = re.compile(r"pass(word)?|secret|token|credential|access_key|key_id|api_key", re.I)
# HTTP statuses of a request the store will never accept (a bad value, an endpoint an older
# server lacks, not implemented): retrying it would keep the run from ever opening.
REFUSED = (400, 404, 501)


# MLflow's client retries for the pipeline's own calls (result lookups, the export): a few
# quick ones. Its default (7 retries, backoff factor 2) waits minutes per call while a server
# is down. (Training runs set theirs in `Tracker.start`: they queue and retry themselves.)
MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@contextlib.contextmanager
def mlflow_http_settings():
    """MLFLOW_HTTP_ENV for the calls inside (the user's own settings win)."""
    added = {k: v for k, v in MLFLOW_HTTP_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def tracking_uri(configured: str | None) -> str | None:
    """The MLflow tracking URI to use: `MLFLOW_TRACKING_URI` over the configured one
    (params.yaml's `tracking.uri`, a spec's `tracking.uri`); None when neither is set.
    The one place that rule lives: the trainer, the pipeline stages and the result lookup
    all call it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or None


def flatten(spec: dict, prefix: str = "") -> dict[str, str]:
    """Nested spec -> {"optimizer.lr": "0.1", ...}; lists as JSON; no secrets, no tracking,
    no stage (the tag `stage`: which stage asked for a run is no setting of it)."""
    out = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if name in ("tracking", STAGE_KEY) or SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = _redact(text)
    return out


class Tracker:
    """`start` -> `log_metrics` + `flush_in_background` (or `flush`) at log points ->
    `set_tags` (outcomes such as `diverged`), `log_artifacts` -> `finish`.

    With `uri=None` every method does nothing, so the trainer has one code path.
    `client` replaces the MlflowClient (tests inject failures through it).
    Thread-safety: `_lock` guards the queue, the last-step table and the sender's start; the
    training thread and the system metrics sampler fill the queue; `_io` serialises every
    call into MLflow (sender thread or caller).
    """

    def __init__(self, uri: str | None, experiment: str = DEFAULT_EXPERIMENT, *, client=None):
        self.uri, self.experiment = uri, experiment
        self.system_metrics = SystemMetrics()  # the spec's setting: `from_spec`
        self.run_id: str | None = None
        self._opened = False  # run_id may come from a checkpoint before the run is reached
        self._client = client
        self._spec: dict | None = None
        self._last_step: dict[str, int] = {}
        self._queue: collections.deque = collections.deque()
        self._dropped = 0
        self._delay = BACKOFF[0]
        self._next_try = 0.0
        self._lock, self._io = threading.Lock(), threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._sender: threading.Thread | None = None

    @classmethod
    def from_spec(cls, spec: dict) -> "Tracker":
        """Tracking as the spec asks: `tracking.uri` (the environment's
        `MLFLOW_TRACKING_URI` over it), off when the spec says `uri: null`. A spec without a
        `tracking` section tracks only where the environment names a server: nothing is
        written to ./mlflow.db unless asked. `tracking.system_metrics` (default auto):
        `vsgd.system_metrics`; any other value is a ConfigError."""
        tracking = spec.get("tracking") or {}
        off = "uri" in tracking and not tracking["uri"]
        tracker = cls(
            None if off else tracking_uri(tracking.get("uri")),
            tracking.get("experiment") or DEFAULT_EXPERIMENT,
        )
        tracker.system_metrics = SystemMetrics(tracking.get("system_metrics", "auto"))
        return tracker

    @property
    def enabled(self) -> bool:
        return self.uri is not None

    # -- public API -------------------------------------------------------------------------

    def start(self, spec: dict, run_id: str | None = None, *, cuda: bool = False) -> None:
        """Open (or find again) the run of `spec`; `run_id` comes from a checkpoint. `cuda`:
        the run trains on CUDA (system metrics are sampled for it by default)."""
        if not self.enabled:
            log.info("MLflow tracking is off (no tracking URI in the spec or MLFLOW_TRACKING_URI)")
            return
        if importlib.util.find_spec("mlflow") is None:
            # The library does not depend on MLflow: without it, train untracked.
            log.info(
                "MLflow tracking is off: mlflow is not installed "
                "(pip install 'vsgd-repro[pipeline]' to track to %s)",
                _redact(self.uri),
            )
            self.uri = None
            return
        self._spec, self.run_id = spec, run_id
        self.system_metrics.decide(cuda)
        # MLflow's own HTTP retries (7 with backoff factor 2) would stall training for
        # minutes while a server is down; we retry ourselves, so keep its retries short.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        with self._io:
            self._attempt(self._open_run)

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        """Queue the values (None skipped) for `step`; sent at the next `flush`."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if value is None or step <= self._last_step.get(key, -1):
                    continue
                self._last_step[key] = step
                if len(self._queue) >= MAX_QUEUE:
                    self._queue.popleft()
                    self._dropped += 1
                self._queue.append(Metric(key, float(value), now, step))

    def flush(self) -> bool:
        """Send what is queued now, unless a recent failure says to wait; True when all
        sent. Blocks for as long as the server takes."""
        if not self.enabled:
            return True
        with self._io:
            if time.monotonic() < self._next_try:
                return False
            return self._attempt(self._send)

    def flush_in_background(self) -> None:
        """Have the sender thread `flush`; returns at once."""
        if not self.enabled:
            return
        with self._lock:  # the training thread and the sampler both call it
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, name="mlflow-sender", daemon=True
                )
                self._sender.start()
        self._wake.set()

    def log_artifacts(self, paths) -> None:
        if not self.enabled:
            return
        for path in paths:
            if not self._retrying(lambda p=path: self._upload(p), FINISH_TIMEOUT / 4):
                log.warning("MLflow: could not upload %s", path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the run (an outcome known only at the end, e.g. `diverged`); retried like an
        artifact upload, never fatal."""
        if not self.enabled:
            return
        if not self._retrying(lambda: self._tag(tags), FINISH_TIMEOUT / 4):
            log.warning("MLflow: could not set tags %s", ", ".join(tags))

    def finish(self, status: str = "FINISHED") -> None:
        """Stop the sender, flush everything (retrying up to FINISH_TIMEOUT) and end the run
        with `status`. The system metrics sampler stops first."""
        if not self.enabled:
            return
        self.system_metrics.stop()
        if self._sender is not None:
            self._stop.set()
            self._wake.set()
            self._sender.join()  # at most one request's timeout
            self._sender = None
        if self._dropped:
            log.warning(
                "MLflow: %d metric values were dropped while the tracking server was unreachable",
                self._dropped,
            )
        if not self._retrying(lambda: self._send() and self._terminate(status), FINISH_TIMEOUT):
            log.warning(
                "MLflow: could not finish run %s at %s; the results on disk are complete",
                self.run_id,
                _redact(self.uri),
            )

    # -- internals --------------------------------------------------------------------------

    def _attempt(self, fn) -> bool:
        try:
            ok = bool(fn())
        except Exception as exc:  # noqa: BLE001 - tracking must never end a training run
            self._next_try = time.monotonic() + self._delay
            log.warning(
                "MLflow unavailable (%s: %s); %d values queued, next try in %.0f s",
                type(exc).__name__,
                _first_line(exc),
                len(self._queue),
                self._delay,
            )
            self._delay = min(2 * self._delay, BACKOFF[1])
            return False
        self._delay, self._next_try = BACKOFF[0], 0.0
        return ok

    def _send_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            self.flush()

    def _retrying(self, fn, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._locked_attempt(fn):
            wait = self._next_try - time.monotonic()
            if time.monotonic() + wait > deadline:
                return False
            time.sleep(max(wait, 0.0))
        return True

    def _locked_attempt(self, fn) -> bool:
        with self._io:
            return self._attempt(fn)

    def _upload(self, path) -> bool:
        self._ensure_run()
        self._client.log_artifact(self.run_id, str(path))
        return True

    def _tag(self, tags: dict[str, str]) -> bool:
        from mlflow.entities import RunTag

        self._ensure_run()
        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return True

    def _terminate(self, status: str) -> bool:
        self._ensure_run()
        self._client.set_terminated(self.run_id, status)
        return True

    def _ensure_run(self) -> bool:
        return self._opened or self._open_run()

    def _open_run(self) -> bool:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        # Creates a fresh SQLite store under its lock; the client made after it finds the
        # store complete.
        exp_id = ensure_tracking_store(self.uri, self.experiment, client=self._client)
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        client, spec = self._client, self._spec
        run = None
        if self.run_id:
            try:
                run = client.get_run(self.run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            if run is not None and run.info.lifecycle_stage != "active":
                run = None
        if run is None:
            found = client.search_runs(
                [exp_id],
                f"tags.run_hash = '{spec['run_hash']}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            run = found[0] if found else client.create_run(exp_id, run_name=spec["name"])
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        # Resume: drop queued values of steps the run already holds, and never queue them.
        held = {
            key: max(m.step for m in client.get_metric_history(self.run_id, key))
            for key in run.data.metrics
        }
        with self._lock:
            self._queue = collections.deque(m for m in self._queue if m.step > held.get(m.key, -1))
            for key, step in held.items():
                self._last_step[key] = max(step, self._last_step.get(key, -1))
        self._log_params_and_tags(run)
        self._log_dataset(run)
        self._opened = True
        log.info("MLflow run %s at %s", self.run_id, _redact(self.uri))
        self.system_metrics.start(self.run_id, self.uri, held, self._log_system_metrics)
        return True

    def _log_system_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_metrics(metrics, step)
        self.flush_in_background()  # the training thread may not reach a log point soon

    def _log_params_and_tags(self, run) -> None:
        from mlflow.entities import Param, RunTag, SourceType
        from mlflow.utils.mlflow_tags import (
            MLFLOW_GIT_COMMIT,
            MLFLOW_RUN_NAME,
            MLFLOW_SOURCE_NAME,
            MLFLOW_SOURCE_TYPE,
        )

        spec, held = self._spec, run.data.params
        params = flatten(spec)
        changed = sorted(k for k, v in params.items() if k in held and held[k] != v)
        if changed:
            log.info("MLflow: keeping the run's original params %s", ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in held]
        tags = {
            "dataset": spec["dataset"],
            "arch": spec["arch"],
            "arch_key": spec["arch_key"],
            "optimizer": spec["optimizer"]["name"],
            "seed": str(spec["seed"]),
            "run_hash": spec["run_hash"],
            "data_checksum": str(spec["data"].get("checksum")),
            MLFLOW_RUN_NAME: spec["name"],
            MLFLOW_SOURCE_NAME: entry_point(),
            MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
        }
        commit = git_commit()
        if commit != "unknown":  # MLflow's UI would show it as a commit
            tags[MLFLOW_GIT_COMMIT] = commit
        if spec.get(STAGE_KEY):  # older specs have none
            tags[STAGE_KEY] = spec[STAGE_KEY]
        tags = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(new), 1), 100):  # MLflow's limit of params per batch
            self._client.log_batch(
                self.run_id, params=new[i : i + 100], tags=tags if i == 0 else []
            )

    def _log_dataset(self, run) -> None:
        """The run's dataset input, unless the run holds it already (a resumed run). A store
        that refuses it (an older server without dataset inputs, a value over its limits)
        costs only the input, with a warning: the run and its metrics go on. Other failures
        (unreachable) are retried with the rest of the opening."""
        from mlflow.exceptions import MlflowException

        wanted = dataset_input(self._spec)
        held = run.inputs.dataset_inputs if run.inputs else []
        if wanted is None or any(
            (i.dataset.name, i.dataset.digest) == (wanted.dataset.name, wanted.dataset.digest)
            for i in held
        ):
            return
        try:
            self._client.log_inputs(self.run_id, datasets=[wanted])
        except MlflowException as exc:
            if exc.get_http_status_code() not in REFUSED:
                raise
            log.warning(
                "MLflow: the run's dataset input was refused (%s); the run is tracked without it",
                _first_line(exc),
            )

    def _send(self) -> bool:
        # Called with `_io` held: only the training thread changes the queue meanwhile, by
        # appending or, when full, dropping the oldest values (counted in `_dropped`).
        if not self._queue:
            return True
        if not self._ensure_run():
            return False
        while True:
            with self._lock:
                batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
                dropped = self._dropped
            if not batch:
                return True
            self._client.log_batch(self.run_id, metrics=batch)
            with self._lock:
                for _ in range(len(batch) - (self._dropped - dropped)):
                    self._queue.popleft()


def _first_line(exc: BaseException) -> str:
    """An error's first line, cut short and without URL credentials, for a log line."""
    return _redact((str(exc).splitlines() or [""])[0][:200])
