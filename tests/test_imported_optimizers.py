"""An optimizer named by import path beside the built-ins: validated before any work, part of
the run identity with the version of the package that provides it, trained like any other.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fake_prepared, run_spec

from pipeline.config import ConfigError, load_params
from pipeline.grid import expand
from vsgd import imported_optimizers
from vsgd.spec import ConfigError as SpecConfigError
from vsgd.spec import check_spec, run_hash

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
RADAM = "{class: 'torch.optim:RAdam', lr: 0.001, betas: [0.9, 0.999], weight_decay: 0.0}"


def params(tmp_path, entry=RADAM, *extra):
    fake_prepared(tmp_path / "data")
    return load_params(
        PARAMS,
        [
            "preset=ci",
            "datasets=[cifar100]",
            "archs=[vgg]",
            "optimizers=[vsgd, radam]",
            "tune.enabled=false",
            f"data.root={tmp_path / 'data'}",
            f"optimizer.radam={entry}",
            *extra,
        ],
    )


def test_an_imported_optimizer_joins_the_grid_with_its_class_and_package(tmp_path):
    specs = expand(params(tmp_path))
    [radam] = [s for s in specs if s["optimizer"]["name"] == "radam"]
    from importlib.metadata import version

    assert radam["optimizer"]["class"] == "torch.optim:RAdam"
    assert radam["optimizer"]["package"] == f"torch=={version('torch')}"
    assert radam["optimizer"]["lr"] == 0.001 and radam["optimizer"]["betas"] == [0.9, 0.999]
    assert check_spec(radam) == []


def test_a_new_version_of_the_providing_package_is_a_new_run(tmp_path):
    [radam] = [s for s in expand(params(tmp_path)) if s["optimizer"]["name"] == "radam"]
    upgraded = json.loads(json.dumps(radam))
    upgraded["optimizer"]["package"] = "torch==99.0"
    assert run_hash(upgraded) != radam["run_hash"]
    moved = json.loads(json.dumps(radam))
    moved["optimizer"]["class"] = "my_fork.optim:RAdam"
    assert run_hash(moved) != radam["run_hash"]


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            "{class: 'no_such_module.optim:Opt', lr: 0.1}",
            "optimizer.radam.class: cannot import module 'no_such_module.optim': "
            "ModuleNotFoundError",
        ),
        (
            "{class: 'torch.optim:RAdamm', lr: 0.1}",
            "optimizer.radam.class: module 'torch.optim' has no 'RAdamm'; did you mean RAdam",
        ),
        (
            "{class: 'torch.nn:Linear', lr: 0.1}",
            "optimizer.radam.class: torch.nn:Linear is not a torch.optim.Optimizer subclass",
        ),
        (
            "{class: 'torch.optim:RAdam', lr: 0.1, momentun: 0.9}",
            "optimizer.radam.momentun: not an argument of torch.optim:RAdam; it takes: lr, "
            "betas, eps",
        ),
        (
            "{class: 'torch.optim:RAdam', lr: -0.1}",
            "optimizer.radam: torch.optim:RAdam rejects these values (lr=-0.1): ValueError: "
            "Invalid learning rate: -0.1",
        ),
        (
            "{class: 'torch.optim:RAdam', lr: 0.1, grid: {lr: [0.1, -1.0]}}",
            "optimizer.radam.grid.lr[1]: torch.optim:RAdam rejects these values",
        ),
        ("{class: 'torch.optim:RAdam', betas: [0.9, 0.99]}", "optimizer.radam.lr: missing"),
    ],
)
def test_a_bad_imported_optimizer_fails_validation_with_its_key_path(tmp_path, entry, message):
    with pytest.raises(ConfigError) as err:
        params(tmp_path, entry)
    assert message in str(err.value)


def test_every_bad_entry_is_listed_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        params(
            tmp_path,
            "{class: 'torch.optim:RAdamm', lr: 0.1}",
            "optimizers=[vsgd, radam, lion]",
            "optimizer.lion={class: 'torch.optim:SGD', lr: 0.1, momentun: 0.9}",
        )
    assert len(err.value.problems) == 2
    assert "optimizer.radam.class" in str(err.value) and "optimizer.lion.momentun" in str(err.value)


def test_a_built_in_key_cannot_be_redirected_to_another_class(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, ["preset=ci", "optimizer.sgd.class=torch.optim:RAdam"])
    assert "optimizer.sgd.class: sgd is a built-in optimizer" in str(err.value)


def test_bad_entries_start_nothing(tmp_path):
    """Through the train stage: exit 78, every problem, no traceback, no run started."""
    fake_prepared(tmp_path / "data")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "--params",
            str(PARAMS),
            "--set",
            "preset=ci",
            "--set",
            "datasets=[cifar100]",
            "--set",
            "archs=[vgg]",
            "--set",
            "optimizers=[vsgd, radam]",
            "--set",
            "tune.enabled=false",
            "--set",
            f"data.root={tmp_path / 'data'}",
            "--set",
            "optimizer.radam={class: 'torch.optim:RAdam', lr: -1.0}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 78, result.stderr
    assert "rejects these values" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_pod_with_another_package_version_refuses_to_train(data_root, tmp_path):
    optimizer = {
        "name": "radam",
        "class": "torch.optim:RAdam",
        "package": "torch==0.0.1",
        "lr": 0.001,
    }
    spec = run_spec(data_root, tmp_path, optimizer=optimizer, iterations=2)
    from vsgd.trainer import train

    with pytest.raises(SpecConfigError) as err:
        train(spec)
    assert "optimizer.package: the run was planned with torch==0.0.1" in str(err.value)


def test_an_imported_optimizer_trains_and_resumes_exactly(data_root, tmp_path):
    from conftest import crash_at

    from vsgd.checkpoint import LocalCheckpointStore
    from vsgd.trainer import train

    optimizer = {
        "name": "radam",
        "class": "torch.optim:RAdam",
        "package": imported_optimizers.provider("torch.optim:RAdam"),
        "lr": 0.001,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
    }
    ref = run_spec(
        data_root, tmp_path / "ref", optimizer=optimizer, iterations=4, checkpoint_every=2
    )
    spec = run_spec(
        data_root, tmp_path / "cut", optimizer=optimizer, iterations=4, checkpoint_every=2
    )
    expected = train(ref)
    store = LocalCheckpointStore(spec["checkpoint"])
    with pytest.raises(RuntimeError):
        train(spec, checkpoint_store=store, progress=crash_at(3))
    resumed = train(spec, checkpoint_store=store)
    for key in ("test_acc", "test_loss", "train_loss"):
        assert resumed[key] == expected[key]
    assert (Path(spec["output_dir"]) / "curve.csv").read_text() == (
        Path(ref["output_dir"]) / "curve.csv"
    ).read_text()
