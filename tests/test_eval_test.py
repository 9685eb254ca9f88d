"""`training.eval_test: false` (tuning runs): the test set is never evaluated, the run reports
its validation accuracy, and the spec is refused without a validation split."""

import csv
import json
from pathlib import Path

from conftest import run_spec

from vsgd import engine, trainer
from vsgd.spec import BOOKKEEPING, TRAINING, check_spec, run_hash
from vsgd.trainer import train


def test_a_run_without_the_test_set_never_evaluates_it(data_root, tmp_path, monkeypatch):
    evaluate, sizes = engine.evaluate, []

    def recording_evaluate(model, x, *args, **kwargs):
        sizes.append(len(x))
        return evaluate(model, x, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", recording_evaluate)
    spec = run_spec(
        data_root,
        tmp_path,
        iterations=4,
        eval_every=2,
        eval_test=False,
        validation_size=24,
        test_limit=16,
    )
    run, _ = trainer.setup(spec)
    assert run.test_x is None and run.test_y is None  # not even on the device
    seen = []
    metrics = train(spec, progress=lambda s, t, info: seen.append(info))
    assert sizes == [24, 24]  # the validation split at steps 2 and 4, never the test set
    assert metrics["test_acc"] is None and metrics["test_loss"] is None
    assert 0 <= metrics["val_acc"] <= 1
    out = Path(spec["output_dir"])
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with open(out / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"]
    assert all(r["test_acc"] == "" and r["test_loss"] == "" and r["val_acc"] for r in rows)
    assert not any("test_acc" in info for info in seen)
    assert any("val_acc" in info for info in seen)


def test_a_run_with_the_test_set_still_evaluates_it(data_root, tmp_path):
    metrics = train(run_spec(data_root, tmp_path, iterations=2, validation_size=24))
    assert metrics["test_acc"] is not None and metrics["val_acc"] is not None


def test_eval_test_needs_a_validation_split_and_is_part_of_the_identity(data_root, tmp_path):
    assert TRAINING["eval_test"] == (True, (True, False)) and "eval_test" not in BOOKKEEPING
    spec = run_spec(data_root, tmp_path, eval_test=False)  # validation_size 0
    problems = check_spec(spec)
    assert len(problems) == 1 and problems[0].startswith(
        "training.eval_test: false needs training.validation_size > 0"
    )
    spec["training"]["validation_size"] = 16
    assert check_spec(spec) == []
    spec["training"]["eval_test"] = "no"
    assert check_spec(spec) == ["training.eval_test: no is not allowed; allowed: true, false"]
    with_test = run_spec(data_root, tmp_path, validation_size=16)
    without = run_spec(data_root, tmp_path, validation_size=16, eval_test=False)
    assert run_hash(with_test) != run_hash(without)
    explicit = run_spec(data_root, tmp_path, validation_size=16, eval_test=True)
    assert run_hash(explicit) == run_hash(with_test)  # true is the default
