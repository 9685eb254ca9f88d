"""Lineage in MLflow's own terms, read back through MlflowClient: the prepared dataset as the
run's dataset input, the code as `mlflow.source.git.commit`, the stage as a tag; and a fresh
SQLite tracking store created by processes that start at the same moment."""

import json
import os
import subprocess
import sys
import time

import mlflow.data
import pytest
from conftest import crash_at, run_spec
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

import vsgd.lineage as lineage
import vsgd.tracking as tracking
from vsgd.checkpoint import LocalCheckpointStore
from vsgd.lineage import dataset_input
from vsgd.tracking import Tracker
from vsgd.tracking_store import ensure_tracking_store
from vsgd.trainer import train

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "BACKOFF", (0.01, 0.05))


def sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_the_runs_dataset_input_names_the_prepared_data(data_root, tmp_path, mlflow_server):
    spec = dict(
        run_spec(data_root, tmp_path, iterations=2, tracking_uri=mlflow_server, validation_size=16),
        stage="train",
    )
    metrics = train(spec)
    run = MlflowClient(tracking_uri=mlflow_server).get_run(metrics["mlflow_run_id"])
    [given] = run.inputs.dataset_inputs
    checksum = spec["data"]["checksum"]
    assert given.dataset.name == "cifar100"
    assert given.dataset.digest == checksum[:36] and len(checksum) == 64
    assert len(given.dataset.digest) <= MAX_DATASET_DIGEST_SIZE
    assert given.dataset.source_type == "local"
    assert json.loads(given.dataset.source) == {
        "uri": str(data_root / "prepared/cifar100"),
        "origin": "synthetic",
    }
    # MLflow reads the source back as its own local dataset source.
    assert mlflow.data.get_source(given).uri == str(data_root / "prepared/cifar100")
    profile = json.loads(given.dataset.profile)
    assert profile["checksum"] == checksum == run.data.tags["data_checksum"]
    assert profile["counts"] == {"train": 256, "test": 64} and profile["classes"] == 100
    assert {t.key: t.value for t in given.tags} == {
        MLFLOW_DATASET_CONTEXT: "training",
        "validation_size": "16",
    }


def test_a_pods_dataset_input_is_the_remote_it_was_staged_from(tmp_path):
    """A pod trains on a scratch copy (`data.dir`); where the data came from is `data.uri`,
    and an official dataset names its archive."""
    prepared = tmp_path / "scratch"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(
        json.dumps(
            {
                "dataset": "cifar100",
                "source": "official",
                "counts": {"train": 50000, "test": 10000},
                "archive": {
                    "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    "md5": "eb9058c3a382ffc7106e4002c42a8d85",
                },
                "checksum": "a" * 64,
            }
        )
    )
    uri = "s3://bucket/vsgd/dvc/files/md5/12/3456789abcdef.dir"
    spec = {
        "dataset": "cifar100",
        "training": {},
        "data": {"dir": str(prepared), "checksum": "a" * 64, "source": "official", "uri": uri},
    }
    dataset = dataset_input(spec).dataset
    assert dataset.source_type == "s3"
    assert json.loads(dataset.source) == {
        "uri": uri,
        "origin": "official",
        "archive": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    }
    assert json.loads(dataset.profile)["counts"] == {"train": 50000, "test": 10000}
    # Without a checksum there is nothing to name the data by: no input.
    assert dataset_input(dict(spec, data=dict(spec["data"], checksum=None))) is None


def test_the_code_is_mlflow_source_git_commit(data_root, tmp_path, monkeypatch):
    """An image has no .git: the commit it was built from comes from its environment."""
    monkeypatch.setenv(lineage.GIT_COMMIT_ENV, COMMIT)
    uri = sqlite(tmp_path)
    client = MlflowClient(tracking_uri=uri)

    def tags_of_a_run(seed):
        t = Tracker(uri, "code")
        t.start(run_spec(data_root, tmp_path, seed=seed, tracking_uri=uri))
        t.finish()
        return client.get_run(t.run_id).data.tags

    tags = tags_of_a_run(0)
    assert tags[MLFLOW_GIT_COMMIT] == COMMIT
    assert tags[MLFLOW_SOURCE_TYPE] == "LOCAL"
    assert tags[MLFLOW_SOURCE_NAME] == lineage.entry_point()  # `python -m` module or script
    assert "git_commit" not in tags  # one place for the commit
    # A commit nobody knows is left out rather than shown as one.
    monkeypatch.setattr(tracking, "git_commit", lambda: "unknown")
    assert MLFLOW_GIT_COMMIT not in tags_of_a_run(1)


def test_the_stage_is_a_tag(data_root, tmp_path):
    uri = sqlite(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    for seed, stage in enumerate(("tune", "train", None)):
        spec = run_spec(data_root, tmp_path, seed=seed, tracking_uri=uri)
        if stage:
            spec["stage"] = stage
        t = Tracker(uri, "stages")
        t.start(spec)
        t.finish()
        run = client.get_run(t.run_id)
        assert run.data.tags.get("stage") == stage, stage  # a spec without it: no tag
        assert "stage" not in run.data.params  # a tag, not also a param


def test_a_resumed_run_logs_its_dataset_once(data_root, tmp_path, monkeypatch):
    uri = sqlite(tmp_path)
    spec = dict(
        run_spec(data_root, tmp_path, iterations=4, tracking_uri=uri, checkpoint_every=2),
        stage="train",
    )
    store = LocalCheckpointStore(spec["checkpoint"])
    calls = []
    log_inputs = MlflowClient.log_inputs
    monkeypatch.setattr(
        MlflowClient,
        "log_inputs",
        lambda self, run_id, *a, **kw: calls.append(run_id) or log_inputs(self, run_id, *a, **kw),
    )
    with pytest.raises(RuntimeError):
        train(spec, checkpoint_store=store, progress=crash_at(3))
    metrics = train(spec, checkpoint_store=store)  # the same MLflow run, from step 2
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.run_id == metrics["mlflow_run_id"] and run.info.status == "FINISHED"
    assert calls == [run.info.run_id]
    assert len(run.inputs.dataset_inputs) == 1


def test_a_refused_dataset_input_leaves_the_run_tracked(data_root, tmp_path, monkeypatch, caplog):
    """A store that refuses the input (an older server, a value over its limits) costs only
    the input: metrics, tags and the run's end are logged."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ENDPOINT_NOT_FOUND

    def refuse(self, *a, **kw):
        raise MlflowException("dataset inputs are not supported", error_code=ENDPOINT_NOT_FOUND)

    monkeypatch.setattr(MlflowClient, "log_inputs", refuse)
    uri = sqlite(tmp_path)
    metrics = train(run_spec(data_root, tmp_path, iterations=2, tracking_uri=uri))
    run = MlflowClient(tracking_uri=uri).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "train_loss" in run.data.metrics
    assert not run.inputs.dataset_inputs
    assert "dataset input was refused" in caplog.text


# Each process waits for the file `go`, then opens the store and creates a run, as a train
# stage's run does when two stages start together on one workspace.
WORKER = """
import os, sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
from vsgd.tracking_store import ensure_tracking_store
go, uri = Path(sys.argv[1]), sys.argv[2]
Path(f"{go}.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.001)
experiment_id = ensure_tracking_store(uri, "race")
MlflowClient(tracking_uri=uri).create_run(experiment_id)
"""


def test_two_processes_creating_a_fresh_sqlite_store_at_once_both_succeed(tmp_path):
    uri, go = sqlite(tmp_path), tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(go), uri],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)  # both imported everything: they start together
    go.touch()
    outputs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    for rc, output in outputs:
        assert rc == 0 and "Traceback" not in output, output
    client = MlflowClient(tracking_uri=uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "race"]
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_ensure_tracking_store_finds_an_experiment_created_meanwhile(tmp_path):
    """Another process (a server's other client) may create the experiment between the
    lookup and the creation: its id is the answer, not an error."""
    uri = sqlite(tmp_path)
    real = MlflowClient(tracking_uri=uri)

    class Late:
        """Sees no experiment at first; creating it, finds that someone else just did."""

        lookups = 0

        def __getattr__(self, name):
            return getattr(real, name)

        def get_experiment_by_name(self, name):
            self.lookups += 1
            return None if self.lookups == 1 else real.get_experiment_by_name(name)

        def create_experiment(self, name):
            real.create_experiment(name)  # the other process
            return real.create_experiment(name)  # RESOURCE_ALREADY_EXISTS

    assert (
        ensure_tracking_store(uri, "x", client=Late())
        == real.get_experiment_by_name("x").experiment_id
    )
