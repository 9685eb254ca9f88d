"""`seconds_per_iter` times the training step alone: evaluation (and logging, beta1
summaries, checkpoint writes) between the steps adds nothing to it."""

import time

import pytest
import torch

from conftest import run_spec
from vsgd import engine
from vsgd.trainer import train


@pytest.fixture
def one_thread():
    """One intra-op thread: two threads on a loaded 2-core machine make a step ~20x slower
    and its time erratic, which this test compares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seconds_per_iter_leaves_out_evaluation(data_root, tmp_path, monkeypatch, one_thread):
    kw = dict(iterations=6, batch_size=2, eval_every=1, log_every=1, test_limit=8,
              eval_batch_size=8)
    train(run_spec(data_root, tmp_path / "warm-up", **{**kw, "iterations": 2}))
    plain = train(run_spec(data_root, tmp_path / "plain", **kw))
    # Evaluation made slow enough to multiply the step time by 10 if it were counted in.
    sleep = max(0.3, 10 * plain["seconds_per_iter"])
    evaluate, calls = engine.evaluate, []

    def slow_evaluate(*args, **kwargs):
        calls.append(1)
        time.sleep(sleep)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", slow_evaluate)
    slow = train(run_spec(data_root, tmp_path / "slow", **kw))
    assert len(calls) == kw["iterations"]  # one evaluation per step
    assert slow["seconds_per_iter"] < 2 * plain["seconds_per_iter"], (slow, plain)
    assert slow["images_per_sec"] == 2 / slow["seconds_per_iter"]
