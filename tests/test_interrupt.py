"""A run stopped by SIGTERM or SIGINT loses no step: it saves a checkpoint at the step it
reached, exits 143 or 130, and the next start ends bit-identical to a run never interrupted.
That holds for `python -m pipeline.train` itself, for the local executor's runs and for the
command of a `dvc repro` killed or interrupted while it trains. A signal before the training
loop (here: while the data is staged) stops the run at once."""

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_spec, untimed

from vsgd.checkpoint import LocalCheckpointStore, from_bytes, to_bytes
from vsgd.tracking import Tracker
from vsgd.trainer import Stopped, train

VSGD = {
    "name": "vsgd",
    "lr": 0.01,
    "ghattg": 30.0,
    "ps": 1e-8,
    "tau1": 0.81,
    "tau2": 0.9,
    "weight_decay": 0.0,
}
# Subprocess runs: a line per step; the only checkpoint before the end is the signal's.
ITERATIONS = 16
CLI_RUN = dict(
    iterations=ITERATIONS,
    batch_size=4,
    optimizer=VSGD,
    eval_every=5,
    log_every=1,
    beta1_every=4,
    checkpoint_every=1000,
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
for key in ("MLFLOW_TRACKING_URI", "DVC_STAGE", "VSGD_TEE_LOG", "VSGD_STOP_WITH_LAUNCHER"):
    ENV.pop(key, None)


def outputs(spec) -> dict:
    """What two runs of one spec must have alike: metrics (untimed), curve, beta1 rows."""
    out = Path(spec["output_dir"])
    with open(out / "curve.csv") as f:
        curve = list(csv.DictReader(f))
    return {
        "metrics": untimed(json.loads((out / "metrics.json").read_text())),
        "curve": curve,
        "beta1": (out / "beta1.csv").read_text() if (out / "beta1.csv").exists() else None,
    }


def final_state(spec) -> dict:
    saved = from_bytes(LocalCheckpointStore(spec["checkpoint"]).load())
    return {k: saved[k] for k in ("step", "model", "optimizer", "scheduler", "rng", "data")}


def same(a, b) -> bool:
    """Exact equality of nested checkpoint contents (tensors bit for bit)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def write_spec(spec, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    return path


def start(spec_file, env=ENV, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--spec", str(spec_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def logged_steps(text: str) -> list[int]:
    return [int(s) for s in re.findall(rf"step (\d+)/{ITERATIONS} ", text)]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted subprocess run of CLI_RUN (one thread, as the interrupted ones)."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = run_spec(data_root, tmp, **CLI_RUN)
    proc = start(write_spec(spec, tmp / "spec.json"))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    # Without VSGD_TEE_LOG the run keeps no log of its own (the executor does).
    assert not (Path(spec["output_dir"]) / "train.log").exists()
    return spec


@pytest.mark.parametrize(
    "signum,code",
    # SIGINT takes SIGTERM's path (one handler), and a run stopped by SIGINT, its checkpoint
    # and its bit-identical resume are covered by the Ctrl-C `dvc repro` test below: extended.
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.extended)],
)
def test_signal_mid_training_saves_the_step_reached_and_resumes_bit_identical(
    data_root, tmp_path, reference, signum, code
):
    spec = run_spec(data_root, tmp_path, **CLI_RUN)
    spec_file = write_spec(spec, tmp_path / "spec.json")
    proc = start(spec_file)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step 3/{ITERATIONS} "):
            proc.send_signal(signum)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == code, out
    reached = logged_steps(out)[-1]
    assert 3 <= reached < ITERATIONS, out
    name = signal.Signals(signum).name
    assert (
        f"stopped by {name} at step {reached}/{ITERATIONS}: checkpoint saved, run again "
        "to resume" in out
    ), out
    assert "Traceback" not in out
    # The checkpoint is the step the run had reached, though no checkpoint was due there.
    assert from_bytes(LocalCheckpointStore(spec["checkpoint"]).load())["step"] == reached
    assert not (Path(spec["output_dir"]) / "metrics.json").exists()

    proc = start(spec_file)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert f"from its checkpoint at step {reached}/{ITERATIONS}" in out, out
    assert logged_steps(out) == list(range(reached + 1, ITERATIONS + 1))  # no step replayed
    assert outputs(spec) == outputs(reference)
    assert same(final_state(spec), final_state(reference))


@pytest.fixture(scope="module")
def in_process_reference(data_root, tmp_path_factory):
    """IN_PROCESS run never interrupted, with what `progress` saw at each log point."""
    spec = run_spec(data_root, tmp_path_factory.mktemp("ref-in-process"), **IN_PROCESS)
    seen = []
    train(spec, progress=lambda step, total, info: seen.append(_seen(step, info)))
    return spec, seen


# SGD (the default; cheaper in process than VSGD, whose resume the subprocess runs cover).
# Log points at 4 (log), 5 (evaluation), 8 (log) and 10 (the last): a stop after step 7 falls
# inside the window that starts at 5.
IN_PROCESS = dict(
    iterations=10, batch_size=4, log_every=4, eval_every=5, beta1_every=1000, checkpoint_every=1000
)


def _seen(step, info):
    """A log point's numbers that do not depend on timing (images/s does)."""
    return step, {k: v for k, v in info.items() if k != "images_per_sec"}


def stop_after(polls: int):
    """A `stop` callable that asks at its `polls`-th poll (the trainer polls after each
    step, so: after step `polls` of a new run)."""
    count = []

    def stop():
        count.append(1)
        return len(count) == polls

    return stop


def test_stop_inside_a_log_window_resumes_with_the_whole_window(
    data_root, tmp_path, in_process_reference
):
    ref, ref_seen = in_process_reference
    spec = run_spec(data_root, tmp_path, **IN_PROCESS)
    store = LocalCheckpointStore(spec["checkpoint"])
    with pytest.raises(Stopped) as stopped:
        train(spec, checkpoint_store=store, stop=stop_after(7))
    assert (stopped.value.step, stopped.value.checkpointed) == (7, True)
    saved = from_bytes(store.load())
    assert saved["step"] == 7 and saved["window"]["step"] == 5
    assert saved["window"]["seconds"] > 0  # steps 6 and 7 were timed

    seen = []
    resumed = train(
        spec,
        checkpoint_store=store,
        progress=lambda step, total, info: seen.append(_seen(step, info)),
    )
    # Step 8's train_loss and train_acc are those of the whole window 6..8, as if never
    # stopped; and the stopped process's seconds count in the run's time per step.
    assert seen == [s for s in ref_seen if s[0] > 7]
    assert outputs(spec) == outputs(ref)
    assert resumed["seconds_per_iter"] * 10 >= saved["seconds"] + saved["window"]["seconds"]


def test_checkpoint_without_a_window_still_resumes_exactly(
    data_root, tmp_path, in_process_reference
):
    """A checkpoint written before checkpoints had windows: its window starts at its step
    (always a log point then)."""
    ref, ref_seen = in_process_reference
    spec = run_spec(data_root, tmp_path, **IN_PROCESS)
    store = LocalCheckpointStore(spec["checkpoint"])
    with pytest.raises(Stopped):
        train(spec, checkpoint_store=store, stop=stop_after(4))  # a log point
    saved = from_bytes(store.load())
    assert saved["step"] == 4 and saved.pop("window") is None
    store.save(to_bytes(saved))
    seen = []
    train(
        spec,
        checkpoint_store=store,
        progress=lambda step, total, info: seen.append(_seen(step, info)),
    )
    assert seen == [s for s in ref_seen if s[0] > 4]
    assert outputs(spec) == outputs(ref)


def test_stop_event_without_a_checkpoint_store_stops_after_one_step(
    data_root, tmp_path, monkeypatch
):
    ended = []  # the status the MLflow run is ended with (tests/test_tracking.py: KILLED)
    monkeypatch.setattr(Tracker, "finish", lambda self, status="FINISHED": ended.append(status))
    stop = threading.Event()
    stop.set()
    spec = run_spec(data_root, tmp_path, iterations=3)
    with pytest.raises(Stopped) as stopped:
        train(spec, stop=stop)
    assert (stopped.value.step, stopped.value.checkpointed) == (1, False)
    assert not Path(spec["checkpoint"]).exists() and not Path(spec["output_dir"]).exists()
    assert ended == ["KILLED"]


def test_sigterm_while_the_data_is_staged_stops_at_once_without_a_checkpoint(data_root, tmp_path):
    """The dataset download hangs (an S3 endpoint that accepts and never answers); SIGTERM
    then ends the run at once, long before any timeout of the download."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(120)
    spec = run_spec(data_root, tmp_path, iterations=3)
    spec["data"]["uri"] = "s3://bucket/dvc/files/md5/ab/" + "c" * 30 + ".dir"
    env = {
        **ENV,
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{server.getsockname()[1]}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "VSGD_SCRATCH": str(tmp_path / "scratch"),
    }
    proc = start(write_spec(spec, tmp_path / "spec.json"), env=env)
    try:
        conn, _ = server.accept()
        assert conn.recv(4096).startswith(b"GET ")  # the run is fetching the dataset
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 143, out
    assert "interrupted by SIGTERM before it could save a checkpoint" in out, out
    assert "Traceback" not in out
    assert not Path(spec["checkpoint"]).exists() and not Path(spec["output_dir"]).exists()


# ---------------------------------------------------------------------------------------------
# the local executor

# Stands in for a run: records each signal it gets; on SIGTERM takes a moment ("saving a
# checkpoint") and exits 143, unless told to ignore SIGTERM. It never outlives its parent (a
# failed test leaves nothing behind).
FAKE_RUN = textwrap.dedent("""
    import json, os, signal, sys, time
    spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
    record = open(spec["record"], "a", buffering=1)
    def on_signal(signum, frame):
        record.write(signal.Signals(signum).name + "\\n")
        if signum == signal.SIGTERM and not spec["ignore_sigterm"]:
            time.sleep(1)
            record.write("saved\\n")
            sys.exit(143)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    record.write("ready " + os.environ.get("VSGD_STOP_WITH_LAUNCHER", "") + "\\n")
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.05)
""")
# Runs one fake run through the executor; prints the outcome.
HARNESS = textwrap.dedent("""
    import json, sys
    from pipeline.executors import local
    local.GRACE_SECONDS = float(sys.argv[3])
    spec = json.load(open(sys.argv[1]))
    ex = local.LocalExecutor(1, command=[sys.executable, sys.argv[2]])
    try:
        ex.run([spec])
    except BaseException as exc:
        print("executor raised", type(exc).__name__, flush=True)
        raise
""")


def executor_setup(tmp_path, ignore_sigterm=False, grace=120):
    (tmp_path / "fake_run.py").write_text(FAKE_RUN)
    (tmp_path / "harness.py").write_text(HARNESS)
    spec = {
        "name": "fake",
        "run_hash": "hash-fake",
        "output_dir": str(tmp_path / "out"),
        "record": str(tmp_path / "record.txt"),
        "ignore_sigterm": ignore_sigterm,
    }
    from pipeline.executors import write_spec as write_run_spec

    write_run_spec(spec)
    harness = [
        sys.executable,
        str(tmp_path / "harness.py"),
        str(Path(spec["output_dir"]) / "spec.json"),
        str(tmp_path / "fake_run.py"),
        str(grace),
    ]
    return harness, tmp_path / "record.txt"


def wait_for(path: Path, text: str, proc=None, timeout=60):
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline and (proc is None or proc.poll() is None), (
            path.read_text() if path.exists() else "no record"
        )
        time.sleep(0.05)


def test_ctrl_c_of_the_executor_gives_each_run_one_sigterm_and_waits_for_it(tmp_path):
    harness, record = executor_setup(tmp_path)
    # As a terminal does: the executor is the foreground process group, Ctrl-C signals it.
    proc = subprocess.Popen(
        harness,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for(record, "ready", proc)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    # Only the executor's SIGTERM reached the run (a second signal would make a real run
    # stop without its checkpoint), and the executor waited until it had saved.
    assert record.read_text().splitlines() == ["ready 1", "SIGTERM", "saved"], out
    assert "[fake] stopped: exit code 143" in out and "executor raised KeyboardInterrupt" in out


def test_a_run_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    harness, record = executor_setup(tmp_path, ignore_sigterm=True, grace=1)
    proc = subprocess.Popen(
        harness, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(record, "ready", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, out
    assert record.read_text().splitlines() == ["ready 1", "SIGTERM"]
    assert "[fake] stopped: killed by signal SIGKILL" in out, out


LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    # As DVC runs a stage: through `sh -c` (dash forks the command and waits).
    subprocess.Popen(["/bin/sh", "-c", " ".join(sys.argv[1:])])
    time.sleep(600)
""")


def test_executor_under_dvc_stops_its_runs_when_dvc_dies(tmp_path):
    """`dvc repro` dies of SIGTERM without passing it on: its stage's executor notices and
    stops its runs as if it had the SIGTERM."""
    harness, record = executor_setup(tmp_path)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    launcher = subprocess.Popen(
        [sys.executable, str(tmp_path / "launcher.py"), *harness],
        env={**ENV, "DVC_STAGE": "train"},
        start_new_session=True,
    )
    try:
        wait_for(record, "ready", launcher)
        launcher.kill()  # as SIGTERM kills dvc: at once, signalling nobody
        launcher.wait()
        wait_for(record, "saved")
        assert record.read_text().splitlines() == ["ready 1", "SIGTERM", "saved"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# dvc repro


def dvc_env(shell: str) -> dict:
    return {
        **ENV,
        "DVC_NO_ANALYTICS": "1",
        "SHELL": shell,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        # the stage calls `python`: this interpreter's environment
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.fixture(scope="module")
def dvc_initialised(tmp_path_factory) -> Path:
    """A git repository with DVC initialised in it (`git init`, `dvc init`), made once for
    the module: each test's repository is a copy of it."""
    repo = tmp_path_factory.mktemp("dvc-init") / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(
            cmd, cwd=repo, env=dvc_env("/bin/sh"), check=True, capture_output=True, timeout=120
        )
    return repo


def dvc_repo(tmp_path, spec_file, initialised: Path) -> Path:
    """A copy of `initialised` whose one stage trains `spec_file`."""
    repo = tmp_path / "repo"
    shutil.copytree(initialised, repo, symlinks=True)
    (repo / "dvc.yaml").write_text(
        f"stages:\n  train:\n    cmd: python -m pipeline.train --spec {spec_file}\n"
    )
    return repo


def trainer_pids(spec_file) -> list[int]:
    """The `python -m pipeline.train --spec <spec_file>` processes (not their `sh -c`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if (
            argv[1:4] == [b"-m", b"pipeline.train", b"--spec"]
            and argv[4] == str(spec_file).encode()
            and state != "Z"
        ):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize(
    "how,shell",
    [
        ("kill", "/bin/sh"),  # SIGTERM to `dvc repro` alone; its stage runs under dash
        # SIGTERM to the whole process group: the run gets it and sees DVC die, one request
        pytest.param("kill-group", "/bin/sh", marks=pytest.mark.extended),
        ("ctrl-c", "/bin/bash"),  # SIGINT to its process group, as a terminal's Ctrl-C
    ],
)
def test_dvc_repro_stopped_mid_training_loses_no_step(
    data_root, tmp_path, reference, how, shell, dvc_initialised
):
    env = dvc_env(shell)
    spec = run_spec(data_root, tmp_path, **CLI_RUN)
    spec_file = write_spec(spec, tmp_path / "spec.json")
    repo = dvc_repo(tmp_path, spec_file, dvc_initialised)
    log = tmp_path / "repro.log"
    with log.open("w") as f:
        dvc = subprocess.Popen(
            ["dvc", "repro"],
            cwd=repo,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while not logged_steps(log.read_text()) or logged_steps(log.read_text())[-1] < 3:
            assert dvc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        [trainer] = trainer_pids(spec_file)
        if how == "kill":
            dvc.send_signal(signal.SIGTERM)
        else:
            os.killpg(dvc.pid, signal.SIGTERM if how == "kill-group" else signal.SIGINT)
        assert dvc.wait(timeout=120) != 0
        while trainer in trainer_pids(spec_file):  # DVC does not wait for it when killed
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dvc.pid, signal.SIGKILL)
    text = log.read_text()
    reached = logged_steps(text)[-1]
    stopper = "SIGINT" if how == "ctrl-c" else "SIGTERM"
    assert f"stopped by {stopper} at step {reached}/{ITERATIONS}: checkpoint saved" in text, text
    assert from_bytes(LocalCheckpointStore(spec["checkpoint"]).load())["step"] == reached
    assert not (Path(spec["output_dir"]) / "metrics.json").exists()

    again = subprocess.run(
        ["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"from its checkpoint at step {reached}/{ITERATIONS}" in again.stdout + again.stderr
    assert outputs(spec) == outputs(reference)
