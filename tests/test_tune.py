"""The tune stage's choice: validation accuracy only (never test), ties to the smaller value,
never a diverged point; selections read back only for the grid they were made on; the grid
of any hyperparameter validated like the hyperparameter itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import fake_prepared

from pipeline import grid, plan, tune
from pipeline.cells import tuned_cells
from pipeline.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
CELL = ("cifar100", "vgg", "sgd")


def row(lr, val_acc, diverged=False, test_acc=None, cell=CELL):
    return {
        "cell": cell,
        "values": {"lr": lr},
        "val_acc": val_acc,
        "diverged": diverged,
        "test_acc": test_acc,
        "run": f"r{lr}",
        "run_hash": "h",
        "iterations": 3,
    }


def test_validation_decides_even_when_test_disagrees():
    """A planted disagreement: lr 0.1 is best on validation, lr 0.01 on test."""
    rows = [row(0.01, 0.40, test_acc=0.90), row(0.1, 0.55, test_acc=0.20)]
    assert tune.select(rows) == {CELL: {"lr": 0.1}}


def test_ties_go_to_the_smaller_value_and_diverged_points_never_win():
    rows = [
        row(0.3, 0.5),
        row(0.1, 0.5),
        row(1.0, None, diverged=True),
        row(10.0, 0.9, diverged=True),
    ]
    assert tune.select(rows) == {CELL: {"lr": 0.1}}
    assert tune.select([row(1.0, None, diverged=True)]) == {CELL: None}


def test_ties_on_two_keys_prefer_the_smaller_lr_first():
    a = dict(row(0.1, 0.5), values={"lr": 0.1, "momentum": 0.9})
    b = dict(row(0.01, 0.5), values={"lr": 0.01, "momentum": 0.99})
    assert tune.select([a, b]) == {CELL: {"lr": 0.01, "momentum": 0.99}}


@pytest.fixture
def params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_prepared(tmp_path)
    return load_params(PARAMS, ["preset=ci", f"data.root={tmp_path}"])


def test_tuning_runs_hold_out_validation_scale_the_schedule_and_skip_test(tmp_path):
    p = load_params(
        PARAMS,
        [
            "preset=ci",
            f"data.root={tmp_path}",
            "tune.budget=0.5",
            "protocol.cifar100.schedule={iterations: 10, step_size: 4, gamma: 0.5}",
            "datasets=[cifar100]",
            "archs=[vgg]",
        ],
    )
    specs = grid.tuning_specs(p)
    assert [(s["optimizer"]["name"], s["optimizer"]["lr"]) for s in specs] == [
        ("sgd", 0.05),
        ("sgd", 0.1),
        ("vsgd", 0.05),
        ("vsgd", 0.1),
    ]
    for s in specs:
        assert s["schedule"] == {"iterations": 5, "step_size": 2, "gamma": 0.5}
        assert s["training"]["validation_size"] == 32 and s["training"]["eval_test"] is False
        assert s["seed"] == 0 and s["name"].startswith("tune-cifar100-vgg16-")


def test_final_runs_train_the_selection_and_need_one(params):
    with pytest.raises(ConfigError, match="run the tune stage first"):
        grid.expand(params, {})
    selection = {cell: {"lr": 0.05} for cell in tuned_cells(params)}
    selection[("cifar100", "vgg", "vsgd")] = None  # every point diverged: no final runs
    specs = grid.expand(params, selection)
    assert len(specs) == 23
    lrs = {
        (s["dataset"], s["arch_key"], s["optimizer"]["name"]): s["optimizer"]["lr"] for s in specs
    }
    assert lrs[("cifar100", "vgg", "sgd")] == 0.05
    assert lrs[("cifar100", "vgg", "adam")] == params["optimizer"]["adam"]["lr"]  # pinned
    assert ("cifar100", "vgg", "vsgd") not in lrs
    assert all(s["training"]["validation_size"] == 0 for s in specs)  # the full train split


def test_tuning_off_pins_every_optimizer(tmp_path):
    p = load_params(PARAMS, ["preset=ci", f"data.root={tmp_path}", "tune.enabled=false"])
    assert grid.tuning_specs(p) == [] and tuned_cells(p) == []
    assert len(grid.expand(p, {})) == 24


def chosen(params, path, tree):
    """selected.yaml with `tree`, and beside it tuning.csv listing the tuning runs that
    `params` give, as the tune stage writes them after training those runs."""
    path.write_text(yaml.safe_dump(tree))
    lines = ["dataset,arch,optimizer,lr,val_acc,diverged,chosen,iterations,run,run_hash"]
    lines += [
        f"{s['dataset']},{s['arch_key']},{s['optimizer']['name']},"
        f"{s['optimizer']['lr']},0.5,False,False,3,{s['name']},{s['run_hash']}"
        for s in grid.tuning_specs(params)
    ]
    path.with_name("tuning.csv").write_text("\n".join(lines) + "\n")


def test_a_selection_is_read_back_only_for_the_grid_it_was_made_on(params, tmp_path):
    path = tmp_path / "selected.yaml"
    chosen(params, path, {"cifar100": {"vgg": {"sgd": {"lr": 0.1}, "vsgd": None}}})
    assert plan.load_selection(params, path) == {
        ("cifar100", "vgg", "sgd"): {"lr": 0.1},
        ("cifar100", "vgg", "vsgd"): None,
    }
    regridded = load_params(
        PARAMS,
        ["preset=ci", f"data.root={params['data']['root']}", "optimizer.sgd.grid={lr: [0.2, 0.3]}"],
    )
    assert ("cifar100", "vgg", "sgd") not in plan.load_selection(regridded, path)


@pytest.mark.parametrize(
    "override,problem",
    [
        ("optimizer.sgd.grid={lr: [0.1, -1]}", "optimizer.sgd.grid.lr[1]: -1 is outside (0, inf)"),
        (
            "optimizer.vsgd.grid={tau1: [0.9, 2.0]}",
            "optimizer.vsgd.grid.tau1[1]: 2.0 is outside (0.5, 1]",
        ),
        (
            "optimizer.adam.grid={betas: [[0.9, 0.999], [0.9, 1.5]]}",
            "optimizer.adam.grid.betas[1][1]: 1.5 is outside [0, 1)",
        ),
        (
            "optimizer.sgd.grid={momentun: [0.9]}",
            "optimizer.sgd.grid.momentun: unknown key (did you mean 'momentum'?)",
        ),
        ("optimizer.sgd.grid={lr: [1, 1.0]}", "optimizer.sgd.grid.lr: values must be unique"),
        ("tune.budget=0", "tune.budget: 0 is outside (0, 1]"),
        ("tune.validation_size=300", "tune.validation_size: 300 leaves no training images"),
    ],
)
def test_bad_grids_and_tune_settings_are_reported_with_their_key_path(override, problem):
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, ["preset=ci", override])
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_a_grid_over_any_hyperparameter_is_tuned(tmp_path):
    p = load_params(
        PARAMS,
        [
            "preset=ci",
            f"data.root={tmp_path}",
            "datasets=[cifar100]",
            "archs=[vgg]",
            "optimizers=[vsgd]",
            "optimizer.vsgd.grid={ghattg: [10.0, 30.0], tau1: [0.81, 0.9]}",
        ],
    )
    points = [(s["optimizer"]["ghattg"], s["optimizer"]["tau1"]) for s in grid.tuning_specs(p)]
    assert points == [(10.0, 0.81), (10.0, 0.9), (30.0, 0.81), (30.0, 0.9)]


@pytest.mark.parametrize(
    "change",
    [
        # The chosen lr 0.1 is still in the new grid: the choice looks valid, but it was made
        # among other points.
        "optimizer.sgd.grid={lr: [0.1, 0.2]}",
        "tune.budget=0.5",  # the same grid, tuned at another budget
        "tune.validation_size=100",  # or on another held-out split
        "tune.seed=7",
    ],
)
def test_a_choice_made_on_an_earlier_grid_or_tuning_settings_is_not_used(params, tmp_path, change):
    path = tmp_path / "selected.yaml"
    chosen(params, path, {"cifar100": {"vgg": {"sgd": {"lr": 0.1}}}})
    assert ("cifar100", "vgg", "sgd") in plan.load_selection(params, path)
    changed = load_params(PARAMS, ["preset=ci", f"data.root={params['data']['root']}", change])
    assert ("cifar100", "vgg", "sgd") not in plan.load_selection(changed, path)
    with pytest.raises(ConfigError, match="run the tune stage"):
        grid.expand(changed, plan.load_selection(changed, path))


def test_a_selection_without_its_tuning_runs_recorded_is_not_used(params, tmp_path):
    """selected.yaml from before tuning.csv recorded run hashes (or with tuning.csv lost)
    is not trusted: the stage cannot tell which points it was chosen among."""
    path = tmp_path / "selected.yaml"
    chosen(params, path, {"cifar100": {"vgg": {"sgd": {"lr": 0.1}}}})
    csv_path = path.with_name("tuning.csv")
    csv_path.write_text(
        "\n".join(",".join(line.split(",")[:-1]) for line in csv_path.read_text().splitlines())
        + "\n"
    )
    assert plan.load_selection(params, path) == {}
    csv_path.unlink()
    assert plan.load_selection(params, path) == {}


def stage_outputs(params, monkeypatch, tmp_path):
    """What the tune stage writes after training the tuning runs of `params`: every point at
    validation accuracy 0.5 but SGD's at lr 0.1 (0.6), which it chooses."""
    monkeypatch.chdir(tmp_path)
    rows = [
        {
            "cell": (s["dataset"], s["arch_key"], s["optimizer"]["name"]),
            "values": {"lr": s["optimizer"]["lr"]},
            "val_acc": 0.6
            if (s["optimizer"]["name"], s["optimizer"]["lr"]) == ("sgd", 0.1)
            else 0.5,
            "diverged": False,
            "iterations": s["schedule"]["iterations"],
            "run": s["name"],
            "run_hash": s["run_hash"],
        }
        for s in grid.tuning_specs(params)
    ]
    tune.write_outputs(params, rows, tune.select(rows))
    return plan.SELECTED


@pytest.mark.parametrize(
    "edit",
    [
        lambda sel, pts: sel.write_text(sel.read_text().replace("lr: 0.1", "lr: 0.01", 1)),
        lambda sel, pts: pts.write_text(pts.read_text().replace(",0.6,", ",0.4,")),
    ],
    ids=["a choice edited", "a point edited"],
)
def test_a_choice_edited_or_damaged_since_the_tune_stage_is_refused(
    params, monkeypatch, tmp_path, edit
):
    selected = stage_outputs(params, monkeypatch, tmp_path)
    assert plan.load_selection(params)[("cifar100", "vgg", "sgd")] == {"lr": 0.1}
    edit(selected, selected.with_name("tuning.csv"))
    with pytest.raises(ConfigError) as info:
        plan.load_selection(params)
    assert info.value.problems == [
        f"{selected}: edited or damaged: its choices and tuning.csv beside it are not what "
        "the tune stage wrote (their sha256 differs)",
        "run the tune stage again (`dvc repro tune` or `python -m pipeline tune`)",
    ]


def test_the_train_stage_refuses_a_stale_choice_with_78(tmp_path):
    """`python -m pipeline train` on its own after a grid change: no training with the
    choice made on the old grid; exit 78, run the tune stage."""
    fake_prepared(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    common = [
        "preset=ci",
        f"data.root={tmp_path / 'data'}",
        "datasets=[cifar100]",
        "archs=[vgg]",
        "optimizers=[sgd]",
    ]
    (tmp_path / "results" / "tuning").mkdir(parents=True)
    chosen(
        load_params(tmp_path / "params.yaml", common),
        tmp_path / "results" / "tuning" / "selected.yaml",
        {"cifar100": {"vgg": {"sgd": {"lr": 0.1}}}},
    )
    sets = [
        arg for item in common + ["optimizer.sgd.grid={lr: [0.1, 0.2]}"] for arg in ("--set", item)
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", *sets],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 78, proc.stderr
    assert "run the tune stage" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results" / "store").exists()  # nothing trained
