"""The library's definition of a run: importable without torch, one source for the pipeline's
checks, and the run identity (what it covers, what it leaves out)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vsgd import spec as vsgd_spec

ROOT = Path(__file__).resolve().parents[1]


def test_spec_imports_without_torch_or_numpy():
    code = (
        "import sys, vsgd.spec, pipeline.config; "
        "print(sorted(m for m in ('torch', 'numpy', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
    assert out == "[]"


def test_pipeline_config_uses_the_library_definitions():
    from pipeline import config, contract, params_check
    from vsgd.data import registry
    from vsgd.models import MODELS

    for name in ("DATASETS", "MODELS", "ARCHS", "OPTIMIZERS"):
        assert getattr(params_check, name) is getattr(vsgd_spec, name)
    assert config.ConfigError is vsgd_spec.ConfigError
    assert contract.EX_CONFIG is vsgd_spec.EX_CONFIG
    assert MODELS is vsgd_spec.MODELS
    assert vsgd_spec.DATASETS == tuple(registry.DATASETS)


def test_check_spec_reports_key_paths_and_allowed_values(data_root, tmp_path):
    from conftest import run_spec

    spec = run_spec(data_root, tmp_path)
    assert vsgd_spec.check_spec(spec) == []
    spec["optimizer"] = {"name": "vsgd", "lr": -1, "tau1": 2.0, "epsilon": 1e-8}
    spec["training"]["precision"] = "fp8"
    problems = vsgd_spec.check_spec(spec)
    assert "optimizer.lr: -1 is outside (0, inf)" in problems
    assert "optimizer.tau1: 2.0 is outside (0.5, 1]" in problems
    assert any(
        p.startswith("optimizer.epsilon: unknown key (did you mean 'eps'?)") for p in problems
    )
    assert "training.precision: fp8 is not allowed; allowed: fp32, tf32, bf16" in problems


def _copy_package(tmp_path) -> Path:
    dest = tmp_path / "vsgd"
    shutil.copytree(ROOT / "vsgd", dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.parametrize(
    "module,changes_result",
    [
        ("optim.py", True),
        ("engine.py", True),
        ("models/vgg.py", True),
        ("data/augment.py", True),
        ("tracking.py", False),
        ("checkpoint.py", False),
        ("trainer.py", False),
        ("data/download.py", False),
        ("data/__main__.py", False),
        ("spec.py", False),
    ],
)
def test_code_version_covers_the_modules_that_compute_a_result(tmp_path, module, changes_result):
    package = _copy_package(tmp_path)
    before = vsgd_spec.code_version(package)
    with open(package / module, "a") as f:
        f.write("\n# an edit\n")
    vsgd_spec._CODE_VERSIONS.clear()
    assert (vsgd_spec.code_version(package) != before) is changes_result


def test_identity_leaves_out_locations_tracking_and_bookkeeping(data_root, tmp_path):
    from conftest import run_spec

    spec = run_spec(data_root, tmp_path)
    moved = dict(
        spec,
        name="other",
        output_dir="/elsewhere",
        checkpoint="s3://b/c",
        tracking={"uri": "http://mlflow:5000", "experiment": "x"},
        data=dict(spec["data"], dir="/scratch/x", uri="s3://b/d.dir"),
        training=dict(spec["training"], log_every=99, checkpoint_every=99, beta1_every=99),
        code_version="f" * 64,
    )  # the launcher's code version: recorded, not identity
    assert vsgd_spec.run_hash(moved) == vsgd_spec.run_hash(spec)
    assert "code_version" not in vsgd_spec.identity(moved)
    assert vsgd_spec.check_spec(moved) == []
    assert vsgd_spec.check_spec(dict(spec, code_version=5)) == [
        "code_version: expected a non-empty string, got 5"
    ]
    for key, value in (("eval_every", 3), ("test_limit", 8), ("precision", "bf16")):
        other = dict(spec, training=dict(spec["training"], **{key: value}))
        assert vsgd_spec.run_hash(other) != vsgd_spec.run_hash(spec), key
    # Training keys left out of a spec take their defaults: the same run either way.
    explicit = dict(spec, training={**vsgd_spec.TRAINING_DEFAULTS, **spec["training"]})
    trimmed = dict(
        spec,
        training={k: v for k, v in spec["training"].items() if v != vsgd_spec.TRAINING_DEFAULTS[k]},
    )
    assert vsgd_spec.run_hash(explicit) == vsgd_spec.run_hash(trimmed)


def test_the_stage_key_is_not_part_of_the_run_identity(data_root, tmp_path):
    """`stage` (which stage asked for the run: tune or train) is bookkeeping: the run hash of
    a spec is the same with it, and older specs without it stay valid."""
    from conftest import run_spec

    spec = run_spec(data_root, tmp_path)
    assert "stage" not in spec and vsgd_spec.check_spec(spec) == []
    for stage in vsgd_spec.STAGES:
        staged = dict(spec, stage=stage)
        assert vsgd_spec.run_hash(staged) == vsgd_spec.run_hash(spec) == spec["run_hash"]
        assert "stage" not in vsgd_spec.identity(staged)
        assert vsgd_spec.check_spec(staged) == []
    [problem] = vsgd_spec.check_spec(dict(spec, stage="finetune"))
    assert problem.startswith("stage: finetune is not allowed")
    assert problem.endswith("allowed: tune, train")
