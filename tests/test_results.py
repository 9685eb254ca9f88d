"""Finished results are kept by run hash, the view shows exactly the grid, and only `gc`
removes results, saying what it removes."""

import json
from pathlib import Path

import pytest
from conftest import write_result

from pipeline import grid, results
from pipeline.__main__ import main
from pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project directory with ci-preset params and fake prepared datasets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for ds in ("cifar100", "tinyimagenet"):
        d = tmp_path / "data" / "prepared" / ds
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"checksum": f"sum-{ds}"}))
    (tmp_path / "params.yaml").write_text(PARAMS.read_text().replace("preset: null", "preset: ci"))
    return tmp_path


def specs_for(*overrides):
    return grid.expand(
        load_params(
            "params.yaml", ["datasets=[cifar100]", "archs=[vgg]", "tune.enabled=false", *overrides]
        )
    )


def finish(spec, test_acc=0.5):
    """What the trainer leaves in the store for a finished run."""
    write_result(spec["output_dir"], spec, test_acc=test_acc)


def view():
    return sorted(p.name for p in Path(grid.RESULTS_DIR).iterdir())


def test_the_view_shows_exactly_the_grid_and_the_store_keeps_every_result(workdir):
    first = specs_for()
    for spec in first:
        finish(spec)
    assert results.show(first).runs == 4 and view() == sorted(s["name"] for s in first)
    changed = specs_for("optimizer.sgd.lr=0.2")
    shown = results.show(changed)
    assert shown.runs == 3 and len(shown.hidden) == 1 and "-sgd-" in shown.hidden[0]
    assert view() == sorted(s["name"] for s in changed if results.is_done(s))
    # The result that left the grid is still stored, and comes back with the grid.
    assert all(results.is_done(s) for s in first)
    assert results.show(first).runs == 4 and view() == sorted(s["name"] for s in first)


def test_a_view_entry_not_in_the_store_is_moved_there_not_deleted(workdir):
    """A results/runs/ written by an earlier version held the only copy of its result."""
    [spec] = specs_for("optimizers=[vsgd]")
    legacy = Path(grid.RESULTS_DIR) / "cifar100-vgg16-vsgd-s0-oldhash0"
    old_hash = write_result(legacy, name=legacy.name, optimizer="vsgd", test_acc=0.7)["run_hash"]
    results.show([spec])
    assert not legacy.exists()
    kept = Path(grid.STORE_DIR) / old_hash / "metrics.json"
    assert json.loads(kept.read_text())["test_acc"] == 0.7


def test_gc_removes_only_what_no_run_of_the_grid_uses_and_says_so(workdir, capsys):
    old = specs_for("optimizer.sgd.lr=0.2")
    for spec in old:
        finish(spec)
        ckpt = Path(spec["checkpoint"])
        ckpt.mkdir(parents=True)
        (ckpt / "checkpoint.pt").write_bytes(b"x")
    [stale] = [s for s in old if s["optimizer"]["name"] == "sgd"]
    keep = [s for s in old if s is not stale]

    args = [
        "gc",
        "--set",
        "datasets=[cifar100]",
        "--set",
        "archs=[vgg]",
        "--set",
        "tune.enabled=false",
    ]
    assert main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        f"would remove result results/store/{stale['run_hash']} ({stale['name']}, "
        "test_acc 0.5000)" in out
    )
    assert f"would remove checkpoint checkpoints/{stale['run_hash']}" in out
    assert results.is_done(stale)  # a dry run removes nothing

    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("gc: removed ") == 2
    assert not Path(stale["output_dir"]).exists() and not Path(stale["checkpoint"]).exists()
    assert all(results.is_done(s) and Path(s["checkpoint"]).exists() for s in keep)


def test_gc_refuses_without_prepared_data(workdir, capsys):
    for spec in specs_for():
        finish(spec)
    (workdir / "data" / "prepared" / "cifar100" / "manifest.json").unlink()
    assert (
        main(
            [
                "gc",
                "--set",
                "datasets=[cifar100]",
                "--set",
                "archs=[vgg]",
                "--set",
                "tune.enabled=false",
            ]
        )
        == 78
    )
    err = capsys.readouterr().err
    assert "no prepared data for cifar100" in err and "Traceback" not in err
    assert len(list(Path(grid.STORE_DIR).iterdir())) == 4
