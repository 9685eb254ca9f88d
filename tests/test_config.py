"""params.yaml loading: presets, overrides, and validation that lists every problem."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cells import resolve_run
from pipeline.config import load_params
from vsgd.spec import ARCHS, DATASETS, EX_CONFIG, OPTIMIZERS, ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def problems_of(overrides, path=PARAMS):
    with pytest.raises(ConfigError) as info:
        load_params(path, overrides)
    return info.value.problems


def test_defaults_are_the_papers_protocol():
    p = load_params(PARAMS)
    assert p["preset"] is None and "presets" not in p
    assert p["datasets"] == list(DATASETS) and p["archs"] == list(ARCHS)
    assert p["optimizers"] == list(OPTIMIZERS)
    c, t = p["protocol"]["cifar100"], p["protocol"]["tinyimagenet"]
    assert c["schedule"] == {"iterations": 30000, "step_size": 10000, "gamma": 0.5}
    assert t["schedule"] == {"iterations": 60000, "step_size": 20000, "gamma": 0.5}
    assert c["batch_size"] == {"vgg": 256, "convmixer": 256, "resnext": 128}
    assert t["batch_size"] == {"vgg": 128, "convmixer": 128, "resnext": 64}
    assert c["models"]["vgg"] == "vgg16" and t["models"]["vgg"] == "vgg19"
    v = p["optimizer"]["vsgd"]
    assert (v["ghattg"], v["ps"], v["tau1"], v["tau2"]) == (30.0, 1e-8, 0.81, 0.9)
    assert p["optimizer"]["sgd"]["momentum"] == 0.9
    for name in ("adam", "adamw"):
        assert p["optimizer"][name]["betas"] == [0.9, 0.999]
        assert p["optimizer"][name]["eps"] == 1e-8
    assert p["tracking"]["uri"] == "sqlite:///mlflow.db"
    assert p["storage"] == {"remote": None, "endpoint_url": None}
    assert p["data"]["source"] == "official"


@pytest.mark.parametrize("preset", ["tiny", "ci"])
def test_presets_resolve_and_keep_the_full_grid(preset):
    p = load_params(PARAMS, [f"preset={preset}"])
    assert p["preset"] == preset and p["data"]["source"] == "synthetic"
    assert len(p["datasets"]) * len(p["archs"]) * len(p["optimizers"]) == 24
    assert p["protocol"]["cifar100"]["models"]["vgg"] == "vgg16"  # untouched keys stay


def test_override_beats_preset_and_values_are_yaml():
    p = load_params(
        PARAMS,
        [
            "preset=ci",
            "protocol.cifar100.schedule.iterations=7",
            "seeds=[0, 1, 2]",
            "optimizer.vsgd.lr=1e-3",
        ],
    )
    assert p["protocol"]["cifar100"]["schedule"]["iterations"] == 7
    assert p["seeds"] == [0, 1, 2]
    assert p["optimizer"]["vsgd"]["lr"] == pytest.approx(1e-3)  # "1e-3" coerced to float


def test_every_problem_is_listed_with_its_path_and_allowed_values():
    problems = problems_of(
        [
            "datasets=[cifar10, tinyimagenet]",
            "archs=[vgg, resnet]",
            "optimizers=[sgd, adam, adamw, vsgd, lion]",
            "optimizer.sgd.lrr=0.1",
            "optimizer.adam.lr=-0.001",
            "optimizer.adamw.lr=0",
            "optimizer.vsgd.tau1=0.5",
            "optimizer.vsgd.tau2=1.5",
            "protocol.tinyimagenet.schedule.iterations=1000.5",
            "protocol.tinyimagenet.batch_size.vgg=200000",
            "training.precision=fp16",
            "training.evall_every=3",
            "data.source=internet",
            "executor.kind=slurm",
            "seeds=[-1]",
        ]
    )
    text = "\n".join(problems)
    expected = [
        "datasets[0]: cifar10 is not allowed (did you mean 'cifar100'?); allowed: cifar100, "
        "tinyimagenet",
        "archs[1]: resnet is not allowed",
        "optimizers[4]: lion is not allowed",
        "optimizer.sgd.lrr: unknown key (did you mean 'lr'?)",
        "optimizer.adam.lr: -0.001 is outside (0, inf)",
        "optimizer.adamw.lr: 0 is outside (0, inf)",
        "optimizer.vsgd.tau1: 0.5 is outside (0.5, 1]",
        "optimizer.vsgd.tau2: 1.5 is outside (0.5, 1]",
        "protocol.tinyimagenet.schedule.iterations: expected an integer, got 1000.5",
        # The tuned runs hold out tune.validation_size (5000) of the 100000 images.
        "protocol.tinyimagenet.batch_size.vgg: 200000 is larger than the 95000 training "
        "images of tinyimagenet",
        "training.precision: fp16 is not allowed (did you mean 'bf16'?); allowed: fp32, tf32, bf16",
        "training.evall_every: unknown key (did you mean 'eval_every'?)",
        "data.source: internet is not allowed; allowed: official, synthetic",
        "executor.kind: slurm is not allowed; allowed: local, kubernetes",
        "seeds[0]: -1 must be >= 0",
    ]
    for line in expected:
        assert line in text, f"missing {line!r} in:\n{text}"
    assert "optimizer.sgd.lr: missing" not in text or "lrr" in text


def test_grid_of_an_optimizer_and_the_tuned_cells():
    from pipeline.cells import tuned_cells

    p = load_params(PARAMS, ["optimizer.vsgd.grid={lr: [0.1, 0.01]}"])
    assert resolve_run(p, "cifar100", "vgg", "vsgd")["optimizer"]["grid"] == {"lr": [0.1, 0.01]}
    assert len(tuned_cells(p)) == 24  # every optimizer has a grid by default
    p = load_params(PARAMS, ["optimizer.vsgd.grid=null", "optimizer.sgd.grid={}"])
    assert {o for _, _, o in tuned_cells(p)} == {"adam", "adamw"}
    assert tuned_cells(load_params(PARAMS, ["tune.enabled=false"])) == []


def test_batch_checked_against_synthetic_size_and_experiment_overrides():
    problems = problems_of(
        ["preset=ci", "experiments=[{match: {arch: resnext, optimizer: vsgd}, batch_size: 1000}]"]
    )
    # VSGD is tuned at the ci budget: its tuning runs hold out 32 of the 256 images.
    assert any(
        "protocol.cifar100.batch_size.resnext: 1000 is larger than the 224 training "
        "images of cifar100 (runs with vsgd" in p
        for p in problems
    ), problems


def test_experiment_overrides_apply_to_matching_runs_only():
    p = load_params(
        PARAMS,
        [
            "experiments=[{match: {dataset: cifar100, optimizer: vsgd}, "
            "optimizer: {lr: 0.05}, schedule: {iterations: 100}}]"
        ],
    )
    hit = resolve_run(p, "cifar100", "convmixer", "vsgd")
    assert hit["optimizer"]["lr"] == 0.05 and hit["schedule"]["iterations"] == 100
    miss = resolve_run(p, "tinyimagenet", "convmixer", "vsgd")
    assert miss["optimizer"]["lr"] == p["optimizer"]["vsgd"]["lr"]
    problems = problems_of(
        [
            "experiments=[{match: {optimizer: vsgd, arch: vgg13}, "
            "optimizer: {tau1: 2}, batchsize: 3}]"
        ]
    )
    text = "\n".join(problems)
    assert "experiments[0].batchsize: unknown key (did you mean 'batch_size'?)" in text
    assert "experiments[0].match.arch: vgg13 is not allowed" in text
    assert "experiments[0].optimizer.tau1: 2 is outside (0.5, 1]" in text


def test_unknown_preset_and_malformed_override():
    assert any(
        "preset: unknown preset 'huge'; allowed: null, ci, demo, tiny" in p
        for p in problems_of(["preset=huge"])
    )
    assert problems_of(["no-equals-sign"]) == ["override 'no-equals-sign': expected key.path=value"]


def test_type_errors_and_missing_sections(tmp_path):
    params = yaml.safe_load(PARAMS.read_text())
    del params["training"]
    params["seeds"] = "zero"
    params["executor"]["kubernetes"] = {"namespace": "ok", "goes": [1, 2]}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    problems = problems_of([], path)
    assert "training: missing" in problems
    assert "seeds: expected a list, got str" in problems
    # executor.kubernetes is validated by its owner, pipeline.k8s_config, in the same list
    assert any(p.startswith("executor.kubernetes.goes: unknown key") for p in problems)


def test_validate_cli_exits_78_without_traceback(tmp_path):
    params = yaml.safe_load(PARAMS.read_text())
    params["optimizer"]["vsgd"]["tau1"] = 0.3
    params["archs"].append("vit")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "--params", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == EX_CONFIG
    assert "Traceback" not in proc.stderr
    assert "invalid configuration (2 problems)" in proc.stderr
    assert "optimizer.vsgd.tau1: 0.3 is outside (0.5, 1]" in proc.stderr
    assert "archs[3]: vit is not allowed; allowed: vgg, convmixer, resnext" in proc.stderr
