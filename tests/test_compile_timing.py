"""A compiled model's compile steps are timed apart: each process's first training step
compiles, and its time goes to `compile_seconds`, never into `seconds_per_iter` or a log
point's images/s; the steps those average over (`timed_steps`) are counted across resumes,
and the run still ends bit-identical to one never interrupted.

The model is compiled for real (torch.compile on CPU), but it is a tiny one, and the clock
is a fake one that moves only inside the training step: every step takes STEP seconds, a
process's first one COMPILE, so what the run reports is exact."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_spec, untimed
from torch import nn

from vsgd import engine, step_clock
from vsgd.checkpoint import LocalCheckpointStore, from_bytes, to_bytes
from vsgd.outputs import check_result
from vsgd.trainer import Stopped, train

ITERATIONS, BATCH = 6, 4
STEP, COMPILE = 0.25, 100.0  # binary fractions: every sum below is exact
# Log points at 2, 3 (evaluation), 4 and 6 (evaluation); checkpoints only where a run stops
# and at its end.
RUN = dict(
    iterations=ITERATIONS,
    batch_size=BATCH,
    log_every=2,
    eval_every=3,
    checkpoint_every=1000,
    beta1_every=1000,
    compile=True,
)


def tiny_model(name, num_classes, image_size):
    """A model that compiles in seconds on a CPU (the real ones take a minute)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


class FakeTime:
    """`time` inside vsgd.step_clock: `perf_counter` moves only by `advance`."""

    def __init__(self):
        import time

        self._time, self.now = time, 1000.0

    def perf_counter(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds

    def __getattr__(self, name):
        return getattr(self._time, name)


@pytest.fixture
def timed(monkeypatch):
    """The fake clock, the tiny model, and a training step that takes COMPILE seconds the
    first time a run's process calls it (dynamo reset first, as in a new process: a resumed
    run compiles in a fresh one) and STEP seconds after that. Returns the per-run log of
    which steps were first."""
    clock = FakeTime()
    monkeypatch.setattr(step_clock, "time", clock)
    monkeypatch.setattr(engine, "build_model", tiny_model)
    real_step, runs, first_steps = engine.train_step, [], []  # runs kept: ids stay unique

    def step(run, state):
        first = not any(r is run for r in runs)
        if first:
            runs.append(run)
            torch._dynamo.reset()
            first_steps.append(state.step + 1)
        lr = real_step(run, state)
        clock.advance(COMPILE if first else STEP)
        return lr

    monkeypatch.setattr(engine, "train_step", step)
    return first_steps


def stop_after(polls: int):
    count = []

    def stop():
        count.append(1)
        return len(count) == polls

    return stop


def seen_by(log):
    return lambda step, total, info: log.append((step, info))


def outputs(spec) -> dict:
    """What two runs of one spec have alike: metrics less timing, the curve's rows."""
    out = Path(spec["output_dir"])
    metrics = untimed(json.loads((out / "metrics.json").read_text()))
    for key in ("timed_steps", "compile_seconds"):
        metrics.pop(key)
    with open(out / "curve.csv") as f:
        return {"metrics": metrics, "curve": list(csv.DictReader(f))}


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The run never interrupted (compiled, on the real clock): its outputs."""
    spec = run_spec(data_root, tmp_path_factory.mktemp("reference"), **RUN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "build_model", tiny_model)
        torch._dynamo.reset()
        train(spec)
    return outputs(spec)


def test_the_compile_step_is_left_out_of_the_step_time(data_root, tmp_path, timed, reference):
    spec = run_spec(data_root, tmp_path, **RUN)
    seen = []
    metrics = train(spec, progress=seen_by(seen))
    assert timed == [1]
    assert metrics["seconds_per_iter"] == STEP  # (COMPILE + 5 * STEP) / 6 with it
    assert metrics["images_per_sec"] == BATCH / STEP
    assert (metrics["timed_steps"], metrics["compile_seconds"]) == (ITERATIONS - 1, COMPILE)
    # Every log point's images/s is that of its timed steps; the first window holds the
    # compile step and one timed step. The first log point after it reports its time.
    assert [(s, i["images_per_sec"]) for s, i in seen] == [(s, BATCH / STEP) for s in (2, 3, 4, 6)]
    assert [(s, i.get("compile_seconds")) for s, i in seen] == [
        (2, COMPILE),
        (3, None),
        (4, None),
        (6, None),
    ]
    assert check_result(spec["output_dir"], spec["run_hash"]) == []
    assert outputs(spec) == reference


def test_each_resumed_process_compiles_again_and_is_timed_apart(
    data_root, tmp_path, timed, reference
):
    """Stopped after its compile step (step 1), resumed, stopped inside the window 4..6 (after
    step 5), resumed again: three processes, three compile steps (1, 2, 6), three timed
    steps (3, 4, 5), and the outputs of the run never interrupted."""
    spec = run_spec(data_root, tmp_path, **RUN)
    store = LocalCheckpointStore(spec["checkpoint"])
    with pytest.raises(Stopped):
        train(spec, checkpoint_store=store, stop=stop_after(1))
    saved = from_bytes(store.load())
    assert saved["step"] == 1 and saved["window"] == {"step": 0, "seconds": 0.0, "compile_steps": 1}
    assert (saved["compile_steps"], saved["compile_seconds"]) == (1, COMPILE)

    seen = []
    with pytest.raises(Stopped):
        train(spec, checkpoint_store=store, stop=stop_after(4), progress=seen_by(seen))
    saved = from_bytes(store.load())
    assert saved["step"] == 5 and saved["window"] == {
        "step": 4,
        "seconds": STEP,
        "compile_steps": 0,
    }
    assert (saved["compile_steps"], saved["compile_seconds"]) == (2, 2 * COMPILE)
    # Window 0..2 held two compile steps and nothing timed: no images/s there.
    assert [(s, i.get("images_per_sec")) for s, i in seen] == [
        (2, None),
        (3, BATCH / STEP),
        (4, BATCH / STEP),
    ]

    seen = []
    metrics = train(spec, checkpoint_store=store, progress=seen_by(seen))
    assert timed == [1, 2, 6]
    # Step 6's window holds step 5 (timed before the stop) and step 6 (compiled).
    assert [(s, i["images_per_sec"]) for s, i in seen] == [(6, BATCH / STEP)]
    assert metrics["timed_steps"] == 3 and metrics["compile_seconds"] == 3 * COMPILE
    assert metrics["seconds_per_iter"] == STEP
    assert check_result(spec["output_dir"], spec["run_hash"]) == []
    assert outputs(spec) == reference


def test_a_checkpoint_without_compile_counts_resumes_with_every_step_timed(
    data_root, tmp_path, timed, reference
):
    """A checkpoint written before compile steps were counted: its steps all count as timed
    (its seconds held its compilation then); only the resumed process's compile step is
    left out."""
    spec = run_spec(data_root, tmp_path, **RUN)
    store = LocalCheckpointStore(spec["checkpoint"])
    with pytest.raises(Stopped):
        train(spec, checkpoint_store=store, stop=stop_after(5))
    saved = from_bytes(store.load())
    assert saved["step"] == 5
    del saved["compile_steps"], saved["compile_seconds"], saved["window"]["compile_steps"]
    store.save(to_bytes(saved))
    metrics = train(spec, checkpoint_store=store)
    assert metrics["timed_steps"] == ITERATIONS - 1 and metrics["compile_seconds"] == COMPILE
    assert outputs(spec) == reference


def test_a_run_that_timed_no_step_reports_no_step_time(data_root, tmp_path, timed):
    """One iteration, compiled: its only step compiles; nothing was timed, and the result
    says so (null) rather than reporting the compilation as the step time."""
    spec = run_spec(data_root, tmp_path, **{**RUN, "iterations": 1, "eval_every": 1})
    metrics = train(spec)
    assert metrics["timed_steps"] == 0 and metrics["compile_seconds"] == COMPILE
    assert metrics["seconds_per_iter"] is None and metrics["images_per_sec"] is None
    assert check_result(spec["output_dir"], spec["run_hash"]) == []


def test_a_log_line_of_a_window_that_timed_no_step(capsys):
    """The run's log line where a window held only a compile step: no images/s to show."""
    from pipeline.run_log import Progress

    Progress("run", tty=False)(2, 6, {"loss": 4.6, "acc": 0.0, "lr": 0.1, "compile_seconds": 1.0})
    assert " lr 0.1 - img/s eta " in capsys.readouterr().err
