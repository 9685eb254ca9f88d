"""Divergence: the first step whose training loss is NaN or inf is recorded on the device, the
next log point stops the run without evaluating the broken model, and the run is reported as
finished and diverged (metrics, curve, beta1.csv, checkpoint, MLflow)."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import crash_at, run_spec, untimed

from vsgd import engine, trainer
from vsgd.checkpoint import LocalCheckpointStore, from_bytes
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


class PoisonAt(torch.nn.Module):
    """The model, with NaN logits in training mode at step `step` (1-based, the step
    `current` says is running): the loss of that step is NaN, and the update makes every
    later one NaN too."""

    def __init__(self, model, step, current):
        super().__init__()
        self.model, self.step, self.current = model, step, current

    def forward(self, x):
        out = self.model(x)
        if self.training and self.current["step"] == self.step:
            out = out * float("nan")
        return out


@pytest.fixture
def poison(monkeypatch):
    """`poison(step)`: runs built from now on produce a NaN loss at `step`. The step comes
    from the training state, so a resumed run is poisoned at the same step."""
    current = {"step": 0}
    build, train_step = engine.build, engine.train_step

    def counting_step(run, state):
        current["step"] = state.step + 1
        return train_step(run, state)

    def set_step(step):
        def poisoned_build(*args, **kwargs):
            run = build(*args, **kwargs)
            run.forward = PoisonAt(run.forward, step, current)
            return run

        monkeypatch.setattr(engine, "build", poisoned_build)
        monkeypatch.setattr(engine, "train_step", counting_step)

    return set_step


def read(spec):
    out = Path(spec["output_dir"])
    with open(out / "curve.csv") as f:
        curve = list(csv.DictReader(f))
    beta1 = (out / "beta1.csv").read_text() if (out / "beta1.csv").exists() else None
    return json.loads((out / "metrics.json").read_text()), curve, beta1


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_train_step_records_the_first_nonfinite_step_on_the_device(
    data_root, tmp_path, monkeypatch, bad
):
    spec = run_spec(data_root, tmp_path, iterations=5)
    run, _ = trainer.setup(spec)
    state = engine.new_state(run)
    assert state.nonfinite.item() == -1 and state.nonfinite.device == run.device
    cross_entropy = torch.nn.functional.cross_entropy
    scale = {3: float(bad), 4: float("nan")}  # steps 3 and 4 bad: step 3 is recorded

    def loss_of(*args, **kwargs):
        return cross_entropy(*args, **kwargs) * scale.get(state.step + 1, 1.0)

    monkeypatch.setattr(engine.F, "cross_entropy", loss_of)
    for step in range(1, 6):
        engine.train_step(run, state)
        assert state.nonfinite.item() == (-1 if step < 3 else 3), step


def test_a_nan_loss_stops_the_run_as_diverged(data_root, tmp_path, poison, monkeypatch):
    """NaN at step 5; log points at 2, 3, 4, 6, ...: the run stops at 6 without evaluating,
    reports the evaluation at 4, and its MLflow run is FINISHED and tagged diverged."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    poison(5)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = run_spec(
        data_root,
        tmp_path,
        iterations=10,
        optimizer=VSGD,
        log_every=3,
        eval_every=2,
        checkpoint_every=2,
        tracking_uri=uri,
    )
    store = LocalCheckpointStore(spec["checkpoint"])
    seen = []
    metrics = train(spec, checkpoint_store=store, progress=lambda s, t, i: seen.append((s, i)))

    assert [s for s, _ in seen] == [2, 3, 4, 6]
    assert math.isnan(seen[-1][1]["loss"]) and "test_acc" not in seen[-1][1]
    assert metrics["diverged"] == {"step": 5, "stopped_at": 6}
    assert metrics["iterations"] == 10 and metrics["steps_done"] == 6
    on_disk, curve, beta1 = read(spec)
    assert on_disk == metrics
    assert [int(r["step"]) for r in curve] == [2, 4]  # no evaluation of the NaN model
    for key in ("test_acc", "test_loss", "train_loss", "train_acc"):
        assert metrics[key] == float(curve[-1][key]) and math.isfinite(metrics[key]), key
    assert metrics["val_acc"] is None
    assert [line.split(",")[0] for line in beta1.splitlines()] == ["step", "2", "4"]
    assert all(math.isfinite(float(v)) for line in beta1.splitlines()[1:] for v in line.split(","))
    saved = from_bytes(store.load())  # the last checkpoint is before the divergence
    assert saved["step"] == 4 and saved["nonfinite"].item() == -1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "true"


def test_a_run_that_diverges_before_any_evaluation_reports_none(data_root, tmp_path, poison):
    poison(1)
    spec = run_spec(data_root, tmp_path, iterations=4, eval_every=2, log_every=1)
    metrics = train(spec)
    assert metrics["diverged"] == {"step": 1, "stopped_at": 1}
    assert metrics["steps_done"] == 1 and metrics["iterations"] == 4
    for key in ("test_acc", "test_loss", "train_loss", "train_acc", "val_acc"):
        assert metrics[key] is None, key
    _, curve, beta1 = read(spec)
    assert curve == [] and beta1 is None  # SGD: no beta1.csv
    assert metrics["seconds_per_iter"] > 0


def test_a_resumed_run_diverges_exactly_as_an_uninterrupted_one(data_root, tmp_path, poison):
    poison(6)
    kw = dict(iterations=10, optimizer=VSGD, log_every=2, eval_every=2, checkpoint_every=2)
    ref = run_spec(data_root, tmp_path / "ref", **kw)
    train(ref)
    spec = run_spec(data_root, tmp_path / "int", **kw)
    store = LocalCheckpointStore(spec["checkpoint"])
    with pytest.raises(RuntimeError, match="boom"):
        train(spec, checkpoint_store=store, progress=crash_at(4))
    assert from_bytes(store.load())["step"] == 2
    metrics = train(spec, checkpoint_store=store)
    assert metrics["diverged"] == {"step": 6, "stopped_at": 6}
    (m_ref, c_ref, b_ref), (m, c, b) = read(ref), read(spec)
    assert untimed(m) == untimed(m_ref) and c == c_ref and b == b_ref
    assert [int(r["step"]) for r in c] == [2, 4]


def test_a_normal_run_is_not_diverged(data_root, tmp_path):
    metrics = train(run_spec(data_root, tmp_path, iterations=2))
    assert metrics["diverged"] is None and metrics["steps_done"] == metrics["iterations"] == 2
