"""MLflow contents of training runs, read back through MlflowClient: params, tags, metric
steps, artifacts, the same run continued after a crash without duplicate steps, failures of
the tracking store that never stop training, and a run against a real `mlflow server`."""

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from conftest import run_spec
from mlflow.tracking import MlflowClient

import vsgd.tracking as tracking
from pipeline.services import free_port
from vsgd.checkpoint import LocalCheckpointStore
from vsgd.tracking import Tracker, flatten
from vsgd.trainer import train

VSGD = {
    "name": "vsgd",
    "lr": 0.01,
    "ghattg": 30.0,
    "ps": 1e-8,
    "tau1": 0.81,
    "tau2": 0.9,
    "weight_decay": 0.0,
}
TAGS = ("dataset", "arch", "arch_key", "optimizer", "seed", "run_hash", "data_checksum")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "BACKOFF", (0.01, 0.05))


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_run_contents_and_resume_without_duplicates(data_root, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = run_spec(
        data_root,
        tmp_path,
        iterations=6,
        optimizer=VSGD,
        tracking_uri=uri,
        eval_every=3,
        checkpoint_every=2,
        validation_size=16,
    )
    store = LocalCheckpointStore(spec["checkpoint"])

    def crash_at_5(step, total, info):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, checkpoint_store=store, progress=crash_at_5)
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "KILLED"
    assert steps(client, run.info.run_id, "train_loss") == [1, 2, 3, 4, 5]

    metrics = train(spec, checkpoint_store=store)  # resumes from step 4, replays step 5
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.run_id == metrics["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == spec["name"]
    rid = run.info.run_id
    for key in ("train_loss", "train_acc", "lr", "images_per_sec"):
        assert sorted(steps(client, rid, key)) == [1, 2, 3, 4, 5, 6], key
    for key in ("test_acc", "test_loss", "val_acc"):
        assert sorted(steps(client, rid, key)) == [3, 6], key
    for key in ("beta1_median", "beta1_mean"):  # beta1_every 2, and the final step
        assert sorted(steps(client, rid, key)) == [2, 4, 6], key
    assert run.data.metrics["test_acc"] == metrics["test_acc"]
    assert run.data.metrics["lr"] == 0.005  # StepLR(3, 0.5)

    params = run.data.params
    assert params["optimizer.name"] == "vsgd" and float(params["optimizer.lr"]) == 0.01
    assert params["schedule.iterations"] == "6" and params["batch_size"] == "8"
    assert params["training.validation_size"] == "16" and params["run_hash"] == spec["run_hash"]
    assert not any(k.startswith("tracking") for k in params)
    tags = run.data.tags
    assert {k: tags[k] for k in TAGS} == {
        "dataset": "cifar100",
        "arch": "convmixer_256_8",
        "arch_key": "convmixer",
        "optimizer": "vsgd",
        "seed": "0",
        "run_hash": spec["run_hash"],
        "data_checksum": spec["data"]["checksum"],
    }
    # The code (tests/test_tracking_lineage.py): a checkout's commit, or none when unknown.
    assert len(tags.get("mlflow.source.git.commit", "x" * 40)) == 40
    # Every result file, so that a result can be fetched back from MLflow whole.
    assert sorted(a.path for a in client.list_artifacts(rid)) == [
        "beta1.csv",
        "config.json",
        "curve.csv",
        "metrics.json",
    ]
    logged = json.loads(
        Path(client.download_artifacts(rid, "metrics.json", str(tmp_path))).read_text()
    )
    assert logged == metrics

    # Without the checkpoint (lost, or another machine), the run is found by its run_hash tag
    # and its steps are not logged twice.
    store.path.unlink()
    again = train(spec, checkpoint_store=store)
    assert again["mlflow_run_id"] == rid
    assert sorted(steps(client, rid, "train_loss")) == [1, 2, 3, 4, 5, 6]
    assert len(client.search_runs([run.info.experiment_id])) == 1


class Flaky:
    """An MlflowClient whose first `failures` calls to each listed method raise."""

    def __init__(self, client, failures, methods=("log_batch", "set_terminated")):
        self.client, self.left = client, {m: failures for m in methods}

    def __getattr__(self, name):
        fn = getattr(self.client, name)
        if name not in self.left:
            return fn

        def call(*args, **kw):
            if self.left[name] > 0:
                self.left[name] -= 1
                raise ConnectionError("tracking server unreachable")
            return fn(*args, **kw)

        return call


def test_failed_posts_are_queued_and_retried(data_root, tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = run_spec(data_root, tmp_path, tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri)
    t = Tracker(uri, "test", client=Flaky(client, failures=3))
    t.start(spec)
    for step in range(1, 4):
        t.log_metrics({"loss": 1.0 / step, "acc": None}, step)
        assert not t.flush()  # fails, queued; training goes on
    t.log_metrics({"loss": 0.1}, 2)  # a step already queued is not queued again
    with caplog.at_level(logging.WARNING, "vsgd.tracking"):
        t.finish()
    assert "MLflow unavailable" in caplog.text
    assert steps(client, t.run_id, "loss") == [1, 2, 3]
    assert "acc" not in client.get_run(t.run_id).data.metrics
    assert client.get_run(t.run_id).info.status == "FINISHED"


class Hanging:
    """An MlflowClient whose metric posts hang until `release` is set (or 30 s pass)."""

    def __init__(self, client):
        self.client, self.release = client, threading.Event()
        self.inside = 0  # metric posts in progress

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_batch(self, run_id, metrics=(), **kw):
        if metrics:
            self.inside += 1
            self.release.wait(30)
            self.inside -= 1
        return self.client.log_batch(run_id, metrics=metrics, **kw)


def test_a_hanging_server_does_not_hold_up_the_training_loop(data_root, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = run_spec(data_root, tmp_path, tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri)
    hanging = Hanging(client)
    t = Tracker(uri, "test", client=hanging)
    t.start(spec)
    t.log_metrics({"loss": 1.0}, 1)
    t.flush_in_background()
    for _ in range(100):  # until the sender is stuck in its post
        if hanging.inside:
            break
        time.sleep(0.05)
    # The training thread goes on logging while the post hangs (a blocking flush would
    # only get here after the 30 s, with the post no longer in progress).
    for step in (2, 3):
        t.log_metrics({"loss": 1.0 / step}, step)
        t.flush_in_background()
    assert hanging.inside == 1
    hanging.release.set()
    t.finish()
    assert steps(client, t.run_id, "loss") == [1, 2, 3]
    assert client.get_run(t.run_id).info.status == "FINISHED"


def test_unreachable_server_never_stops_training(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "FINISH_TIMEOUT", 0.5)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    spec = run_spec(data_root, tmp_path, iterations=2, tracking_uri="sqlite:///unused.db")
    metrics = train(spec)
    assert metrics["mlflow_run_id"] is None
    assert json.loads((Path(spec["output_dir"]) / "metrics.json").read_text()) == metrics
    assert not (tmp_path / "unused.db").exists()  # the environment's URI won


def test_params_hold_no_credentials():
    spec = {
        "data": {"uri": "s3://bucket/x", "endpoint": "http://user:hunter2@minio:9000"},
        "tracking": {"uri": "http://u:p@mlflow"},
        "aws_secret_access_key": "hunter2",
        "storage": {"password": "hunter2", "token": "hunter2"},
        "betas": [0.9, 0.99],
    }
    flat = flatten(spec)
    assert "hunter2" not in json.dumps(flat)
    assert flat == {
        "data.uri": "s3://bucket/x",
        "data.endpoint": "http://minio:9000",
        "betas": "[0.9, 0.99]",
    }


def test_tracking_off_logs_nothing(data_root, tmp_path):
    metrics = train(run_spec(data_root, tmp_path, iterations=1))
    assert metrics["mlflow_run_id"] is None
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlruns").exists()


def test_run_against_a_real_mlflow_server(data_root, tmp_path, mlflow_server):
    spec = run_spec(
        data_root,
        tmp_path,
        iterations=4,
        optimizer=VSGD,
        eval_every=2,
        checkpoint_every=2,
        tracking_uri=mlflow_server,
    )
    store = LocalCheckpointStore(spec["checkpoint"])

    def crash_at_3(step, total, info):
        if step == 3:
            raise RuntimeError("preempted")

    with pytest.raises(RuntimeError):
        train(spec, checkpoint_store=store, progress=crash_at_3)
    metrics = train(spec, checkpoint_store=store)
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["run_hash"] == spec["run_hash"]
    assert sorted(steps(client, run.info.run_id, "train_loss")) == [1, 2, 3, 4]
    assert sorted(steps(client, run.info.run_id, "test_acc")) == [2, 4]
    assert run.data.params["optimizer.ghattg"] == "30.0"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "beta1.csv",
        "config.json",
        "curve.csv",
        "metrics.json",
    ]
