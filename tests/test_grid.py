"""The run grid: spec shape per the contract, run names, and what the run hash depends on."""

import json
from pathlib import Path

import pytest
from conftest import fake_prepared

from pipeline import grid
from pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture
def params(tmp_path, monkeypatch):
    """ci-preset params with a fake prepared dataset (only the manifest matters here)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_prepared(tmp_path)
    return load_params(PARAMS, ["preset=ci", f"data.root={tmp_path}", "tune.enabled=false"])


def test_expand_covers_the_whole_grid(params):
    specs = grid.expand(params)
    assert len(specs) == 2 * 3 * 4
    cells = {(s["dataset"], s["arch_key"], s["optimizer"]["name"]) for s in specs}
    assert len(cells) == 24
    assert len({s["run_hash"] for s in specs}) == 24
    assert len({s["name"] for s in specs}) == 24


def test_spec_follows_the_contract(params, tmp_path):
    spec = grid.build_spec(params, "cifar100", "vgg", "vsgd", seed=0)
    assert list(spec) == [
        "name",
        "run_hash",
        "stage",
        "dataset",
        "arch_key",
        "arch",
        "data",
        "optimizer",
        "schedule",
        "batch_size",
        "seed",
        "training",
        "output_dir",
        "checkpoint",
        "tracking",
        "code_version",
    ]
    from vsgd.spec import code_version, run_hash

    assert spec["code_version"] == code_version()  # recorded, not identity:
    assert run_hash(spec) == spec["run_hash"]  # the hash is computed without the key
    assert spec["arch"] == "vgg16"
    assert spec["optimizer"] == {
        "name": "vsgd",
        "lr": 0.1,
        "ghattg": 30.0,
        "ps": 1e-8,
        "tau1": 0.81,
        "tau2": 0.9,
        "weight_decay": 0.0,
        "eps": 1e-8,
        "implementation": "auto",
    }
    assert spec["data"] == {
        "dir": f"{tmp_path}/prepared/cifar100",
        "checksum": "sum-cifar100",
        "source": "synthetic",
        "uri": None,
    }
    assert spec["schedule"] == {"iterations": 3, "step_size": 2, "gamma": 0.5}
    assert set(spec["training"]) == {
        "eval_every",
        "checkpoint_every",
        "log_every",
        "validation_size",
        "precision",
        "compile",
        "channels_last",
        "device",
        "eval_batch_size",
        "test_limit",
        "beta1_every",
        "deterministic",
        "denormals",
    }
    assert len(spec["run_hash"]) == 16
    assert spec["name"] == f"cifar100-vgg16-vsgd-s0-{spec['run_hash'][:8]}"
    assert spec["output_dir"] == f"results/store/{spec['run_hash']}"
    assert spec["checkpoint"] == f"checkpoints/{spec['run_hash']}"
    assert spec["tracking"] == {
        "uri": "sqlite:///mlflow.db",
        "experiment": "vsgd-repro",
        "system_metrics": "auto",
    }
    assert spec["stage"] == "train"
    adam = grid.build_spec(params, "tinyimagenet", "vgg", "adam", seed=1)
    assert adam["arch"] == "vgg19" and adam["optimizer"]["betas"] == [0.9, 0.999]
    json.dumps(spec)  # plain JSON all the way down


def test_hash_is_stable_and_ignores_locations(params, monkeypatch):
    a = grid.build_spec(params, "cifar100", "resnext", "sgd", seed=0)
    assert grid.build_spec(params, "cifar100", "resnext", "sgd", seed=0) == a
    moved = dict(
        params,
        tracking={"uri": "http://elsewhere:5000", "experiment": "other"},
        storage={"remote": "s3://bucket/prefix", "endpoint_url": None},
    )
    b = grid.build_spec(moved, "cifar100", "resnext", "sgd", seed=0)
    assert b["run_hash"] == a["run_hash"]
    assert b["checkpoint"] == f"s3://bucket/prefix/checkpoints/{a['run_hash']}"
    # Pods stage the dataset from its `.dir` object in the DVC remote under storage.remote.
    from pipeline.storage import dataset_uri

    assert b["data"]["uri"] == dataset_uri(a["data"]["dir"], "s3://bucket/prefix")
    assert b["data"]["uri"].startswith("s3://bucket/prefix/dvc/files/md5/")
    assert b["data"]["uri"].endswith(".dir") and a["data"]["uri"] is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    c = grid.build_spec(params, "cifar100", "resnext", "sgd", seed=0)
    assert c["tracking"]["uri"] == "http://tracking:5000" and c["run_hash"] == a["run_hash"]


@pytest.mark.parametrize(
    "override",
    [
        "optimizer.sgd.lr=0.2",
        "seeds=[1]",
        "protocol.cifar100.schedule.iterations=4",
        "protocol.cifar100.batch_size.resnext=8",
        "training.precision=bf16",
        "training.validation_size=16",
    ],
)
def test_hash_changes_with_what_determines_the_result(params, override):
    before = grid.build_spec(params, "cifar100", "resnext", "sgd", seed=params["seeds"][0])
    key, value = override.split("=")
    changed = load_params(PARAMS, ["preset=ci", f"data.root={params['data']['root']}", override])
    after = grid.build_spec(changed, "cifar100", "resnext", "sgd", seed=changed["seeds"][0])
    assert after["run_hash"] != before["run_hash"]


def test_hash_depends_on_data_checksum_and_code_version(params, monkeypatch):
    from vsgd import spec as vsgd_spec

    before = grid.build_spec(params, "cifar100", "vgg", "adam", seed=0)
    manifest = Path(params["data"]["root"]) / "prepared" / "cifar100" / "manifest.json"
    manifest.write_text(json.dumps({"checksum": "another"}))
    assert (
        grid.build_spec(params, "cifar100", "vgg", "adam", seed=0)["run_hash"] != before["run_hash"]
    )
    manifest.write_text(json.dumps({"checksum": "sum-cifar100"}))
    monkeypatch.setattr(vsgd_spec, "code_version", lambda: "0" * 64)
    assert (
        grid.build_spec(params, "cifar100", "vgg", "adam", seed=0)["run_hash"] != before["run_hash"]
    )


@pytest.mark.parametrize(
    "override", ["training.log_every=7", "training.checkpoint_every=9", "training.beta1_every=3"]
)
def test_bookkeeping_keys_do_not_change_the_run(params, override):
    """Logging and checkpoint frequencies change no result: editing them retrains nothing."""
    before = grid.build_spec(params, "cifar100", "vgg", "vsgd", seed=0)
    changed = load_params(PARAMS, ["preset=ci", f"data.root={params['data']['root']}", override])
    after = grid.build_spec(changed, "cifar100", "vgg", "vsgd", seed=0)
    assert after["training"] != before["training"]  # the run uses the new value ...
    assert after["run_hash"] == before["run_hash"]  # ... and is the same run


def test_vsgd_eps_is_a_param_and_part_of_the_identity(params):
    before = grid.build_spec(params, "cifar100", "vgg", "vsgd", seed=0)
    changed = load_params(
        PARAMS, ["preset=ci", f"data.root={params['data']['root']}", "optimizer.vsgd.eps=1e-6"]
    )
    after = grid.build_spec(changed, "cifar100", "vgg", "vsgd", seed=0)
    assert after["optimizer"]["eps"] == 1e-6 and before["optimizer"]["eps"] == 1e-8
    assert after["run_hash"] != before["run_hash"]


@pytest.mark.parametrize(
    "overrides,problem",
    [
        (["seeds=[0, 0]"], "seeds: duplicates in [0, 0]"),
        (["optimizer.sgd.grid={lr: [1, 1.0]}"], "optimizer.sgd.grid.lr: values must be unique"),
    ],
)
def test_two_grid_points_with_one_identity_are_refused(params, overrides, problem):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, ["preset=ci", f"data.root={params['data']['root']}", *overrides])
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_expand_refuses_duplicate_identities(params):
    """Whatever makes two grid points one run (here: validation bypassed), expand refuses."""
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError) as info:
        grid.expand(dict(params, seeds=[0, 0]))
    assert "are the same run" in str(info.value)


def test_lr_change_of_one_optimizer_changes_only_its_runs(params):
    before = {s["name"]: s["run_hash"] for s in grid.expand(params)}
    changed = load_params(
        PARAMS,
        [
            "preset=ci",
            f"data.root={params['data']['root']}",
            "tune.enabled=false",
            "optimizer.adam.lr=0.002",
        ],
    )
    after = {s["name"]: s["run_hash"] for s in grid.expand(changed)}
    gone = set(before) - set(after)
    assert len(gone) == 6 and all("-adam-" in n for n in gone)


def test_tuning_runs_have_readable_names(params):
    p = load_params(
        PARAMS,
        [
            "preset=ci",
            f"data.root={params['data']['root']}",
            "optimizer.vsgd.grid={lr: [0.1, 0.01], tau1: [0.9]}",
            "datasets=[cifar100]",
            "archs=[vgg]",
            "optimizers=[vsgd, sgd]",
        ],
    )
    names = [s["name"] for s in grid.tuning_specs(p)]
    assert len(names) == 4
    assert names[0].startswith("tune-cifar100-vgg16-vsgd-lr0.1-tau10.9-s0-")
    assert names[1].startswith("tune-cifar100-vgg16-vsgd-lr0.01-tau10.9-s0-")
    assert names[2].startswith("tune-cifar100-vgg16-sgd-lr0.05-s0-")


def test_each_run_names_the_stage_that_asked_for_it(params):
    """`stage` tags the MLflow run; bookkeeping, so the hash is the one of the spec
    without it."""
    from vsgd.spec import run_hash

    p = load_params(
        PARAMS,
        [
            "preset=ci",
            f"data.root={params['data']['root']}",
            "optimizer.vsgd.grid={lr: [0.1, 0.01]}",
            "datasets=[cifar100]",
            "archs=[vgg]",
            "optimizers=[vsgd, sgd]",
        ],
    )
    tune = grid.tuning_specs(p)
    final = grid.expand(
        p, {("cifar100", "vgg", "vsgd"): {"lr": 0.01}, ("cifar100", "vgg", "sgd"): {"lr": 0.05}}
    )
    assert [s["stage"] for s in tune] == ["tune"] * 4
    assert [s["stage"] for s in final] == ["train"] * 2 * len(p["seeds"])
    for spec in tune + final:
        assert run_hash({k: v for k, v in spec.items() if k != "stage"}) == spec["run_hash"]


def test_missing_manifest_gives_no_checksum(params, tmp_path):
    p = dict(params, data=dict(params["data"], root=str(tmp_path / "nowhere")))
    assert grid.build_spec(p, "cifar100", "vgg", "sgd", seed=0)["data"]["checksum"] is None
