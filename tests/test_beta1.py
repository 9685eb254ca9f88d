"""VSGD's adaptive-momentum curve: `beta1_summary`'s quantiles, and beta1.csv (one row per
beta1 point, VSGD runs only, written before metrics.json, in MLflow as beta1_*)."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_spec

from vsgd import VSGD, outputs
from vsgd.optim import beta1_summary
from vsgd.outputs import BETA1_COLUMNS
from vsgd.spec import BOOKKEEPING, TRAINING_DEFAULTS
from vsgd.trainer import train

VSGD_SPEC = {
    "name": "vsgd",
    "lr": 0.01,
    "ghattg": 30.0,
    "ps": 1e-8,
    "tau1": 0.81,
    "tau2": 0.9,
    "weight_decay": 0.0,
}
KEYS = ("mean", "q10", "q25", "median", "q75", "q90")
LEVELS = {"q10": 10, "q25": 25, "median": 50, "q75": 75, "q90": 90}


def stepped(shapes, steps=3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    opt = VSGD(params, lr=0.01)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def test_summary_has_the_mean_median_and_quantiles_of_every_element():
    opt = stepped([(50,), (20, 3), (7,)])
    values = torch.cat([b.reshape(-1) for b in opt.beta1()]).double().numpy()
    summary = beta1_summary(opt)
    assert tuple(summary) == KEYS
    assert summary["mean"] == pytest.approx(values.mean(), rel=1e-12)
    for key, level in LEVELS.items():
        # An element of the sample, the lower one where a quantile falls between two.
        assert summary[key] == np.percentile(values, level, method="lower"), key
    assert summary["median"] == torch.from_numpy(values).median().item()
    assert summary["q10"] <= summary["q25"] <= summary["median"] <= summary["q75"] <= summary["q90"]


def test_summary_before_the_first_step_is_nan():
    opt = VSGD([torch.zeros(3, requires_grad=True)])
    summary = beta1_summary(opt)
    assert tuple(summary) == KEYS and all(math.isnan(v) for v in summary.values())


def test_summary_of_a_large_model_is_subsampled():
    opt = stepped([(1500, 1000)], steps=1)  # 1.5M elements: stride 2
    values = opt.beta1()[0].reshape(-1)[::2].double().numpy()
    summary = beta1_summary(opt)
    assert summary["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert summary["q90"] == np.percentile(values, 90, method="lower")


def test_beta1_every_defaults_to_100_and_is_bookkeeping():
    assert TRAINING_DEFAULTS["beta1_every"] == 100 and "beta1_every" in BOOKKEEPING


def test_vsgd_run_writes_beta1_csv_before_metrics(data_root, tmp_path, monkeypatch):
    written = []
    atomic_write = outputs.atomic_write  # the result files' writer
    monkeypatch.setattr(
        outputs,
        "atomic_write",
        lambda path, data: (written.append(Path(path).name), atomic_write(path, data)),
    )
    spec = run_spec(data_root, tmp_path, iterations=5, optimizer=VSGD_SPEC, beta1_every=2)
    seen = []
    train(spec, progress=lambda s, t, info: seen.append((s, info)))
    assert written.index("beta1.csv") < written.index("metrics.json")
    with open(Path(spec["output_dir"]) / "beta1.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == BETA1_COLUMNS
        rows = list(reader)
    assert [int(r["step"]) for r in rows] == [2, 4, 5]  # every 2 steps and the last one
    for row in rows:
        q = [float(row[k]) for k in ("q10", "q25", "median", "q75", "q90")]
        assert q == sorted(q) and 0 < q[0] and q[-1] < 1 and 0 < float(row["mean"]) < 1
    # The progress (and MLflow) values are the rows' values.
    logged = {s: info for s, info in seen if "beta1_median" in info}
    assert sorted(logged) == [2, 4, 5]
    for row in rows:
        info = logged[int(row["step"])]
        assert {k: info[f"beta1_{k}"] for k in KEYS} == {k: float(row[k]) for k in KEYS}


def test_other_optimizers_write_no_beta1_csv(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path, iterations=2)  # SGD
    train(spec)
    assert not (Path(spec["output_dir"]) / "beta1.csv").exists()
    assert (Path(spec["output_dir"]) / "metrics.json").exists()
