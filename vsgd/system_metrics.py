"""System metrics of a training run in its MLflow run: GPU utilisation and memory, CPU, host
memory, disk and network, so that a GPU left idle or starved shows next to the run's
throughput.

The sampling is MLflow's (`mlflow.system_metrics.SystemMetricsMonitor`: `psutil` for the
host, `nvidia-ml-py` for NVIDIA GPUs; its interval and samples per value follow MLflow's
`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`, default 10 s, and
`MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`), under MLflow's names
(`system/cpu_utilization_percentage`, `system/gpu_0_utilization_percentage`, ...). What is
ours is the loop around it, in a daemon thread: each aggregated sample goes into the
`vsgd.tracking.Tracker`'s queue, sent by its sender thread with the run's other metrics. So an
unreachable server costs what it costs them (queued, retried, never waited for), where
MLflow's own loop would post from its thread and end for good at its first failed request.
Steps count the samples of the run, continued after a resume.

On (`wanted`): the spec's `tracking.system_metrics`: `true`, `false` or `auto` (the default:
as MLflow's `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` says where it is set, else on for a run on
CUDA only, so that CPU runs, the tests among them, have no sampler thread).
"""

import logging
import threading

from .checker import Checker
from .spec import ConfigError

log = logging.getLogger(__name__)

SETTINGS = ("auto", True, False)  # tracking.system_metrics
PREFIX = "system/"  # MLflow's, for every system metric


def wanted(setting, cuda: bool) -> bool:
    """Whether a run samples system metrics: `setting` (one of SETTINGS) for a run on CUDA
    (`cuda`) or elsewhere."""
    if setting != "auto":
        return bool(setting)
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as ENABLE

    if ENABLE.defined:
        try:
            return ENABLE.get()
        except ValueError as exc:  # not a boolean: say so, and decide as if it were unset
            log.warning("%s; system metrics follow the device", exc)
    return cuda


class SystemMetrics:
    """A tracker's system metrics: `decide` (with the run's device), `start` once its MLflow
    run is open, `stop` when it ends. The sampler is a daemon thread: MLflow's monitors
    sampled every interval, each value (an aggregate of `samples_before_logging` samples)
    handed to `log_metrics(metrics, step)`. `stop` ends it at once (it waits only between
    samples), and nothing starts it after `stop`.

    `setting`: one of SETTINGS, else a ConfigError (`tracking.system_metrics`)."""

    def __init__(self, setting="auto"):
        check = Checker()
        if not check.choice(setting, "tracking.system_metrics", SETTINGS):
            raise ConfigError(check.problems)
        self.setting, self.on = setting, False
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None

    def decide(self, cuda: bool) -> None:
        self.on = wanted(self.setting, cuda)

    def start(self, run_id: str, uri: str, held: dict[str, int], log_metrics) -> None:
        """Sample for the run `run_id` at `uri` (where wanted), from the step after the last
        system metric step the run holds (`held`: key -> last step)."""
        with self._lock:
            if not self.on or self._thread is not None or self._stop.is_set():
                return
            first = max((s for k, s in held.items() if k.startswith(PREFIX)), default=-1) + 1
            self._thread = threading.Thread(
                target=self._loop,
                args=(run_id, uri, first, log_metrics),
                name="system-metrics",
                daemon=True,
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _loop(self, run_id: str, uri: str, step: int, log_metrics) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Built here, not in the thread that opened the run: it starts the GPU library.
            monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
            prefix = PREFIX + (f"{monitor.node_id}/" if monitor.node_id else "")
            log.info(
                "MLflow system metrics every %g s (%s)",
                monitor.sampling_interval,
                ", ".join(type(m).__name__ for m in monitor.monitors),
            )
            while not self._stop.is_set():
                for _ in range(monitor.samples_before_logging):
                    monitor.collect_metrics()
                    if self._stop.wait(monitor.sampling_interval):
                        return
                values = monitor.aggregate_metrics()
                for m in monitor.monitors:
                    m.clear_metrics()
                log_metrics({prefix + key: value for key, value in values.items()}, step)
                step += 1
        except Exception as exc:  # noqa: BLE001 - system metrics never end the run
            log.warning("MLflow system metrics stopped: %s: %s", type(exc).__name__, exc)
