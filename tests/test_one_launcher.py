"""One launcher per run, whatever starts it: two stages at once, a stage and a run started by
hand, gc during a run, two machines sharing a remote store. Real processes throughout: the
lock is the kernel's (flock) and the lease the store's (conditional writes), and threads of
one process would share what processes do not."""

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_spec, write_result

from pipeline import lease as leases
from pipeline.runlock import RunLock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)
# The grid of the two-stage test: two runs of a few steps each, tracked in SQLite.
GRID = [
    "preset=ci",
    "data.root=data",
    "datasets=[cifar100]",
    "archs=[vgg]",
    "optimizers=[sgd,adam]",
    "tune.enabled=false",
    "executor.max_parallel=1",
    "protocol.cifar100.schedule={iterations: 4, step_size: 2, gamma: 0.5}",
    "tracking.uri=sqlite:///mlflow.db",
]


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture
def workspace(tmp_path, place_prepared):
    """A project directory with params.yaml and the grid's dataset prepared (the session's
    copy: what `python -m pipeline prepare cifar100` makes at the ci preset)."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    place_prepared(tmp_path / "data", "cifar100")
    return tmp_path


def mlflow_runs(workspace) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vsgd-repro")
    return client.search_runs([experiment.experiment_id])


def test_two_train_stages_started_together_train_each_run_once(workspace):
    cmd = [sys.executable, "-m", "pipeline", "train", *sets(GRID)]
    stages = [
        subprocess.Popen(
            cmd, cwd=workspace, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [stage.communicate(timeout=300)[0] for stage in stages]
    assert [stage.returncode for stage in stages] == [0, 0], outputs
    assert "Traceback" not in "".join(outputs)
    stored = sorted((workspace / "results" / "store").glob("*/metrics.json"))
    assert len(stored) == 2
    # One MLflow run per run, not two.
    runs = mlflow_runs(workspace)
    assert sorted(r.data.tags["run_hash"] for r in runs) == sorted(p.parent.name for p in stored), [
        r.info.run_id for r in runs
    ]
    for metrics in stored:
        log = (metrics.parent / "train.log").read_text()
        # One training of it, and nothing of the other launcher in its log.
        assert log.count("step 4/4 ") == 1, log
        assert "another launcher" not in log and "waiting" not in log
    # The stage that came second said so, for the run it found held or finished.
    said = "".join(outputs)
    assert "another launcher" in said or "2 reused" in said or "2 done" in said, said


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.runlock import RunLock
    lock = RunLock(sys.argv[1])
    assert lock.try_acquire()
    Path(sys.argv[2]).write_text("held")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
""")


def hold(lock_file, tmp_path):
    """Another process holding a run lock until `release()`."""
    held, release = tmp_path / "held", tmp_path / "release"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_file), str(held), str(release)], env=ENV
    )
    deadline = time.monotonic() + 30
    while not held.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)

    def let_go():
        release.write_text("go")
        proc.wait(timeout=30)

    return let_go


def test_a_run_started_by_hand_waits_for_the_launcher_holding_it(data_root, tmp_path):
    """`python -m pipeline.train` while another launcher trains the run: it waits, and when
    that launcher has finished the run it trains nothing (no second MLflow run, no second
    training in the log)."""
    spec = run_spec(data_root, tmp_path, iterations=2)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    let_go = hold(RunLock.of(spec).path, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--spec", str(spec_file)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(3)
    assert proc.poll() is None  # waiting, not training
    assert not Path(spec["output_dir"]).exists()
    write_result(spec["output_dir"], spec)  # what the other launcher finished meanwhile
    let_go()
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "another launcher is training it (pid" in out
    assert "finished by another launcher" in out and "step 1/2" not in out


def test_gc_keeps_what_a_running_run_holds(tmp_path, monkeypatch, capsys):
    from conftest import fake_prepared

    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_prepared(tmp_path / "data")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    # A run of another grid, in progress: its spec, log and checkpoint, no result yet.
    running = tmp_path / "results" / "store" / "0123456789abcdef"
    running.mkdir(parents=True)
    (running / "spec.json").write_text("{}")
    (running / "train.log").write_text("step 3/10\n")
    checkpoint = tmp_path / "checkpoints" / "0123456789abcdef"
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.pt").write_bytes(b"state")
    let_go = hold(
        RunLock(tmp_path / "results" / "store" / ".locks" / "0123456789abcdef.lock").path, tmp_path
    )
    args = ["gc", *sets(["preset=ci", "data.root=data", "tune.enabled=false"])]
    try:
        assert main(args) == 0
        out = capsys.readouterr().out
        assert out.count("its run is in progress (pid ") == 2, out
        assert (running / "spec.json").exists() and (running / "train.log").exists()
        assert (checkpoint / "checkpoint.pt").exists()
    finally:
        let_go()
    assert main(args) == 0  # once the run has ended, gc removes them
    assert not running.exists() and not checkpoint.exists()


# ---------------------------------------------------------------------------------------------
# two machines sharing a remote store


@pytest.fixture(scope="module")
def moto_server():
    """A moto S3 server on 127.0.0.1 for the module's tests (each test empties it: `s3`);
    yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """The moto S3 server with a bucket, in this process's environment; yields its
    endpoint URL."""
    import boto3

    url = moto_server
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url,
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="shared")
    yield url
    # moto keeps its buckets per process, whatever server served them: start the next
    # test empty.
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))


def test_the_lease_is_taken_by_one_writer_only(s3):
    uri = "s3://shared/results/0123456789abcdef"
    first, second = leases.Lease(uri), leases.Lease(uri)
    assert first.try_acquire() is None
    assert "pid" in second.try_acquire()  # held: who holds it
    first.release()
    assert second.try_acquire() is None
    first.release()  # not first's any more: left alone
    assert leases.holder(uri) is not None
    second.release()
    assert leases.holder(uri) is None


def test_an_expired_lease_is_taken_over_by_one_waiter(s3, monkeypatch):
    monkeypatch.setattr(leases, "LEASE_SECONDS", 1.0)
    uri = "s3://shared/results/0123456789abcdef"
    dead = leases.Lease(uri)
    assert dead.try_acquire() is None  # its machine then died: never renewed
    a, b = leases.Lease(uri), leases.Lease(uri)
    assert a.try_acquire() is not None
    time.sleep(2.5)
    assert [a.try_acquire(), b.try_acquire()].count(None) == 1


def test_a_killed_holder_on_this_machine_leaves_its_lease_at_once(s3):
    """A run SIGKILLed (OOM, kill -9) cannot give its lease up; on its own machine its restart
    sees the holder's process is gone and takes the lease over without waiting it out."""
    uri = "s3://shared/results/0123456789abcdef"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from pipeline.lease import Lease
        assert Lease({uri!r}).try_acquire() is None
        print("held", flush=True)
        time.sleep(600)
    """),
        ],
        env={**ENV, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert "pid" in leases.Lease(uri).try_acquire()  # alive: held
    holder.kill()
    holder.wait()
    assert leases.Lease(uri).try_acquire() is None  # gone: taken over, no wait


def test_a_run_on_a_second_machine_waits_for_the_lease_and_takes_the_result(
    data_root, tmp_path, s3
):
    """Two machines (two workspaces) sharing a remote store: the second launcher of a run
    waits for the first's lease, then takes the result it published instead of training."""
    spec = run_spec(data_root, tmp_path / "second-machine", iterations=2)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    uri = f"s3://shared/results/{spec['run_hash']}"
    first = leases.Lease(uri)
    assert first.try_acquire() is None
    # Short polls of the lease in the waiting process (the lease it waits for says 120 s).
    env = {
        **ENV,
        **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")},
        "VSGD_RESULTS_URI": uri,
        "VSGD_LEASE_SECONDS": "4",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--spec", str(spec_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(4)
    assert proc.poll() is None and not Path(spec["output_dir"]).exists()
    # The first machine finishes: publishes its result, gives the lease up.
    from pipeline.storage import publish_result

    done = tmp_path / "first-machine"
    write_result(done, spec, test_acc=0.25)
    publish_result(done, uri)
    first.release()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "another launcher is training it" in out and "finished by another launcher" in out
    assert "step 1/2" not in out
    metrics = json.loads((Path(spec["output_dir"]) / "metrics.json").read_text())
    assert metrics["test_acc"] == 0.25


def test_gc_remote_removes_only_unused_runs_and_never_a_leased_one(
    s3, tmp_path, monkeypatch, capsys
):
    """`gc --remote` deletes under a prefix other pipelines may share: only results/<hash>/
    and checkpoints/<hash>/ of runs this grid does not use, never one whose lease is live,
    never the datasets or anything else."""
    import boto3
    from conftest import fake_prepared

    from pipeline import grid
    from pipeline.__main__ import main
    from pipeline.config import load_params

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_prepared(tmp_path / "data")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    overrides = [
        "preset=ci",
        "data.root=data",
        "tune.enabled=false",
        "datasets=[cifar100]",
        "archs=[vgg]",
        "storage.remote=s3://shared/pipe",
        f"storage.endpoint_url={s3}",
    ]
    monkeypatch.setattr(grid, "_dataset_uri", lambda *a: None)  # no dataset push needed
    [used, *_] = grid.expand(load_params("params.yaml", overrides))
    client = boto3.client("s3", endpoint_url=s3)
    keys = [
        f"pipe/results/{used['run_hash']}/metrics.json",
        f"pipe/checkpoints/{used['run_hash']}/LATEST.json",
        "pipe/results/aaaaaaaaaaaaaaaa/metrics.json",  # unused: removed
        "pipe/checkpoints/aaaaaaaaaaaaaaaa/LATEST.json",
        "pipe/results/bbbbbbbbbbbbbbbb/metrics.json",  # unused but running elsewhere
        "pipe/dvc/files/md5/ab/cdef",  # a dataset: never
        "pipe/notes.txt",
        "other/results/cccccccccccccccc/metrics.json",
    ]
    for key in keys:
        client.put_object(Bucket="shared", Key=key, Body=b"x")
    running = leases.Lease("s3://shared/pipe/results/bbbbbbbbbbbbbbbb")
    assert running.try_acquire() is None
    args = ["gc", "--remote", *sets(overrides)]
    assert main(args + ["--dry-run"]) == 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "would remove s3://shared/pipe/results/aaaaaaaaaaaaaaaa/" in out
    assert "kept s3://shared/pipe/results/bbbbbbbbbbbbbbbb/: its run is in progress" in out
    left = {o["Key"] for o in client.list_objects_v2(Bucket="shared")["Contents"]}
    assert left == set(keys) - {
        "pipe/results/aaaaaaaaaaaaaaaa/metrics.json",
        "pipe/checkpoints/aaaaaaaaaaaaaaaa/LATEST.json",
    } | {"pipe/results/bbbbbbbbbbbbbbbb/LEASE.json"}
    running.release()


def test_gc_remote_without_a_remote_is_refused(tmp_path, monkeypatch, capsys):
    from conftest import fake_prepared

    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    fake_prepared(tmp_path / "data")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert (
        main(["gc", "--remote", *sets(["preset=ci", "data.root=data", "tune.enabled=false"])]) == 78
    )
    assert "storage.remote is null" in capsys.readouterr().err
