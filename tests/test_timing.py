"""`seconds_per_iter` times the training step alone: evaluation (and logging, beta1
summaries, checkpoint writes) between the steps adds nothing to it.

The trainer's clock is replaced by a fake one that only moves when the test says: each
training step takes exactly STEP seconds and every piece of a log point's work a cost of its
own, so what the run reports is exact, not a comparison of wall clocks."""

import pytest
import torch
from conftest import run_spec

from vsgd import engine, step_clock
from vsgd import trainer as trainer_module
from vsgd.checkpoint import LocalCheckpointStore
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
ITERATIONS, BATCH = 6, 2
STEP = 0.25  # seconds per training step (binary fractions: the sums below are exact)
# What each piece of a log point's work takes on the fake clock, none of it a training step.
COST = {"evaluation": 8.0, "logging": 16.0, "progress": 32.0, "beta1": 64.0, "checkpoint": 128.0}


class FakeClock:
    """Stands in for the `time` module inside vsgd.step_clock (the trainer's clock):
    `perf_counter` reads a time that only `advance` moves; anything else is the real
    module's."""

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
def one_thread():
    """One intra-op thread: two threads on a loaded 2-core machine make a step ~20x slower
    (the fake clock does not care, the suite's time does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(step_clock, "time", clock)
    return clock


def costing(clock, calls, what, fn):
    """`fn`, which now takes COST[what] on the fake clock; its calls are counted."""

    def slow(*args, **kwargs):
        calls[what] = calls.get(what, 0) + 1
        clock.advance(COST[what])
        return fn(*args, **kwargs)

    return slow


def test_seconds_per_iter_leaves_out_evaluation_logging_and_checkpoints(
    data_root, tmp_path, monkeypatch, clock, one_thread
):
    calls = {}

    def step(*args, **kwargs):
        calls["step"] = calls.get("step", 0) + 1
        lr = train_step(*args, **kwargs)
        clock.advance(STEP)
        return lr

    train_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", step)
    monkeypatch.setattr(engine, "measure", costing(clock, calls, "evaluation", engine.measure))
    monkeypatch.setattr(
        trainer_module.Tracker,
        "log_metrics",
        costing(clock, calls, "logging", trainer_module.Tracker.log_metrics),
    )
    monkeypatch.setattr(
        trainer_module,
        "beta1_summary",
        costing(clock, calls, "beta1", trainer_module.beta1_summary),
    )
    monkeypatch.setattr(
        trainer_module,
        "save_checkpoint",
        costing(clock, calls, "checkpoint", trainer_module.save_checkpoint),
    )
    progress = costing(clock, calls, "progress", lambda step, total, info: None)

    spec = run_spec(
        data_root,
        tmp_path,
        iterations=ITERATIONS,
        batch_size=BATCH,
        optimizer=VSGD,
        eval_every=1,
        log_every=1,
        beta1_every=3,
        checkpoint_every=2,
        test_limit=8,
        eval_batch_size=8,
    )
    start = clock.now
    metrics = train(
        spec, checkpoint_store=LocalCheckpointStore(spec["checkpoint"]), progress=progress
    )

    # Every piece of work happened, at every log point where it is due ...
    assert calls == {
        "step": ITERATIONS,
        "evaluation": ITERATIONS,
        "logging": ITERATIONS,
        "progress": ITERATIONS,
        "beta1": 2,
        "checkpoint": 3,
    }
    excluded = sum(COST[what] * calls[what] for what in COST)
    assert clock.now - start == ITERATIONS * STEP + excluded
    # ... and none of it is in the time per step: exactly the steps' own.
    assert metrics["seconds_per_iter"] == STEP
    assert metrics["images_per_sec"] == BATCH / STEP
