"""The benchmarks still run end to end (their figures live in docs/performance.md; no speed is
asserted here): tiny sizes, every code path of each row."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, cwd):
    """Run a benchmark from `cwd` (a temp dir: what the trainer's MLflow writes next to its
    working directory stays out of the checkout)."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.extended  # the whole script on both datasets; ceiling() is covered in process below
def test_train_throughput_rows_for_both_datasets(tmp_path):
    out = tmp_path / "rows.json"
    # CIFAR-100 (torchvision pickles) and Tiny ImageNet (ImageFolder of JPEGs) baselines.
    proc = run_script(
        "benchmarks/train_throughput.py",
        "--configs",
        "cifar100:convmixer_256_8",
        "tinyimagenet:convmixer_256_8",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--rounds",
        "1",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["dataset"], r["arch"], r["batch"]) for r in rows] == [
        ("cifar100", "convmixer_256_8", 2),
        ("tinyimagenet", "convmixer_256_8", 2),
    ]
    # Every row times under the float32 flags of (c)'s precision: strict fp32 for all three,
    # (a) and (b) included although they run before the trainer first sets the flags; and
    # with denormals flushed on the CPU, as (c)'s default.
    strict_fp32 = {
        "cudnn_allow_tf32": False,
        "matmul_allow_tf32": False,
        "float32_matmul_precision": "highest",
        "denormals": "flush",
    }
    for row in rows:
        for key, row_id in (("baseline", "a"), ("ceiling", "b"), ("ours", "c")):
            assert row[key] > 0 and row["rounds"][row_id] == [row[key]]
            assert row["flags"][row_id] == [strict_fp32], (row_id, row["flags"])
        assert row["precision"] == "fp32"
        assert row["compiled"] == {"a": False, "b": False, "c": False}  # compile auto: CUDA only
    assert "tinyimagenet:convmixer_256_8" in proc.stdout


def load_train_throughput():
    spec = importlib.util.spec_from_file_location(
        "train_throughput", ROOT / "benchmarks" / "train_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "setting, device, compiled",
    [
        ("auto", "cuda", True),
        ("auto", "cpu", False),
        (True, "cpu", True),
        (False, "cuda", False),
    ],
)
def test_train_throughput_compiles_the_ceiling_where_the_trainer_compiles(
    monkeypatch, setting, device, compiled
):
    """The ceiling follows vsgd.engine.build's rule for `training.compile` (restated in the
    benchmark); torch.compile is recorded, not run (compiling on CPU takes about a minute)."""
    bench = load_train_throughput()
    assert bench.compiles(setting, torch.device(device)) is compiled
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model: calls.append(model) or model)
    speed, flags = bench.ceiling(
        "cifar100", "convmixer_256_8", 2, 1, 1, torch.device("cpu"), "fp32", compiled
    )
    assert speed > 0 and flags["cudnn_allow_tf32"] is False
    assert len(calls) == (1 if compiled else 0)


def test_train_throughput_rejects_bad_arguments(tmp_path):
    proc = run_script("benchmarks/train_throughput.py", "--configs", "cifar100:vgg19", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown configuration(s) cifar100:vgg19" in proc.stderr
    assert "tinyimagenet:vgg19" in proc.stderr  # the allowed values are listed
    proc = run_script(
        "benchmarks/train_throughput.py", "--warmup", "1", "--iters", "2", cwd=tmp_path
    )
    assert proc.returncode == 2 and "no log point" in proc.stderr


def test_optimizer_step_runs(tmp_path):
    proc = run_script(
        "benchmarks/optimizer_step.py",
        "--sets",
        "convmixer_256_8",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--no-fused",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VSGD" in proc.stdout and "Adam" in proc.stdout


def test_data_verification_runs(tmp_path):
    out = tmp_path / "rows.json"
    proc = run_script(
        "benchmarks/data_verification.py",
        "--train",
        "32",
        "--test",
        "8",
        "--rounds",
        "1",
        "--root",
        str(tmp_path / "data"),
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["counts"] == {"train": 32, "test": 8}
    assert [(r["way"], r["load"]) for r in report["rows"]] == [
        (way, load) for way in ("plain", "verified", "digest+load") for load in ("first", "second")
    ]
    assert all(r["median_s"] > 0 and len(r["rounds"]) == 1 for r in report["rows"])
    assert "| verified | first |" in proc.stdout


def test_launcher_lock_runs(tmp_path):
    out = tmp_path / "rows.json"
    proc = run_script(
        "benchmarks/launcher_lock.py",
        "--runs",
        "3",
        "--lease-runs",
        "2",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert set(rows) == {"lock_ms", "inherited_check_ms", "lease_ms", "renewal_ms"}
    assert all(value > 0 for value in rows.values())


def test_denormals_times_the_step_kept_and_flushed_with_planted_denormals(tmp_path):
    out = tmp_path / "rows.json"
    proc = run_script(
        "benchmarks/denormals.py",
        "--batch",
        "2",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--fraction",
        "0.01",
        "--optimizers",
        "vsgd",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["optimizer"], r["plant"]) for r in rows] == [
        ("vsgd", "clean"),
        ("vsgd", "gradients"),
        ("vsgd", "weights"),
    ]
    weights = rows[2]
    # Every planted element is a denormal (made from its bits: nothing flushed on the way).
    assert weights["planted"] > 0 and weights["denormals"] == weights["planted"]
    for row in rows:
        for mode in ("keep", "flush"):
            assert len(row["ms"][mode]) == 1 and row["median_ms"][mode] > 0
        assert row["keep_over_flush"] > 0
    assert "| vsgd | gradients |" in proc.stdout
