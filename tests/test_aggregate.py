"""Aggregate on fabricated run results: tables, lr selection, figure, summary, MLflow CSV."""

import argparse
import csv
import json
from pathlib import Path

import pytest

from pipeline import aggregate
from pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def fake_run(runs_dir, dataset, arch_key, arch, opt, seed, test_acc, lr=0.1, val_acc=None,
             iterations=30000):
    name = f"{dataset}-{arch}-{opt}-lr{lr}-s{seed}"
    d = runs_dir / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "name": name, "run_hash": "h" + name, "dataset": dataset, "arch": arch,
        "arch_key": arch_key, "optimizer": opt, "lr": lr, "seed": seed,
        "iterations": iterations, "test_acc": test_acc, "test_loss": 1.0, "train_loss": 0.5,
        "train_acc": 0.9, "val_acc": val_acc, "seconds_per_iter": 0.25,
        "images_per_sec": 1024.0, "device": "cpu", "device_name": "Test CPU",
        "mlflow_run_id": None}))
    with (d / "curve.csv").open("w") as f:
        f.write("step,test_acc,test_loss,val_acc,train_loss,train_acc,lr\n")
        for step in (0, iterations // 2, iterations):
            f.write(f"{step},{test_acc * step / iterations},1.0,,0.5,0.9,{lr}\n")


@pytest.fixture
def results(tmp_path):
    """CIFAR-100 x 3 archs x 4 optimizers with 2 seeds, one empty cell, and one lr grid."""
    runs = tmp_path / "results" / "runs"
    models = {"vgg": "vgg16", "convmixer": "convmixer_256_8", "resnext": "resnext18"}
    base = {"sgd": 0.68, "adam": 0.64, "adamw": 0.66, "vsgd": 0.70}
    for arch_key, arch in models.items():
        for opt, acc in base.items():
            if (arch_key, opt) == ("resnext", "adam"):
                continue  # a cell without finished runs -> dash
            if (arch_key, opt) == ("convmixer", "vsgd"):
                # lr grid: 0.1 has the best test accuracy but the worse validation accuracy.
                for seed in (0, 1):
                    fake_run(runs, "cifar100", arch_key, arch, opt, seed, 0.75, lr=0.1,
                             val_acc=0.60)
                    fake_run(runs, "cifar100", arch_key, arch, opt, seed, 0.69 + seed / 100,
                             lr=0.01, val_acc=0.65)
                continue
            for seed in (0, 1):
                fake_run(runs, "cifar100", arch_key, arch, opt, seed, acc + seed / 100)
    return tmp_path / "results"


def run_aggregate(results, extra=()):
    args = argparse.Namespace(params=str(PARAMS), set=["datasets=[cifar100]", *extra],
                              results=str(results), no_mlflow=True)
    assert aggregate.run(args) == 0


def test_table1_every_cell_best_bold_paper_delta_and_claim(results):
    run_aggregate(results)
    md = (results / "tables" / "table1.md").read_text()
    assert "| CIFAR-100 | VGG16-bn | 0.685 ± 0.007 (n=2) | 0.645 ± 0.007 (n=2) | " \
           "0.665 ± 0.007 (n=2) | **0.705 ± 0.007** (n=2) |" in md
    assert "| CIFAR-100 | ResNeXt-18 | 0.685 ± 0.007 (n=2) | – |" in md
    # lr chosen on validation (0.01), not on test (0.1 would show 0.750)
    assert "| CIFAR-100 | ConvMixer-256/8 | 0.685 ± 0.007 (n=2) | 0.645 ± 0.007 (n=2) | " \
           "0.665 ± 0.007 (n=2) | **0.695 ± 0.007** (n=2) |" in md
    assert "| CIFAR-100 | VGG16-bn | VSGD | 0.705 | 0.701 ± 0.003 | +0.004 |" in md
    assert "| CIFAR-100 | VGG16-bn | Adam | 0.645 | – | – |" in md
    assert "| CIFAR-100 | ResNeXt-18 | SGD | 0.685 | 0.685 ± 0.003 | +0.000 |" in md
    assert "| CIFAR-100 | VGG16-bn | holds | holds |" in md
    assert "| CIFAR-100 | ResNeXt-18 | – | holds |" in md  # Adam missing: cannot tell
    tex = (results / "tables" / "table1.tex").read_text()
    assert r"\textbf{0.705 $\pm$ 0.007} (2)" in tex and r"\toprule" in tex
    rows = list(csv.DictReader((results / "tables" / "table1.csv").open()))
    assert len(rows) == 12
    vgg_vsgd = next(r for r in rows if r["arch"] == "vgg" and r["optimizer"] == "vsgd")
    assert vgg_vsgd["best_in_row"] == "True" and vgg_vsgd["paper"] == "0.701"
    assert float(vgg_vsgd["delta"]) == pytest.approx(0.004)


def test_lr_selection_table_and_summary(results):
    run_aggregate(results)
    sel = list(csv.DictReader((results / "tables" / "lr_selection.csv").open()))
    assert [(r["lr"], r["chosen"]) for r in sel] == [("0.01", "True"), ("0.1", "False")]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["test_acc"]["cifar100"]["vgg"]["vsgd"] == {
        "test_acc": 0.705, "n": 2, "delta_to_paper": 0.004}
    assert summary["test_acc"]["cifar100"]["resnext"]["adam"] == {"test_acc": None, "n": 0}
    assert summary["claim"] == {"holds": 2, "rows": 2}


def test_table2_figure_and_curves(results):
    run_aggregate(results)
    md = (results / "tables" / "table2.md").read_text()
    assert "| CIFAR-100 | VGG16-bn | 256 | 0.2500 (1024) | 0.2500 (1024) | 0.2500 (1024) | " \
           "0.2500 (1024) | Test CPU |" in md
    assert "RTX 2080 Ti" in md
    for ext in ("png", "svg"):
        assert (results / "figures" / f"test_acc.{ext}").stat().st_size > 10_000
    curves = sorted(p.name for p in (results / "curves").glob("*.csv"))
    assert len(curves) == 11 and "cifar100_vgg_vsgd.csv" in curves
    rows = list(csv.DictReader((results / "curves" / "cifar100_vgg_vsgd.csv").open()))
    assert [float(r["step"]) for r in rows] == [0, 15000, 30000]
    assert float(rows[-1]["test_acc"]) == pytest.approx(0.705)


def test_mlflow_export(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("vsgd-repro")
    for i in range(3):
        run = client.create_run(exp, run_name=f"run{i}", tags={"optimizer": "vsgd"})
        client.log_param(run.info.run_id, "lr", 0.1)
        client.log_metric(run.info.run_id, "test_acc", 0.5 + i / 10, step=10)
        client.set_terminated(run.info.run_id)
    params = load_params(PARAMS, [f"tracking.uri={uri}"])
    assert aggregate.export_mlflow(params, tmp_path / "runs.csv") == 3
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert {r["run_name"] for r in rows} == {"run0", "run1", "run2"}
    assert {r["metrics.test_acc"] for r in rows} == {"0.5", "0.6", "0.7"}
    assert rows[0]["params.lr"] == "0.1" and rows[0]["tags.optimizer"] == "vsgd"


# ---------------------------------------------------------------------------------------------
# the MLflow export: never costs the tables, says when it is incomplete, leaks no credential


def aggregate_cli(results, tmp_path, uri, **env):
    """`python -m pipeline aggregate` in a subprocess with MLFLOW_TRACKING_URI=`uri`.

    MLflow's own HTTP limits are removed from the environment (unless given in `env`): the
    stage must bound its requests itself. The subprocess timeout (well above the few seconds
    the stage takes, well below MLflow's default ~4 minutes of retries) ends a hang."""
    import os
    import subprocess
    import sys
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    child_env.update(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "aggregate", "--params", str(PARAMS),
         "--set", "datasets=[cifar100]", "--results", str(results)],
        cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=60)


def assert_tables_and_figure(results):
    for name in ("table1.md", "table1.tex", "table1.csv", "table2.md", "table2.csv",
                 "lr_selection.csv"):
        assert (results / "tables" / name).is_file(), name
    for ext in ("png", "svg"):
        assert (results / "figures" / f"test_acc.{ext}").stat().st_size > 10_000
    assert (results / "curves" / "cifar100_vgg_vsgd.csv").is_file()


@pytest.mark.timeout(90)
def test_aggregate_writes_tables_when_mlflow_is_unreachable(results, tmp_path):
    from pipeline.services import free_port
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = aggregate_cli(results, tmp_path, uri)
    assert out.returncode == 0, out.stderr
    assert_tables_and_figure(results)
    assert "Traceback" not in out.stderr
    warnings = [line for line in out.stderr.splitlines() if "incomplete" in line]
    assert len(warnings) == 1, out.stderr
    assert uri in warnings[0] and "warning" in warnings[0]
    assert "python -m pipeline aggregate" in warnings[0] and "dvc repro" in warnings[0]
    assert "Connection refused" in warnings[0]  # the cause, in one line
    assert [line for line in out.stderr.splitlines() if line.strip()] == warnings
    summary = json.loads((results / "summary.json").read_text())
    export = summary["mlflow_export"]
    assert export["complete"] is False and export["uri"] == uri and export["runs"] == 0
    assert "Connection refused" in export["cause"]
    assert summary["claim"] == {"holds": 2, "rows": 2}  # the rest of the summary is there
    # Written with what was fetched: here nothing, so the header only.
    assert (results / "mlflow_runs.csv").read_text().splitlines() == [
        "run_id,run_name,status,start_time,end_time"]


@pytest.mark.timeout(90)
def test_credential_in_tracking_uri_is_not_shown(results, tmp_path):
    from pipeline.services import free_port
    port = free_port()
    # One attempt only, whatever the code bounds: this test is about what is printed.
    out = aggregate_cli(results, tmp_path, f"http://user:secret@127.0.0.1:{port}",
                        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    summary_text = (results / "summary.json").read_text()
    for text in (out.stdout, out.stderr, summary_text):
        assert "secret" not in text
    assert out.returncode == 0, out.stderr
    assert f"http://***@127.0.0.1:{port}" in out.stderr
    assert json.loads(summary_text)["mlflow_export"]["uri"] == f"http://***@127.0.0.1:{port}"


def test_summary_marks_mlflow_export_complete_with_run_count(results, tmp_path, monkeypatch,
                                                             capsys):
    import os

    from mlflow.tracking import MlflowClient

    from pipeline.__main__ import main
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("vsgd-repro")
    for i in range(2):
        run = client.create_run(exp, run_name=f"run{i}")
        client.set_terminated(run.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key in [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST_")]:
        monkeypatch.delenv(key)
    assert main(["aggregate", "--params", str(PARAMS), "--set", "datasets=[cifar100]",
                 "--results", str(results)]) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["mlflow_export"] == {"complete": True, "runs": 2}
    assert len(list(csv.DictReader((results / "mlflow_runs.csv").open()))) == 2
    assert "2 MLflow runs exported" in capsys.readouterr().out
    # The HTTP limits were set for the export only.
    assert not any(key.startswith("MLFLOW_HTTP_REQUEST_") for key in os.environ)


def test_no_mlflow_records_the_export_as_skipped(results):
    run_aggregate(results)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["mlflow_export"]["complete"] is False
    assert summary["mlflow_export"]["skipped"] is True
    assert not (results / "mlflow_runs.csv").exists()


def test_every_aggregate_argument_has_help():
    parser = argparse.ArgumentParser()
    aggregate.add_arguments(parser)
    options = {a.option_strings[0]: a.help for a in parser._actions
               if a.option_strings and a.dest != "help"}
    assert set(options) == {"--params", "--set", "--results", "--no-mlflow"}
    assert all(options.values()), options
