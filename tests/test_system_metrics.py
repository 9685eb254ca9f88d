"""System metrics (MLflow's `system/...`: CPU, host memory, GPUs) in a run's MLflow run: on
for CUDA runs, off elsewhere unless asked, sampled into the tracker's queue from the moment
the run is open until it ends (finished, stopped or failed), continued after a resume, and
never a reason for a run to fail or wait when the server is unreachable."""

import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import crash_at, fake_prepared, run_spec

from pipeline import grid
from pipeline.config import load_params
from vsgd.spec import ConfigError
from vsgd.system_metrics import SystemMetrics, wanted
from vsgd.tracking import Tracker
from vsgd.trainer import Stopped, train

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CPU = "system/cpu_utilization_percentage"  # MLflow 3.17's name, on every machine
ENABLE = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


@pytest.fixture(autouse=True)
def fast_sampling(monkeypatch):
    """A sample every 50 ms (MLflow's own setting; default 10 s), MLflow's switch unset."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    monkeypatch.delenv(ENABLE, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def samplers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "system-metrics" and t.is_alive()]


def system_steps(uri, run_id, key=CPU) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_on_for_cuda_off_elsewhere_unless_asked(monkeypatch):
    assert wanted("auto", cuda=True) and not wanted("auto", cuda=False)
    assert wanted(True, cuda=False) and not wanted(False, cuda=True)
    monkeypatch.setenv(ENABLE, "true")  # MLflow's own switch decides `auto`, on any device
    assert wanted("auto", cuda=False) and not wanted(False, cuda=False)
    monkeypatch.setenv(ENABLE, "0")
    assert not wanted("auto", cuda=True) and wanted(True, cuda=True)
    monkeypatch.setenv(ENABLE, "sometimes")  # not a boolean: as if unset
    assert wanted("auto", cuda=True) and not wanted("auto", cuda=False)


@pytest.mark.parametrize("setting", ["yes", 1, None])
def test_a_setting_other_than_auto_true_false_is_a_config_error(setting):
    with pytest.raises(ConfigError, match="tracking.system_metrics"):
        Tracker.from_spec({"tracking": {"uri": None, "system_metrics": setting}})


def test_params_carry_the_setting_into_the_spec_not_into_its_identity(tmp_path):
    fake_prepared(tmp_path)
    base = ["preset=ci", f"data.root={tmp_path}", "tune.enabled=false"]
    specs = {
        value: grid.build_spec(
            load_params(PARAMS, [*base, f"tracking.system_metrics={value}"]),
            "cifar100",
            "vgg",
            "sgd",
            seed=0,
        )
        for value in ("auto", "true", "false")
    }
    assert [s["tracking"]["system_metrics"] for s in specs.values()] == ["auto", True, False]
    assert len({s["run_hash"] for s in specs.values()}) == 1
    with pytest.raises(ConfigError, match=r"tracking\.system_metrics: often is not allowed"):
        load_params(PARAMS, [*base, "tracking.system_metrics=often"])


@pytest.mark.parametrize("setting", [True, "auto"])
def test_a_cpu_run_logs_system_metrics_only_when_asked(data_root, tmp_path, setting):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = run_spec(data_root, tmp_path, tracking_uri=uri)
    spec["tracking"]["system_metrics"] = setting
    metrics = train(spec)
    assert not samplers()  # stopped with the run
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(uri).get_run(metrics["mlflow_run_id"]).data.metrics
    system = sorted(key for key in logged if key.startswith("system/"))
    if setting is True:
        assert CPU in system and "system/system_memory_usage_megabytes" in system, system
        steps = system_steps(uri, metrics["mlflow_run_id"])
        assert steps == list(range(len(steps)))
    else:  # auto on a CPU: none, and no sampler thread ever
        assert system == []


# The stopped path ends the sampler through the same finish as the failed one: extended.
@pytest.mark.parametrize("outcome", [pytest.param("stopped", marks=pytest.mark.extended), "failed"])
def test_the_sampler_stops_when_a_run_is_stopped_or_fails(data_root, tmp_path, outcome):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = run_spec(data_root, tmp_path, tracking_uri=uri, iterations=3)
    spec["tracking"]["system_metrics"] = True
    stop = threading.Event()
    if outcome == "stopped":
        stop.set()
        with pytest.raises(Stopped):
            train(spec, stop=stop)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            train(spec, progress=crash_at(1))
    assert not samplers()


class Flaky:
    """An MlflowClient whose every call fails while `down` is set."""

    def __init__(self, client):
        self.client, self.down = client, False

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.down:
                raise ConnectionError("tracking server unreachable")
            return method(*args, **kwargs)

        return call


def sampling_tracker(uri, client) -> Tracker:
    """A tracker of `uri` through `client`, sampling system metrics."""
    tracker = Tracker(uri, "t", client=client)
    tracker.system_metrics = SystemMetrics(True)
    return tracker


SPEC = {
    "name": "r",
    "run_hash": "0123456789abcdef",
    "dataset": "cifar100",
    "arch": "vgg16",
    "arch_key": "vgg",
    "optimizer": {"name": "sgd", "lr": 0.1},
    "seed": 0,
    "data": {"checksum": "c"},
}


def queued(tracker, key=CPU) -> int:
    """How many values of `key` wait in the tracker's queue."""
    return sum(m.key == key for m in list(tracker._queue))


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_samples_taken_while_the_server_is_down_arrive_once_and_a_resume_goes_on(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = {**SPEC, "tracking": {"uri": uri}}
    client = Flaky(MlflowClient(tracking_uri=uri))
    first = sampling_tracker(uri, client)
    first.start(spec)
    client.down = True
    wait_for(lambda: queued(first) >= 5)  # the sampler goes on; its values wait
    began = time.monotonic()
    assert not first.flush()  # the training thread is never held up by it
    assert time.monotonic() - began < 5
    client.down = False
    first._next_try = 0.0  # skip the backoff wait
    first.finish("KILLED")  # then the process stops: its checkpoint keeps the run id
    assert not samplers()
    steps = system_steps(uri, first.run_id)
    assert len(steps) >= 5 and steps == list(range(len(steps)))

    # The resumed process samples on from the step after the last one the run holds.
    second = sampling_tracker(uri, MlflowClient(tracking_uri=uri))
    second.start(spec, run_id=first.run_id)
    wait_for(lambda: len(system_steps(uri, first.run_id)) >= len(steps) + 2)
    second.finish()
    resumed = system_steps(uri, first.run_id)
    assert resumed == list(range(len(resumed)))


def test_a_run_opened_only_after_an_outage_samples_from_then_on(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = {**SPEC, "tracking": {"uri": uri}}
    client = Flaky(MlflowClient(tracking_uri=uri))
    client.down = True
    tracker = sampling_tracker(uri, client)
    tracker.start(spec)  # unreachable: the run is not open, nothing samples yet
    assert tracker.run_id is None and not samplers()
    client.down = False
    tracker._next_try = 0.0
    tracker.log_metrics({"train_loss": 1.0}, 1)
    assert tracker.flush()  # opens the run, and the sampler with it
    wait_for(lambda: len(system_steps(uri, tracker.run_id)) >= 2)
    tracker.finish()
    assert not samplers()
    assert system_steps(uri, tracker.run_id)[:2] == [0, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_compiles_apart_and_logs_gpu_metrics_by_default(
    data_root, tmp_path, monkeypatch
):
    """The defaults on a GPU: compiled (compile auto), its compile step timed apart, and the
    GPU's utilisation and memory in the MLflow run (system_metrics auto)."""
    from mlflow.tracking import MlflowClient
    from test_compile_timing import tiny_model

    from vsgd import engine

    monkeypatch.setattr(engine, "build_model", tiny_model)  # compiles in seconds
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = run_spec(
        data_root,
        tmp_path,
        tracking_uri=uri,
        iterations=8,
        log_every=4,
        device="cuda",
        compile="auto",
    )
    metrics = train(spec)
    assert metrics["compile_seconds"] > 0 and metrics["timed_steps"] == 7
    assert metrics["seconds_per_iter"] < metrics["compile_seconds"]
    logged = MlflowClient(uri).get_run(metrics["mlflow_run_id"]).data.metrics
    assert "system/gpu_0_utilization_percentage" in logged, sorted(logged)
    assert "system/gpu_0_memory_usage_megabytes" in logged and CPU in logged
    assert not samplers()
