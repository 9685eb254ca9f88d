"""The stage's progress as a whole (pipeline.stage_progress): its counts, its ETA from the runs'
step lines on a fake clock, how often it speaks, on a terminal and in a log; the step line's
parser on lines the runs really print; the stage through the local executor, and the
Kubernetes executor's events against the test API server."""

import io
import re
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import STAND_IN_RESULT, fake_prepared, stage_runs_stand_in
from test_k8s_executor import executor as k8s_executor
from test_k8s_executor import grid as k8s_grid
from test_k8s_executor import spec_of

from pipeline import execute, grid
from pipeline.config import load_params
from pipeline.contract import parse_step, step_line
from pipeline.executors.base import RunEvents, RunOutcome
from pipeline.run_log import Progress
from pipeline.stage_progress import StageProgress

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


def spec(name, dataset="cifar100", arch="vgg16", batch_size=8, iterations=100):
    return {
        "name": name,
        "dataset": dataset,
        "arch": arch,
        "batch_size": batch_size,
        "schedule": {"iterations": iterations},
    }


def progress(specs, slots=1, tty=False, **kw):
    clock, out = FakeClock(), io.StringIO()
    p = StageProgress("train", specs, slots=lambda: slots, out=out, tty=tty, clock=clock, **kw)
    return p, clock, out


def ended(name, ok=True):
    return RunOutcome(name, f"hash-{name}", ok)


def stage_lines(out):
    """The stage's lines (whole lines: a terminal's redraws are not)."""
    return [line for line in out.getvalue().split("\n") if line.startswith("train: ")]


# -- counts --------------------------------------------------------------------------------------


def test_counts_follow_runs_starting_ending_and_failing():
    p, _, out = progress([spec(n) for n in "abcd"], done_before=3)
    assert p.counts() == {"done": 0, "running": 0, "queued": 4, "failed": 0}
    p.run_started("a", "GPU 0")
    p.run_started("b")
    assert p.counts() == {"done": 0, "running": 2, "queued": 2, "failed": 0}
    p.run_ended(ended("a"))
    p.run_ended(ended("b", ok=False))
    # A line of output from a run not said to have started: it runs.
    p.run_output("c", "loading data")
    # A run that ends without having started (finished by another launcher meanwhile).
    p.run_ended(ended("d"))
    assert p.counts() == {"done": 2, "running": 1, "queued": 0, "failed": 1}
    # Late events of an ended run (or of a run not in the stage) change nothing.
    p.run_output("a", "step 5/100 loss 1")
    p.run_started("b")
    p.run_started("not-ours")
    assert p.counts() == {"done": 2, "running": 1, "queued": 0, "failed": 1}
    assert p.line() == "train: 2 done, 1 running, 0 queued, 1 failed of 4 (3 done before); ETA ?"
    # One line per run end, in a log.
    assert stage_lines(out) == [
        "train: 1 done, 1 running, 2 queued, 0 failed of 4 (3 done before); ETA ?",
        "train: 1 done, 0 running, 2 queued, 1 failed of 4 (3 done before); ETA ?",
        "train: 2 done, 1 running, 0 queued, 1 failed of 4 (3 done before); ETA ?",
    ]
    p.run_ended(ended("c"))
    last = "train: 3 done, 0 running, 0 queued, 1 failed of 4 (3 done before)"
    assert stage_lines(out)[-1] == last  # nothing left: no ETA


# -- the ETA -------------------------------------------------------------------------------------


def test_eta_from_the_step_lines_on_the_executors_slots():
    # a, b: one configuration; c, d: another, twice the steps. Two slots.
    tiny = dict(dataset="tinyimagenet", arch="vgg19", iterations=200)
    p, clock, _ = progress([spec("a"), spec("b"), spec("c", **tiny), spec("d", **tiny)], slots=2)
    p.run_started("a")
    p.run_started("b")
    p.run_output("a", "step 10/100 loss 4.1 acc 0.1 lr 0.1 100 img/s eta ?")
    p.run_output("b", "step 0/100 loss 4.6 acc 0.0 lr 0.1 100 img/s eta ?")
    clock.now = 20.0
    p.run_output("a", "step 20/100 loss 4.0")  # 2 s per step
    p.run_output("b", "step 5/100 loss 4.5")  # 4 s per step
    clock.now = 30.0
    # a: 80 steps at 2 s less the 10 s since its line = 150 s; b: 95 x 4 - 10 = 370 s.
    # c and d: nothing of their configuration measured, so the mean of all, 3 s per step:
    # 600 s each. c takes a's slot at 150 s (ends at 750 s), d b's at 370 s: 970 s.
    assert p.eta() == pytest.approx(970.0)
    assert p.line().endswith("; ETA 0:16:10")

    p.run_ended(ended("a"))
    p.run_started("c")
    p.run_output("c", "step 0/200 loss 5.3")
    clock.now = 40.0
    p.run_output("c", "step 10/200 loss 5.2")  # 1 s per step
    # b: 95 x 4 - 20 = 360 s; c: 190 x 1 = 190 s; d at its configuration's 1 s per step
    # (not the mean of all): 200 s in c's slot, from 190 s: 390 s.
    assert p.eta() == pytest.approx(390.0)
    assert p.line() == "train: 1 done, 2 running, 1 queued, 0 failed of 4; ETA 0:06:30"


def test_no_limit_runs_every_run_at_once_and_a_restart_keeps_the_rate():
    p, clock, _ = progress([spec("a"), spec("b")], slots=None)
    p.run_output("a", "step 0/100")
    clock.now = 10.0
    p.run_output("a", "step 10/100")  # 1 s per step
    # b queued, but with no limit it starts now: 100 s, longer than a's 90 s.
    assert p.eta() == pytest.approx(100.0)
    # The Kubernetes executor reads a pod's last line again: no new measurement.
    clock.now = 20.0
    p.run_output("a", "step 10/100")
    assert p.eta() == pytest.approx(100.0)
    # A new pod resumes from the checkpoint at step 5: the rate measured counts until
    # there is a new one; 95 steps from its line (now).
    p.run_output("a", "step 5/100")
    assert p.eta() == pytest.approx(100.0)
    clock.now = 30.0
    p.run_output("a", "step 10/100")  # 2 s per step since the restart
    assert p.eta() == pytest.approx(max(90 * 2.0, 100 * 2.0))


def test_eta_is_unknown_before_any_step_time_is_measured():
    p, clock, _ = progress([spec("a"), spec("b")], slots=2)
    assert p.eta() is None and p.line().endswith("; ETA ?")
    p.run_started("a")
    p.run_output("a", "step 1/100 loss 4.6")  # one step line: no time between two yet
    p.run_output("b", "staging data")
    clock.now = 50.0
    p.run_output("a", "[a] not a step line")
    assert p.eta() is None
    assert p.line() == "train: 0 done, 2 running, 0 queued, 0 failed of 2; ETA ?"
    p.run_output("a", "step 6/100 loss 4.0")
    assert p.eta() is not None


# -- how often it speaks, where ------------------------------------------------------------------


def test_a_log_gets_at_most_one_line_a_minute_and_one_per_run_end():
    p, clock, out = progress([spec("a"), spec("b")], slots=2)
    p.run_started("a")
    p.run_started("b")
    for t in range(0, 300, 5):
        clock.now = float(t)
        p.run_output("a", f"step {t}/1000")
        if t == 125:
            p.run_ended(ended("b", ok=False))
    # Periodic lines at 60 and 120 s, the run's end at 125 s, then a minute after it.
    assert len(stage_lines(out)) == 5
    assert [line for line in out.getvalue().split("\n") if not line.startswith("train: ")] == [""]
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_one_updating_line_and_the_runs_lines_whole():
    p, clock, out = progress([spec("a"), spec("b")], tty=True)
    p.run_started("a")
    print("[a] start", file=p.stream)
    p.stream.write("[a] step 1/100")  # a line written in pieces, as `print` does
    p.run_output("a", "step 1/100")
    p.stream.write(" loss 4.6\n")
    clock.now = 30.0
    p.run_ended(ended("a"))
    p.stream.write("[b] no newline yet")
    p.close()
    text = out.getvalue()
    assert "[a] start\n" in text and "[a] step 1/100 loss 4.6\n" in text
    assert "[b] no newline yet\n" in text  # kept when the stage closes
    # The progress line is redrawn in place (carriage returns), not one line per update.
    assert "\rtrain: 1 done, 0 running, 1 queued, 0 failed of 2; ETA ?" in text
    # Besides the runs' three lines, one more: the progress line as the stage closed.
    assert text.count("\n") == 4 and text.endswith("\n")
    assert text.split("\n")[-2].endswith(
        "train: 1 done, 0 running, 1 queued, 0 failed of 2; ETA ? |##########          |"
    )


def test_lines_printed_from_many_threads_stay_whole():
    names = [f"r{i}" for i in range(6)]
    p, clock, out = progress([spec(n) for n in names], slots=6)

    def run(name):
        p.run_started(name)
        for j in range(200):
            print(f"[{name}] line {j}", file=p.stream)  # two writes: the text, the newline
            p.run_output(name, f"step {j}/1000")
        p.run_ended(ended(name))

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.close()
    lines = out.getvalue().splitlines()
    assert all(re.fullmatch(r"\[r\d\] line \d+|train: .*", line) for line in lines), lines
    assert len(lines) == 6 * 200 + 6


# -- the step line -------------------------------------------------------------------------------


def test_the_parser_reads_the_lines_a_run_prints(capsys):
    show = Progress("run", tty=False)
    info = {"loss": 4.6, "acc": 0.01, "lr": 0.1, "images_per_sec": 512.0}
    show(0, 30000, info)
    show(500, 30000, dict(info, test_acc=0.12, test_loss=4.1))
    show(600, 30000, dict(info, val_acc=0.2))
    show(30000, 30000, dict(info, test_acc=0.6, test_loss=1.5, val_acc=0.55))
    lines = capsys.readouterr().err.splitlines()
    assert [parse_step(line) for line in lines] == [
        (0, 30000),
        (500, 30000),
        (600, 30000),
        (30000, 30000),
    ]
    # As the local executor echoes them.
    assert parse_step(f"[cifar100-vgg16-sgd-s0-1234abcd] {lines[1]}") == (500, 30000)
    assert parse_step(step_line(7, 9)) == (7, 9)
    for other in (
        "stopped by SIGTERM at step 7/9: checkpoint saved",
        "[run] stopped at step 7/9",
        "step 7/9x",
        "step 10/9",
        "steps 7/9",
        "",
    ):
        assert parse_step(other) is None, other


# -- through the stage, with the local executor --------------------------------------------------

# Stands in for `python -m pipeline.train`: prints its progress as a run does.
FAKE_TRAIN = (
    textwrap.dedent("""
    import json, sys, time
    from pipeline.run_log import Progress
    spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
    total = spec["schedule"]["iterations"]
    show = Progress(spec["name"], tty=False)
    for step in range(1, total + 1):
        # Far enough apart that a loaded machine's reader still receives the lines apart
        # (the stage times the steps by when their lines arrive).
        time.sleep(0.3)
        show(step, total, {"loss": 1.0, "acc": 0.5, "lr": 0.1, "images_per_sec": 100.0})
""")
    + STAND_IN_RESULT
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project directory with ci-preset params and fake prepared datasets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_prepared(tmp_path / "data")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return tmp_path


def test_the_stage_shows_its_progress_through_the_local_executor(workdir, monkeypatch, capsys):
    params = load_params(
        "params.yaml",
        [
            "preset=ci",
            "data.root=data",
            "datasets=[cifar100]",
            "archs=[vgg]",
            "optimizers=[sgd, adam]",
            "tune.enabled=false",
            "tracking.uri=null",
            "executor.max_parallel=1",
        ],
    )
    specs = grid.expand(params)
    script = workdir / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    stage_runs_stand_in(monkeypatch, script)
    report = execute.run_stage(params, specs, "train")
    assert report.failed == [] and report.pending == 2
    out = capsys.readouterr().out
    lines = out.splitlines()
    # The runs' own lines, whole.
    for s in specs:
        whole = rf"\[{s['name']}\] step 3/3 loss 1\.0000 .* eta .*"
        assert any(re.fullmatch(whole, x) for x in lines), s["name"]
    # One line per run end; the first run's steps were timed, so the ETA is a number.
    progress = [x for x in lines if re.match(r"train: \d+ done, ", x)]
    assert len(progress) == 2, progress
    assert re.fullmatch(
        r"train: 1 done, 0 running, 1 queued, 0 failed of 2; ETA \d+:\d\d:\d\d", progress[0]
    )
    assert progress[1] == "train: 2 done, 0 running, 0 queued, 0 failed of 2"


# -- the Kubernetes executor's events ------------------------------------------------------------


class Recorder(RunEvents):
    def __init__(self):
        self.calls, self.lock = [], threading.Lock()

    def run_started(self, name, where=None):
        with self.lock:
            self.calls.append(("started", name, where))

    def run_output(self, name, line):
        with self.lock:
            self.calls.append(("output", name, line))

    def run_ended(self, outcome):
        with self.lock:
            self.calls.append(("ended", outcome.name, outcome.ok))


def test_the_kubernetes_executor_tells_the_stage_what_its_runs_do(kube, store):
    params, specs = k8s_grid("executor.max_parallel=2", optimizers="[sgd, adam]")
    trains, fails = specs

    def cluster(job):
        name, spec = job["metadata"]["name"], spec_of(job, specs)
        if spec is fails:
            kube.fail(name, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            return
        pod = kube.start_pod(name, log=["step 1/30 loss 4.6 acc 0.01 lr 0.1 100 img/s eta ?"])
        kube.clock.sleep(2.5)  # more than two progress intervals
        kube.log(pod, "step 2/30 loss 4.5 acc 0.02 lr 0.1 100 img/s eta 0:00:28")
        kube.clock.sleep(2.5)
        store(spec)
        kube.complete(name)

    kube.on_create = cluster
    ex = k8s_executor(params, store, io.StringIO(), kube.clock)
    ex.events = recorder = Recorder()
    outcomes = ex.run(specs)
    assert [o.ok for o in outcomes] == [True, False]
    calls = recorder.calls
    # Named as the stage names its runs (the spec's name), started once, when its pod ran.
    of = {s["name"]: [c for c in calls if c[1] == s["name"]] for s in specs}
    assert of[fails["name"]] == [("ended", fails["name"], False)]
    ran = of[trains["name"]]
    assert ran[0][0] == "started" and ran[0][2].startswith("pod ")
    assert ran[-1] == ("ended", trains["name"], True)
    outputs = [c[2] for c in ran if c[0] == "output"]
    assert [c[0] for c in ran[1:-1]] == ["output"] * len(outputs)
    # The pod's last log line, every progress interval: the first, then the second.
    steps = [parse_step(line) for line in outputs]
    assert steps == sorted(steps) and set(steps) == {(1, 30), (2, 30)}
    assert outputs[0].startswith("step 1/30 loss 4.6")
