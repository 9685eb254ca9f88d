"""The demo preset: one cell of the grid for a first look on a CPU (its budget and accuracies
are measured in docs/pipeline.md, not here), and the prepare stage of the dataset it leaves
out, which DVC still runs."""

import argparse

from conftest import ROOT

from pipeline import prepare
from pipeline.config import load_params
from pipeline.grid import tuning_specs
from pipeline.plan import PINNED, plan

PARAMS = ROOT / "params.yaml"


def test_the_demo_is_one_cell_four_optimizers_two_seeds_with_tuning():
    p = load_params(PARAMS, ["preset=demo"])
    assert p["datasets"] == ["cifar100"] and p["archs"] == ["convmixer"]
    assert p["protocol"]["cifar100"]["models"]["convmixer"] == "convmixer_256_8"
    assert p["optimizers"] == ["sgd", "adam", "adamw", "vsgd"]
    assert len(p["seeds"]) >= 2  # the differences table needs two seeds for an interval
    assert p["data"]["source"] == "synthetic"
    assert p["executor"]["max_parallel"] == 2  # one run per core of a 2-core machine
    tuned = {spec["optimizer"]["name"] for spec in tuning_specs(p)}
    assert tuned and tuned < set(p["optimizers"])  # a small grid, for some optimizers
    # No optimizer is left at the authors' lr 0.1 where it does not learn: Adam(W).
    for name in ("adam", "adamw"):
        grid = p["optimizer"][name]["grid"] or {}
        assert max(grid.get("lr", [p["optimizer"][name]["lr"]])) < 0.1


def test_the_demo_plans_its_runs(tmp_path):
    p = load_params(PARAMS, ["preset=demo", f"data.root={tmp_path}"])
    planned = plan(p, PINNED, tmp_path / "selected.yaml")
    assert len(planned.final) == 4 * len(p["seeds"]) and planned.tuning


def test_prepare_of_a_dataset_the_preset_leaves_out_only_makes_the_stage_output(tmp_path, capsys):
    args = argparse.Namespace(
        dataset="tinyimagenet", params=str(PARAMS), set=["preset=demo", f"data.root={tmp_path}"]
    )
    assert prepare.run(args) == 0
    out = tmp_path / "prepared" / "tinyimagenet"
    assert out.is_dir() and not any(out.iterdir())
    assert "tinyimagenet: not in this grid's datasets (cifar100)" in capsys.readouterr().out
