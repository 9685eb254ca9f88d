"""Local executor: parallel subprocesses, prefixed streaming, failures reported with log tails."""

import io
import sys
import textwrap
import time

from pipeline.contract import LOG_NAME
from pipeline.executors import RunOutcome, get_executor, spec_path, write_spec
from pipeline.executors.local import LocalExecutor

# Stands in for `python -m pipeline.train`: reads the spec, prints, sleeps, exits as told.
FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
    behaviour = spec["fake"]
    print("threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
    print("remote", os.environ.get("VSGD_RESULTS_URI"), os.environ.get("AWS_ENDPOINT_URL_S3"),
          flush=True)
    def alive(change):
        # How many fake runs are alive now (and the most ever), in a file under a lock.
        import fcntl
        with open(behaviour["alive"], "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            now, most = map(int, (f.read() or "0 0").split())
            now += change
            f.seek(0)
            f.truncate()
            f.write(f"{now} {max(now, most)}")
    if behaviour.get("alive"):
        alive(+1)
    for i in range(behaviour.get("lines", 3)):
        print(f"step {i}", flush=True)
    time.sleep(behaviour.get("sleep", 0))
    if behaviour.get("alive"):
        alive(-1)
    if behaviour.get("exit", 0):
        print("Traceback: something broke", file=sys.stderr, flush=True)
        sys.exit(behaviour["exit"])
    json.dump({"run_hash": spec["run_hash"]}, open(spec["output_dir"] + "/metrics.json", "w"))
""")


def make_spec(tmp_path, name, **fake):
    return {
        "name": name,
        "run_hash": f"hash-{name}",
        "output_dir": str(tmp_path / name),
        "fake": fake,
    }


def executor(tmp_path, max_parallel=1):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    out = io.StringIO()
    return LocalExecutor(max_parallel, command=[sys.executable, str(script)], out=out), out


def test_runs_every_spec_and_streams_prefixed_lines(tmp_path):
    specs = [make_spec(tmp_path, f"run{i}") for i in range(3)]
    ex, out = executor(tmp_path)
    outcomes = ex.run(specs)
    assert outcomes == [RunOutcome(f"run{i}", f"hash-run{i}", ok=True) for i in range(3)]
    text = out.getvalue()
    for i in range(3):
        assert f"[run{i}] step 2" in text and f"[run{i}] done" in text
        assert (tmp_path / f"run{i}" / "metrics.json").exists()
        assert "step 0" in (tmp_path / f"run{i}" / LOG_NAME).read_text()


def test_failures_are_reported_with_log_tail_and_others_finish(tmp_path):
    specs = [
        make_spec(tmp_path, "good1"),
        make_spec(tmp_path, "bad", exit=3, lines=50),
        make_spec(tmp_path, "config", exit=78),
        make_spec(tmp_path, "good2"),
    ]
    ex, out = executor(tmp_path, max_parallel=2)
    outcomes = {o.name: o for o in ex.run(specs)}
    assert outcomes["good1"].ok and outcomes["good2"].ok
    assert (tmp_path / "good2" / "metrics.json").exists()
    bad = outcomes["bad"]
    assert not bad.ok and bad.error == "exit code 3"
    assert "Traceback: something broke" in bad.log_tail
    assert "step 49" in bad.log_tail and "step 0\n" not in bad.log_tail  # only the tail
    assert outcomes["config"].error == "exit code 78 (invalid configuration)"
    assert "[bad] FAILED: exit code 3" in out.getvalue()


def test_an_interrupted_run_is_reported_stopped_not_failed(tmp_path):
    # 130: what pipeline.train exits with on Ctrl-C (the terminal's SIGINT reaches it).
    ex, out = executor(tmp_path)
    [outcome] = ex.run([make_spec(tmp_path, "cut", exit=130)])
    assert not outcome.ok and outcome.error == "exit code 130"
    assert "[cut] stopped: exit code 130" in out.getvalue()
    assert "FAILED" not in out.getvalue()


def test_runs_in_parallel_up_to_max_parallel(tmp_path):
    specs = [make_spec(tmp_path, f"run{i}", sleep=1.0, lines=1) for i in range(4)]
    ex, _ = executor(tmp_path, max_parallel=4)
    start = time.monotonic()
    assert all(o.ok for o in ex.run(specs))
    # Four 1 s runs side by side; one after another would take > 4 s.
    assert time.monotonic() - start < 3.5


def test_never_more_than_max_parallel_runs_at_once(tmp_path):
    """More runs than slots: the slots are all used, and never more. Each fake run counts
    itself in and out of a shared counter for as long as its body runs (inside its
    process's lifetime, so the count never exceeds the processes alive)."""
    counter = tmp_path / "alive"
    specs = [
        make_spec(tmp_path, f"run{i}", sleep=1.0, lines=1, alive=str(counter)) for i in range(5)
    ]
    ex, _ = executor(tmp_path, max_parallel=3)
    assert all(o.ok for o in ex.run(specs))
    now, most = map(int, counter.read_text().split())
    assert (now, most) == (0, 3)


def test_spec_files_and_factory(tmp_path):
    spec = make_spec(tmp_path, "x")
    path = write_spec(spec)
    assert path == spec_path(spec) == tmp_path / "x" / "spec.json"
    ex = get_executor({"executor": {"kind": "local", "max_parallel": 3}})
    assert isinstance(ex, LocalExecutor) and ex.max_parallel == 3
    assert ex.run([]) == []


def test_parallel_runs_split_the_cores_between_them(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("pipeline.executors.local._cpu_count", lambda: 8)
    ex, out = executor(tmp_path, max_parallel=3)
    assert all(o.ok for o in ex.run([make_spec(tmp_path, "a"), make_spec(tmp_path, "b")]))
    assert "[a] threads 2" in out.getvalue() and "[b] threads 2" in out.getvalue()
    # One run at a time on one core, or more runs than cores: one thread each, never 0.
    monkeypatch.setattr("pipeline.executors.local._cpu_count", lambda: 1)
    assert LocalExecutor(1).threads_per_run() == 1 and LocalExecutor(4).threads_per_run() == 1
    # A value the user set is kept.
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    ex, out = executor(tmp_path, max_parallel=2)
    assert ex.run([make_spec(tmp_path, "c")])[0].ok
    assert "[c] threads 5" in out.getvalue()


def test_runs_get_the_remote_store_of_the_params(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://elsewhere:1")  # params.yaml wins
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    params = {
        "executor": {"kind": "local", "max_parallel": 1},
        "storage": {"remote": "s3://bucket/grid/", "endpoint_url": "http://127.0.0.1:9"},
    }
    ex = get_executor(params)
    ex.command, ex.out = [sys.executable, str(script)], io.StringIO()
    assert ex.run([make_spec(tmp_path, "r")])[0].ok
    assert "[r] remote s3://bucket/grid/results/hash-r http://127.0.0.1:9" in ex.out.getvalue()
    # Without a remote, nothing is added.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    params["storage"] = {"remote": None, "endpoint_url": None}
    ex = get_executor(params)
    ex.command, ex.out = [sys.executable, str(script)], io.StringIO()
    assert ex.run([make_spec(tmp_path, "s")])[0].ok
    assert "[s] remote None None" in ex.out.getvalue()
