"""A stored result is trusted only when whole: a damaged one is never counted, reused or
printed; it is set aside (never deleted), said, and its run trained again; the stage's
counts always add up to the grid."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fake_prepared, write_result

from pipeline import execute, grid, results
from pipeline.config import load_params
from pipeline.executors import Executor
from pipeline.executors.base import RunOutcome

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project directory with ci-preset params and fake prepared datasets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_prepared(tmp_path / "data")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return tmp_path


OVERRIDES = [
    "preset=ci",
    "data.root=data",
    "datasets=[cifar100]",
    "archs=[vgg]",
    "tune.enabled=false",
]


def grid_specs(*extra):
    params = load_params("params.yaml", OVERRIDES + list(extra))
    return params, grid.expand(params)


def edit_json(path: Path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def other_run(spec):
    return dict(spec, seed=spec["seed"] + 1)


def change_first_curve_accuracy(path: Path):
    """The first evaluation's test accuracy a point higher: still a well-formed curve that
    agrees with the metrics (which hold the last one)."""
    header, first, *rest = path.read_text().splitlines()
    fields = first.split(",")
    fields[1] = repr(float(fields[1]) + 0.01)
    path.write_text("\n".join([header, ",".join(fields), *rest]) + "\n")


# kind -> (what it does to a whole result, a phrase of the problem reported)
DAMAGE = {
    "accuracy out of range": (
        lambda d: edit_json(d / "metrics.json", lambda m: dict(m, test_acc=7.5)),
        "test_acc 7.5 is not null or a number in [0, 1]",
    ),
    "loss not a number": (
        lambda d: edit_json(d / "metrics.json", lambda m: dict(m, test_loss="banana")),
        "test_loss 'banana' is not null or a finite number >= 0",
    ),
    "curve deleted": (lambda d: (d / "curve.csv").unlink(), "curve.csv: missing"),
    "metrics a JSON list": (
        lambda d: (d / "metrics.json").write_text("[1, 2]"),
        "metrics.json: expected a JSON object, got list",
    ),
    "metrics truncated": (
        lambda d: (d / "metrics.json").write_text('{"name": "cifar'),
        "metrics.json: not readable JSON",
    ),
    "spec edited": (
        lambda d: edit_json(
            d / "config.json", lambda s: dict(s, optimizer=dict(s["optimizer"], lr=0.5))
        ),
        "config.json: its settings hash to",
    ),
    "another run's result": (
        lambda d: edit_json(d / "metrics.json", lambda m: dict(m, run_hash="0000000000000000")),
        "is not this run's",
    ),
    "metrics disagree with the curve": (
        lambda d: edit_json(d / "metrics.json", lambda m: dict(m, test_acc=0.99)),
        "is not the curve's final",
    ),
    "VSGD result without beta1.csv": (lambda d: (d / "beta1.csv").unlink(), "beta1.csv: missing"),
    # Well-formed and consistent, only not what was written: the digests tell.
    "a curve value changed": (
        lambda d: change_first_curve_accuracy(d / "curve.csv"),
        "curve.csv: its bytes are not those written",
    ),
    "metrics changed within range": (
        lambda d: edit_json(d / "metrics.json", lambda m: dict(m, seconds_per_iter=0.3)),
        "metrics.json: its content is not what was written",
    ),
    "digests garbled": (
        lambda d: edit_json(d / "metrics.json", lambda m: dict(m, sha256="none")),
        "metrics.json: sha256 is not an object of file names and sha256s",
    ),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_result_is_set_aside_and_its_run_trained_again(workdir, kind):
    damage, phrase = DAMAGE[kind]
    _, specs = grid_specs("optimizers=[vsgd]")
    [spec] = specs
    out = Path(spec["output_dir"])
    write_result(out, spec)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    damage(out)
    assert not results.is_done(spec)
    found = results.survey(specs, view=True)
    assert found.state == {spec["name"]: "pending"}
    [(what, aside, wrong)] = found.damaged
    assert any(phrase in p for p in wrong), wrong
    # Kept, not deleted: every file that was there, beside a note of what was wrong.
    assert not out.exists() and aside.parent.resolve() == workdir / "results" / "damaged"
    kept = {p.name for p in aside.iterdir()}
    assert kept == (
        set(before)
        - {"curve.csv" if kind == "curve deleted" else "", "beta1.csv" if "beta1" in kind else ""}
    ) | {"DAMAGED.txt"}
    assert phrase in (aside / "DAMAGED.txt").read_text()


def test_a_damaged_view_entry_is_neither_counted_nor_shown(workdir):
    _, specs = grid_specs()
    for spec in specs:
        write_result(spec["output_dir"], spec)
    results.show(specs)
    shown = workdir / "results" / "runs" / specs[0]["name"]
    edit_json(shown / "metrics.json", lambda m: dict(m, test_acc=7.5))
    assert not results.is_shown(specs[0])
    found = results.survey(specs, view=True)
    # The store's whole copy stands; the view's damaged one is set aside and shown again.
    assert found.state[specs[0]["name"]] == "reused" and len(found.damaged) == 1
    results.show(specs)
    assert json.loads((shown / "metrics.json").read_text())["test_acc"] == 0.5


@pytest.mark.parametrize(
    "case", ["view only", "store damaged, view whole", "both damaged", "store only"]
)
def test_the_stage_counts_add_up_to_the_grid(workdir, capsys, case):
    """Once `-1 reused`: a run shown in the view but not whole in the store was counted both
    as done and as to run."""
    params, specs = grid_specs()
    for spec in specs:
        write_result(spec["output_dir"], spec)
    results.show(specs)
    target = specs[0]
    store, view = Path(target["output_dir"]), workdir / "results" / "runs" / target["name"]
    if case == "view only":
        import shutil

        shutil.rmtree(store)
    if case in ("store damaged, view whole", "both damaged"):
        edit_json(store / "metrics.json", lambda m: dict(m, test_acc=7.5))
    if case == "both damaged":
        edit_json(view / "metrics.json", lambda m: dict(m, test_acc=7.5))
    if case == "store only":
        import shutil

        shutil.rmtree(view)

    class Nothing(Executor):  # the stage's executor: records what it was asked to run
        ran = []

        def run(self, pending):
            self.ran.extend(s["name"] for s in pending)
            for s in pending:
                write_result(s["output_dir"], s)
            return []

    # Put back afterwards (the stage's own executor factory): later tests patch it too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(execute, "get_executor", lambda params: Nothing())
        execute.run_stage(params, specs, "train", view=True)
    line = next(
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("train: 4 runs in the grid")
    )
    done, reused, to_run = (int(line.split(", ")[i].split()[0]) for i in (1, 2, 3))
    assert done + reused + to_run == 4 and min(done, reused, to_run) >= 0, line
    expected = {
        "view only": (4, 0, 0),
        "store damaged, view whole": (4, 0, 0),
        "both damaged": (3, 0, 1),
        "store only": (3, 1, 0),
    }[case]
    assert (done, reused, to_run) == expected, line
    assert Nothing.ran == ([target["name"]] if case == "both damaged" else [])
    assert all(results.is_done(s) and results.is_shown(s) for s in specs)


def test_a_run_reported_finished_without_a_whole_result_fails_the_stage(workdir, capsys):
    """An executor's word is not a result: a run it reports as finished whose result in the
    store is damaged (or missing) fails, naming what is wrong, and is never shown."""
    params, specs = grid_specs()
    damaged, missing, whole = specs[:3]

    class Reports(Executor):  # says every run finished; writes what the case needs
        def run(self, pending):
            for s in pending:
                if s is not missing:
                    write_result(s["output_dir"], s)
            edit_json(Path(damaged["output_dir"]) / "metrics.json", lambda m: dict(m, test_acc=7.5))
            return [RunOutcome(s["name"], s["run_hash"], ok=True) for s in pending]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(execute, "get_executor", lambda params: Reports())
        report = execute.run_stage(params, specs, "train", view=True)
    assert sorted(report.failed) == sorted([damaged["name"], missing["name"]])
    err = capsys.readouterr().err
    assert f"FAILED {damaged['name']}: ended as finished, but" in err
    assert "test_acc 7.5 is not null or a number in [0, 1]" in err
    assert f"FAILED {missing['name']}" in err and "metrics.json: missing" in err
    assert results.is_shown(whole) and not results.is_shown(damaged)


def test_aggregate_refuses_a_damaged_result_rather_than_printing_it(workdir):
    """A result claiming test_acc 7.5 with its curve.csv gone was once printed as the best of
    its row in Table 1."""
    _, specs = grid_specs()
    for spec in specs:
        write_result(spec["output_dir"], spec)
    results.show(specs)
    bad = workdir / "results" / "runs" / specs[0]["name"]
    edit_json(bad / "metrics.json", lambda m: dict(m, test_acc=7.5, test_loss="banana"))
    (bad / "curve.csv").unlink()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "aggregate",
            "--no-mlflow",
            *[a for o in OVERRIDES for a in ("--set", o)],
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 78, proc.stderr
    assert f"results/runs/{specs[0]['name']}: damaged result" in proc.stderr
    assert "test_acc 7.5" in proc.stderr and "curve.csv: missing" in proc.stderr
    assert "run the train stage" in proc.stderr and "Traceback" not in proc.stderr
    assert not (workdir / "results" / "tables" / "table1.md").exists()


@pytest.mark.extended  # the set-aside and retrain paths are covered in process above
def test_a_train_stage_retrains_a_damaged_result_and_says_so(tmp_path, place_prepared):
    """End to end: a finished run's metrics.json edited after the fact; the next train stage
    names it, sets it aside, trains the run again, and the tables see the new result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    sets = [
        a
        for o in OVERRIDES + ["data.root=data", "optimizers=[sgd]", "tracking.uri=null"]
        for a in ("--set", o)
    ]

    def stage(*cmd):
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *cmd, *sets],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    place_prepared(tmp_path / "data", "cifar100")  # what `prepare cifar100` makes here
    assert stage("train").returncode == 0
    # Both copies: the store's, and the view's (a whole view copy would be taken back).
    [metrics] = (tmp_path / "results" / "store").glob("*/metrics.json")
    [shown] = (tmp_path / "results" / "runs").glob("*/metrics.json")
    for path in (metrics, shown):
        edit_json(path, lambda m: dict(m, test_acc=7.5))
    proc = stage("train")
    assert proc.returncode == 0, proc.stderr
    assert "damaged result" in proc.stderr and "test_acc 7.5" in proc.stderr
    assert (
        "1 runs in the grid, 0 done, 0 reused, 1 to run (2 damaged results set aside)"
        in proc.stdout
    )
    assert json.loads(metrics.read_text())["test_acc"] <= 1.0
    assert json.loads(shown.read_text())["test_acc"] <= 1.0
    aside = list((tmp_path / "results" / "damaged").iterdir())
    assert len(aside) == 2 and all(
        json.loads((a / "metrics.json").read_text())["test_acc"] == 7.5 for a in aside
    )
