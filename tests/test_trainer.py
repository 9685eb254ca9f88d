"""The trainer on synthetic data: a short run per architecture, learnability, outputs, resume
(in process and after SIGKILL of a subprocess, bit for bit), and the CLI's exit codes."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, crash_at, run_spec, untimed

from vsgd.checkpoint import LocalCheckpointStore, from_bytes
from vsgd.outputs import CURVE_COLUMNS
from vsgd.spec import ConfigError, check_spec
from vsgd.trainer import train

METRICS_KEYS = {
    "sha256",
    "name",
    "run_hash",
    "dataset",
    "arch",
    "arch_key",
    "optimizer",
    "lr",
    "seed",
    "iterations",
    "steps_done",
    "diverged",
    "test_acc",
    "test_loss",
    "train_loss",
    "train_acc",
    "val_acc",
    "seconds_per_iter",
    "timed_steps",
    "compile_seconds",
    "images_per_sec",
    "device",
    "device_name",
    "denormals_in_effect",
    "mlflow_run_id",
}
VSGD = {
    "name": "vsgd",
    "lr": 0.01,
    "ghattg": 30.0,
    "ps": 1e-8,
    "tau1": 0.81,
    "tau2": 0.9,
    "weight_decay": 0.0,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("MLFLOW_TRACKING_URI", None)


def read_outputs(spec):
    out = Path(spec["output_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "curve.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CURVE_COLUMNS
        curve = list(reader)
    assert json.loads((out / "config.json").read_text()) == spec
    return metrics, curve


def beta1_csv(spec) -> str | None:
    """The run's beta1.csv as text; None when it wrote none."""
    path = Path(spec["output_dir"]) / "beta1.csv"
    return path.read_text() if path.exists() else None


@pytest.mark.parametrize(
    "dataset,arch,optimizer",
    [
        (
            "cifar100",
            "vgg16",
            {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        ),
        (
            "tinyimagenet",
            "vgg19",
            {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
        ),
        ("cifar100", "convmixer_256_8", VSGD),
        (
            "cifar100",
            "resnext18",
            {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        ),
    ],
)
def test_short_run_per_architecture(data_root, tmp_path, dataset, arch, optimizer):
    spec = run_spec(
        data_root,
        tmp_path,
        dataset=dataset,
        arch=arch,
        optimizer=optimizer,
        iterations=2,
        eval_every=1,
        validation_size=16,
    )
    seen = []
    metrics = train(spec, progress=lambda step, total, info: seen.append((step, info)))
    assert [s for s, _ in seen] == [1, 2]
    assert metrics == read_outputs(spec)[0]
    assert set(metrics) == METRICS_KEYS
    assert metrics["optimizer"] == optimizer["name"] and metrics["iterations"] == 2
    assert metrics["steps_done"] == 2 and metrics["diverged"] is None
    for key in ("test_acc", "test_loss", "train_loss", "train_acc", "val_acc"):
        assert math.isfinite(metrics[key])
    assert 0 <= metrics["test_acc"] <= 1 and metrics["images_per_sec"] > 0
    _, curve = read_outputs(spec)
    assert [int(r["step"]) for r in curve] == [1, 2]
    assert float(curve[-1]["lr"]) == optimizer["lr"] * 0.5  # StepLR(1, 0.5): step 2's lr
    if optimizer["name"] == "vsgd":
        assert 0 < seen[-1][1]["beta1_median"] < 1
        assert beta1_csv(spec).splitlines()[0] == "step,mean,q10,q25,median,q75,q90"
    else:
        assert beta1_csv(spec) is None


def test_bf16_autocast_and_contiguous_layout(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path, iterations=2, precision="bf16", channels_last=False)
    metrics = train(spec)
    assert math.isfinite(metrics["test_loss"]) and math.isfinite(metrics["train_loss"])


@pytest.fixture(scope="module")
def learnable_root(tmp_path_factory):
    from vsgd.data import prepare

    root = tmp_path_factory.mktemp("learnable")
    prepare("cifar100", "synthetic", root, synthetic_sizes={"train": 2048, "test": 256})
    return root


def test_synthetic_data_is_learnt_through_the_trainer(learnable_root, tmp_path):
    spec = run_spec(
        learnable_root,
        tmp_path,
        arch="convmixer_256_8",
        iterations=60,
        batch_size=16,
        optimizer={"name": "adam", "lr": 2e-3},
        eval_every=60,
        log_every=20,
        test_limit=0,
        eval_batch_size=128,
    )
    metrics = train(spec)
    assert metrics["test_acc"] > 0.05, metrics  # chance is 0.01 (100 classes, 256 images)


def test_resume_in_process_is_exact_and_a_finished_run_only_reports(data_root, tmp_path):
    kw = dict(iterations=6, optimizer=VSGD, eval_every=3, checkpoint_every=2)
    ref = train(run_spec(data_root, tmp_path / "ref", **kw))

    spec = run_spec(data_root, tmp_path / "int", **kw)
    store = LocalCheckpointStore(spec["checkpoint"])
    with pytest.raises(RuntimeError, match="boom"):
        train(spec, checkpoint_store=store, progress=crash_at(5))
    assert from_bytes(store.load())["step"] == 4
    assert not (Path(spec["output_dir"]) / "metrics.json").exists()
    steps = []
    resumed = train(spec, checkpoint_store=store, progress=lambda s, t, i: steps.append(s))
    assert steps == [5, 6]
    assert untimed(resumed) == untimed(ref)
    ref_spec = run_spec(data_root, tmp_path / "ref", **kw)
    assert read_outputs(spec)[1] == read_outputs(ref_spec)[1]
    # beta1 rows at 2, 4 (in the checkpoint) and 6: the same as the uninterrupted run's.
    assert [line.split(",")[0] for line in beta1_csv(spec).splitlines()] == ["step", "2", "4", "6"]
    assert beta1_csv(spec) == beta1_csv(ref_spec)

    steps.clear()
    again = train(spec, checkpoint_store=store, progress=lambda s, t, i: steps.append(s))
    assert steps == [] and again == resumed


def test_checkpoint_of_another_run_is_refused(data_root, tmp_path):
    a = run_spec(data_root, tmp_path, iterations=1)
    b = run_spec(data_root, tmp_path, iterations=1, seed=1)
    store = LocalCheckpointStore(tmp_path / "shared")
    train(a, checkpoint_store=store)
    with pytest.raises(RuntimeError, match="belongs to run"):
        train(b, checkpoint_store=store)


def test_local_store_save_is_atomic(tmp_path, monkeypatch):
    store = LocalCheckpointStore(tmp_path / "c")
    assert store.load() is None
    store.save(b"first")

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(b"second")
    assert store.load() == b"first"
    assert [p.name for p in store.dir.iterdir()] == ["checkpoint.pt"]  # no temp file left


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *args],
        cwd=kw.get("cwd"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkill_mid_training_then_resume_is_bit_identical(data_root, tmp_path):
    """A subprocess run is SIGKILLed mid-training (after its step-7 log line; checkpoints at
    3 and 6) and started again; it must end exactly as an uninterrupted run: same parameters,
    optimizer state and metrics, bit for bit."""
    kw = dict(iterations=12, optimizer=VSGD, eval_every=5, checkpoint_every=3)
    ref = run_spec(data_root, tmp_path / "ref", tracking_uri=f"sqlite:///{tmp_path}/ref.db", **kw)
    spec = run_spec(data_root, tmp_path / "kill", tracking_uri=f"sqlite:///{tmp_path}/k.db", **kw)
    files = {"ref": tmp_path / "ref.json", "kill": tmp_path / "kill.json"}
    files["ref"].write_text(json.dumps(ref))
    files["kill"].write_text(json.dumps(spec))

    proc = _cli("--spec", str(files["kill"]), cwd=tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 7/12"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    assert not (Path(spec["output_dir"]) / "metrics.json").exists()

    for path in (files["ref"], files["kill"]):
        p = _cli("--spec", str(path), cwd=tmp_path)
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out
    assert "resuming" in out and "at step 6/12" in out, out

    (m_ref, c_ref), (m, c) = read_outputs(ref), read_outputs(spec)
    assert untimed(m) == untimed(m_ref) and c == c_ref
    assert beta1_csv(spec) == beta1_csv(ref) and len(beta1_csv(spec).splitlines()) == 1 + 6
    a = from_bytes(LocalCheckpointStore(ref["checkpoint"]).load())
    b = from_bytes(LocalCheckpointStore(spec["checkpoint"]).load())
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "data",
        "step",
        "curve",
        "beta1",
        "nonfinite",
    ):
        assert _same(a[key], b[key]), key

    # The resumed process continued the killed one's MLflow run, replaying no logged step.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=spec["tracking"]["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.run_id == m["mlflow_run_id"] and run.info.status == "FINISHED"
    assert sorted(x.step for x in client.get_metric_history(run.info.run_id, "train_loss")) == list(
        range(1, 13)
    )


def _same(a, b) -> bool:
    """Exact equality of nested checkpoint contents (tensors bit for bit)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def test_check_spec_lists_every_problem(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path)
    assert check_spec(spec) == []
    spec.update(dataset="mnist", batch_size=0)
    spec["optimizer"]["lr"] = -1.0
    spec["training"].update(precision="fp16", bogus=1)
    problems = check_spec(spec)
    for part in ("dataset", "batch_size", "optimizer", "training.precision", "training.bogus"):
        assert any(p.startswith(part) for p in problems), (part, problems)
    with pytest.raises(ConfigError):
        train(spec)


def test_cli_invalid_spec_exits_78_without_traceback(tmp_path):
    p = _cli("--spec-json", json.dumps({"dataset": "mnist", "arch": "vgg16"}), cwd=tmp_path)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 78, out
    assert "invalid configuration" in out and "dataset" in out and "Traceback" not in out


def test_cli_builds_the_spec_from_params(data_root, tmp_path):
    p = _cli(
        "--params",
        str(ROOT / "params.yaml"),
        "--dataset",
        "cifar100",
        "--arch",
        "convmixer",
        "--optimizer",
        "sgd",
        "--set",
        "preset=ci",
        "--set",
        f"data.root={data_root}",
        "--set",
        "tracking.uri=sqlite:///m.db",
        cwd=tmp_path,
    )
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    [metrics] = [json.loads(m.read_text()) for m in tmp_path.glob("results/store/*/metrics.json")]
    assert metrics["arch"] == "convmixer_256_8" and metrics["optimizer"] == "sgd"
    assert (tmp_path / "checkpoints" / metrics["run_hash"] / "checkpoint.pt").exists()
