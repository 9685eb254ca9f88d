"""A run on a machine that shares no disk with its launcher, against real services on
127.0.0.1: a moto S3 server and an `mlflow server` (SQLite backend, artifacts proxied to S3),
both started through pipeline.services.

The run stages its data from S3, logs to the tracking server, checkpoints to S3, is SIGKILLed,
resumes from the S3 checkpoint while the tracking server is killed and restarted, and ends
exactly as an uninterrupted local run; its result is then found by run hash (store, MLflow).
No credential value may appear anywhere the pipeline writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_spec, untimed

from pipeline import services, storage
from pipeline.contract import RESULTS_ENV

BUCKET = "vsgd-e2e"
SENTINEL = "SENTINEL-secret-7f3a9c1e5b"  # AWS_SECRET_ACCESS_KEY of the run
SENTINEL_MLFLOW = "SENTINEL-mlflow-pw-42d8e1"  # MLflow basic-auth password of the run
VSGD = {
    "name": "vsgd",
    "lr": 0.01,
    "ghattg": 30.0,
    "ps": 1e-8,
    "tau1": 0.81,
    "tau2": 0.9,
    "weight_decay": 0.0,
}
ITERATIONS = 40


class Services:
    """The moto S3 server with the bucket; the `mlflow server` (artifacts proxied to the
    bucket) once `start_mlflow` is called, by the tests that track to it."""

    def __init__(self, root: Path):
        self.root = root
        self.s3, self._s3_proc = services.start_s3(root / "s3")
        services.create_bucket(self.s3.url, BUCKET)
        self.backend = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
        self.mlflow_port = services.free_port()
        self.mlflow = self._mlflow_proc = None

    def start_mlflow(self):
        self.mlflow, self._mlflow_proc = services.start_mlflow(
            self.root / "mlflow",
            self.mlflow_port,
            backend=self.backend,
            artifacts=f"s3://{BUCKET}/mlartifacts",
            s3_endpoint=self.s3.url,
            env=services.MOTO_CREDENTIALS,
        )

    def kill_mlflow(self):
        os.killpg(self.mlflow.pid, signal.SIGKILL)
        self._mlflow_proc.wait(10)

    def stop(self):
        if self.mlflow is not None:
            services.stop(self.mlflow, self._mlflow_proc)
        services.stop(self.s3, self._s3_proc)


@pytest.fixture(scope="module")
def s3_remote(tmp_path_factory):
    """The services with the S3 server alone (the train-stage test tracks to SQLite)."""
    svc = Services(tmp_path_factory.mktemp("services"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def remote(s3_remote):
    """The services with the MLflow tracking server up too."""
    if s3_remote.mlflow is None:
        s3_remote.start_mlflow()
    return s3_remote


def _env(svc, tmp_path) -> dict:
    """A pod's environment: endpoints and credentials only through standard variables."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "AWS_ENDPOINT_URL": svc.s3.url,
        "AWS_ACCESS_KEY_ID": "e2e-access-key",
        "AWS_SECRET_ACCESS_KEY": SENTINEL,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_USERNAME": "e2e",
        "MLFLOW_TRACKING_PASSWORD": SENTINEL_MLFLOW,
        "VSGD_SCRATCH": str(tmp_path / "scratch"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _train(spec: dict, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--spec-json", json.dumps(spec)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def s3_env(remote, monkeypatch):
    """This process talks to the store like the launcher does."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", remote.s3.url)
    for k, v in services.MOTO_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    storage.s3_client.cache_clear()
    yield
    storage.s3_client.cache_clear()


@pytest.mark.slow
@pytest.mark.extended  # parts: test_storage (S3 checkpoints), test_tracking_outage, test_interrupt
def test_remote_run_survives_kill_and_tracking_outage(remote, s3_env, data_root, tmp_path):
    kw = dict(
        iterations=ITERATIONS,
        optimizer=VSGD,
        eval_every=10,
        checkpoint_every=5,
        log_every=1,
        batch_size=8,
    )
    ref = run_spec(data_root, tmp_path / "ref", **kw)
    spec = run_spec(data_root, tmp_path / "pod", tracking_uri=remote.mlflow.url, **kw)
    assert spec["run_hash"] == ref["run_hash"]
    prefix = f"s3://{BUCKET}/e2e"
    # The pod has no copy of the data: it only knows where the store holds it.
    spec["data"]["uri"] = storage.push_dataset(spec["data"]["dir"], prefix)
    spec["data"]["dir"] = "data/prepared/cifar100"
    spec["checkpoint"] = f"{prefix}/checkpoints/{spec['run_hash']}"
    spec["output_dir"] = "out"
    pod = tmp_path / "pod-scratch"
    pod.mkdir()
    env = {**_env(remote, tmp_path), RESULTS_ENV: storage.results_uri(prefix, spec["run_hash"])}
    logs = []

    # An uninterrupted local run, for the expected result.
    ref_env = {k: v for k, v in env.items() if k != RESULTS_ENV}
    p = _train(ref, ref_env, tmp_path)
    logs.append(p.communicate(timeout=180)[0])
    assert p.returncode == 0, logs[-1]

    # First attempt: SIGKILL once a checkpoint is published in S3.
    ckpt = storage.S3CheckpointStore(spec["checkpoint"])
    p = _train(spec, env, pod)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 12/") and ckpt.store.exists("LATEST.json"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(60)
    logs.append("".join(lines))
    assert p.returncode == -signal.SIGKILL, logs[-1]
    assert not (pod / "out" / "metrics.json").exists()

    # Second attempt resumes from S3; the tracking server dies for a few seconds meanwhile.
    p = _train(spec, env, pod)
    lines, outage = [], None
    for line in p.stdout:
        lines.append(line)
        if outage is None and line.startswith("step 16/"):
            remote.kill_mlflow()
            outage = time.monotonic()
        if outage and outage > 0 and time.monotonic() - outage > 3:
            remote.start_mlflow()
            outage = -1.0
    if outage and outage > 0:  # the run ended before 3 s had passed: restart now
        time.sleep(max(0.0, 3 - (time.monotonic() - outage)))
        remote.start_mlflow()
    p.wait(180)
    logs.append("".join(lines))
    assert p.returncode == 0, logs[-1]
    assert outage is not None, logs[-1]
    out = logs[-1]
    assert "resuming" in out and f"at step 10/{ITERATIONS}" in out, out
    assert "MLflow unavailable" in out, out  # the outage was seen, and survived

    # Same result as the uninterrupted run.
    read = lambda d, f: (Path(d) / f).read_text()  # noqa: E731
    m, m_ref = (json.loads(read(d, "metrics.json")) for d in (pod / "out", ref["output_dir"]))
    assert untimed(m) == untimed(m_ref)
    assert read(pod / "out", "curve.csv") == read(ref["output_dir"], "curve.csv")

    # The tracking server holds one FINISHED run with every step exactly once.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=remote.mlflow.url)
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id], f"tags.run_hash = '{spec['run_hash']}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.info.run_id == m["mlflow_run_id"]
    history = lambda key: [x.step for x in client.get_metric_history(run.info.run_id, key)]  # noqa
    assert history("train_loss") == list(range(1, ITERATIONS + 1))
    assert history("test_acc") == list(range(10, ITERATIONS + 1, 10))
    # Its artifacts went through the server into S3.
    objects = storage.open_store(f"s3://{BUCKET}/mlartifacts").list_keys()
    assert any(k.endswith(f"{run.info.run_id}/artifacts/metrics.json") for k in objects)

    # The launcher finds the result by run hash from anywhere: in the store ...
    params = {
        "storage": {"remote": prefix, "endpoint_url": remote.s3.url},
        "tracking": {"uri": remote.mlflow.url, "experiment": "test"},
    }
    found = storage.find_result(params, spec)
    assert found.source == "store" and untimed(found.metrics) == untimed(m)
    fetched = storage.fetch_result(params, spec, tmp_path / "fetched")
    assert read(fetched, "metrics.json") == read(pod / "out", "metrics.json")
    # ... and, without the store's copy, in MLflow.
    results = storage.open_store(storage.results_uri(prefix, spec["run_hash"]))
    for key in results.list_keys():
        results.delete(key)
    found = storage.find_result(params, spec)
    assert found.source == "mlflow" and found.location == run.info.run_id
    fetched = storage.fetch_result(params, spec, tmp_path / "fetched-mlflow")
    assert json.loads(read(fetched, "metrics.json")) == m

    _assert_no_secret(remote, client, tmp_path, logs)


@pytest.mark.slow
def test_train_stage_with_remote_in_params(s3_remote, tmp_path, monkeypatch, place_prepared):
    """`python -m pipeline train` with `storage.remote` and `storage.endpoint_url` set in the
    params only (the environment has credentials, no endpoint): the runs started by the local
    executor stage their data from, checkpoint to and publish their results in the store; a
    machine without the local results then finds the grid done there."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    prefix = f"s3://{BUCKET}/stage"
    sets = [
        "preset=ci",
        "datasets=[cifar100]",
        "archs=[convmixer]",
        "optimizers=[sgd, vsgd]",
        "tune.enabled=false",
        f"storage.remote={prefix}",
        f"storage.endpoint_url={s3_remote.s3.url}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k != "MLFLOW_TRACKING_URI"
    }
    env.update(
        services.MOTO_CREDENTIALS, PYTHONPATH=str(ROOT), VSGD_SCRATCH=str(tmp_path / "scratch")
    )

    def stage(*command):
        args = [sys.executable, "-m", "pipeline", *command]
        for s in sets:
            args += ["--set", s]
        proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    place_prepared(work / "data", "cifar100")  # what `prepare cifar100` makes here
    out = stage("train")
    assert "2 runs in the grid, 0 done, 0 reused, 2 to run" in out, out

    from pipeline.config import load_params
    from pipeline.grid import expand

    monkeypatch.chdir(work)
    params = load_params("params.yaml", sets)
    specs = expand(params)
    assert len(specs) == 2
    for k, v in services.MOTO_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    storage.s3_client.cache_clear()
    bucket = storage.open_store(f"s3://{BUCKET}", s3_remote.s3.url)
    for spec in specs:
        local = json.loads((work / spec["output_dir"] / "metrics.json").read_text())
        published = json.loads(bucket.get_bytes(f"stage/results/{spec['run_hash']}/metrics.json"))
        assert published == local
        assert bucket.exists(f"stage/checkpoints/{spec['run_hash']}/LATEST.json")
        # The run read its data from the store (pushed by the stage), not from ./data.
        config = json.loads((work / spec["output_dir"] / "config.json").read_text())
        staged = Path(config["data"]["dir"])
        assert staged.parent == tmp_path / "scratch" and (staged / "manifest.json").is_file()
        assert spec["data"]["uri"].endswith(f"/{staged.name[:2]}/{staged.name[2:]}.dir")
    assert bucket.list_keys("stage/dvc/files/md5/")

    # Another machine: same params, no local results, finds every run done in the store.
    shutil.rmtree(work / "results")
    out = stage("train")
    assert "2 runs in the grid, 0 done, 2 reused, 0 to run" in out, out
    for spec in specs:
        assert json.loads((work / spec["output_dir"] / "metrics.json").read_text()) == (
            json.loads(bucket.get_bytes(f"stage/results/{spec['run_hash']}/metrics.json"))
        )
    storage.s3_client.cache_clear()


def _assert_no_secret(svc, client, tmp_path, logs):
    """The sentinels in no log, no file written, no S3 object, no MLflow param or tag."""
    needles = [s.encode() for s in (SENTINEL, SENTINEL_MLFLOW)]
    for i, log in enumerate(logs):
        assert not any(n in log.encode() for n in needles), f"secret in log {i}"
    checked = 0
    for root in (tmp_path, svc.root):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(n in data for n in needles), f"secret in {path}"
                checked += 1
    assert checked > 10
    s3 = storage.s3_client()
    for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        r = s3.get_object(Bucket=BUCKET, Key=obj["Key"])
        data = r["Body"].read() + json.dumps(r["Metadata"]).encode()
        assert not any(n in data for n in needles), f"secret in s3://{BUCKET}/{obj['Key']}"
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            text = json.dumps([run.data.params, run.data.tags]).encode()
            assert not any(n in text for n in needles), f"secret in MLflow run {run.info.run_id}"


def test_services_command_up_status_down(tmp_path):
    state = tmp_path / ".services"
    cmd = [sys.executable, "-m", "pipeline", "services"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocess.run(
            [*cmd, *args, "--dir", str(state)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    up = run("up")
    try:
        assert up.returncode == 0, up.stderr
        recorded = json.loads((state / "state.json").read_text())
        assert f"export MLFLOW_TRACKING_URI={recorded['env']['MLFLOW_TRACKING_URI']}" in up.stdout
        assert (state / "env.sh").read_text().count("export ") == 5
        assert run("status").returncode == 0
        assert services._answers(recorded["env"]["MLFLOW_TRACKING_URI"] + "/health")
        again = run("up")
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    pids = [s["pid"] for s in recorded["services"]]
    assert not any(services._alive(services.Service(**s)) for s in recorded["services"]), pids
    assert not (state / "state.json").exists()
    assert run("status").returncode == 3
