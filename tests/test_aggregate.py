"""Aggregate on fabricated run results: tables, sensitivity and other figures, summary,
MLflow CSV."""

import argparse
import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import reseal, write_result

from pipeline import aggregate
from pipeline.config import ConfigError, load_params
from pipeline.report import mlflow_export, stats
from pipeline.report.cells import label
from pipeline.report.figures import STYLES, style
from pipeline.report.runs import comparable_references, load_references

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def fake_run(
    runs_dir,
    dataset,
    arch_key,
    arch,
    opt,
    seed,
    test_acc,
    lr=0.1,
    val_acc=None,
    iterations=30000,
    diverged=None,
):
    name = f"{dataset}-{arch}-{opt}-lr{lr}-s{seed}"
    write_result(
        runs_dir / name,
        name=name,
        dataset=dataset,
        arch=arch,
        arch_key=arch_key,
        optimizer=opt,
        lr=lr,
        seed=seed,
        iterations=iterations,
        test_acc=test_acc,
        val_acc=val_acc,
        diverged=diverged,
        curve_steps=None if diverged else (0, iterations // 2, iterations),
    )


@pytest.fixture
def results(tmp_path):
    """CIFAR-100 x 3 archs x 4 optimizers with 2 seeds, one empty cell, and a cell with a
    diverged third seed."""
    runs = tmp_path / "results" / "runs"
    models = {"vgg": "vgg16", "convmixer": "convmixer_256_8", "resnext": "resnext18"}
    base = {"sgd": 0.68, "adam": 0.64, "adamw": 0.66, "vsgd": 0.70}
    for arch_key, arch in models.items():
        for opt, acc in base.items():
            if (arch_key, opt) == ("resnext", "adam"):
                continue  # a cell without finished runs -> dash
            if (arch_key, opt) == ("convmixer", "vsgd"):
                # A third seed diverged: counted, marked, not averaged (its last finite
                # accuracy would otherwise pull the mean down).
                fake_run(
                    runs,
                    "cifar100",
                    arch_key,
                    arch,
                    opt,
                    2,
                    0.01,
                    diverged={"step": 1234, "stopped_at": 1250},
                )
                for seed in (0, 1):
                    fake_run(runs, "cifar100", arch_key, arch, opt, seed, 0.69 + seed / 100)
                continue
            for seed in (0, 1):
                fake_run(runs, "cifar100", arch_key, arch, opt, seed, acc + seed / 100)
    return tmp_path / "results"


def run_aggregate(results, extra=()):
    args = argparse.Namespace(
        params=str(PARAMS),
        set=["datasets=[cifar100]", *extra],
        results=str(results),
        no_mlflow=True,
    )
    assert aggregate.run(args) == 0


def test_table1_every_cell_best_bold_paper_delta_and_claim(results):
    run_aggregate(results)
    md = (results / "tables" / "table1.md").read_text()
    assert (
        "| CIFAR-100 | VGG16-bn | 0.685 ± 0.007 (n=2) | 0.645 ± 0.007 (n=2) | "
        "0.665 ± 0.007 (n=2) | **0.705 ± 0.007** (n=2) |" in md
    )
    assert "| CIFAR-100 | ResNeXt-18 | 0.685 ± 0.007 (n=2) | – |" in md
    assert (
        "| CIFAR-100 | ConvMixer-256/8 | 0.685 ± 0.007 (n=2) | 0.645 ± 0.007 (n=2) | "
        "0.665 ± 0.007 (n=2) | **0.695 ± 0.007** (n=2, 1 diverged) |" in md
    )
    assert "| CIFAR-100 | VGG16-bn | VSGD | 0.705 | 0.701 ± 0.003 | +0.004 |" in md
    assert "| CIFAR-100 | VGG16-bn | Adam | 0.645 | – | – |" in md
    assert "| CIFAR-100 | ResNeXt-18 | SGD | 0.685 | 0.685 ± 0.003 | +0.000 |" in md
    # VGG16: VSGD 0.705 vs SGD 0.685, stds 0.007: beyond one std. Every optimizer has a grid
    # by default, so the caption says they were tuned, and the precision.
    assert "| CIFAR-100 | VGG16-bn | holds beyond 1 std | holds |" in md
    assert "Hyperparameters of Adam, AdamW, SGD, VSGD tuned on validation accuracy" in md
    assert "Precision: fp32." in md
    assert "| CIFAR-100 | ResNeXt-18 | – | holds |" in md  # Adam missing: cannot tell
    tex = (results / "tables" / "table1.tex").read_text()
    assert r"\textbf{0.705 $\pm$ 0.007} (2)" in tex and r"\toprule" in tex
    rows = list(csv.DictReader((results / "tables" / "table1.csv").open()))
    assert len(rows) == 12
    vgg_vsgd = next(r for r in rows if r["arch"] == "vgg" and r["optimizer"] == "vsgd")
    assert vgg_vsgd["best_in_row"] == "True" and vgg_vsgd["paper"] == "0.701"
    assert float(vgg_vsgd["delta"]) == pytest.approx(0.004)


def test_claim_within_one_std_and_pinned_caption(results):
    # VGG16 with SGD at 0.695/0.705 (mean 0.700) against VSGD's 0.705, stds 0.007: VSGD is
    # above, but within one std.
    for seed in (0, 1):
        shutil.rmtree(results / "runs" / f"cifar100-vgg16-sgd-lr0.1-s{seed}")
        fake_run(results / "runs", "cifar100", "vgg", "vgg16", "sgd", seed, 0.695 + seed / 100)
    run_aggregate(results, ["tune.enabled=false"])
    md = (results / "tables" / "table1.md").read_text()
    assert "| CIFAR-100 | VGG16-bn | holds within 1 std | holds |" in md
    assert "Adam, AdamW, SGD, VSGD: values pinned in params.yaml, not tuned." in md


def test_sensitivity_figure_from_the_tuning_table(results):
    tuning = results / "tuning"
    tuning.mkdir()
    rows = ["dataset,arch,optimizer,lr,val_acc,diverged,chosen,iterations,run"]
    for opt, accs in (("sgd", (0.3, 0.5, 0.4)), ("vsgd", (0.35, 0.55, None))):
        for lr, acc in zip((0.01, 0.1, 1.0), accs):
            rows.append(
                f"cifar100,vgg,{opt},{lr},{'' if acc is None else acc},"
                f"{acc is None},{acc == 0.55 or (opt == 'sgd' and acc == 0.5)},6000,r"
            )
    (tuning / "tuning.csv").write_text("\n".join(rows) + "\n")
    run_aggregate(results)
    figures = sorted((results / "figures").iterdir())
    first = {f.name: f.read_bytes() for f in figures}
    run_aggregate(results)  # the same results give the same bytes, SVG and PNG
    assert {f.name: f.read_bytes() for f in figures} == first
    assert {"sensitivity.svg", "sensitivity.png", "test_acc.svg"} <= set(first)
    from PIL import Image

    for ext in ("png", "svg"):
        assert (results / "figures" / f"sensitivity.{ext}").stat().st_size > 10_000
    image = Image.open(results / "figures" / "sensitivity.png").convert("RGB")
    colors = image.getcolors(1 << 20)
    # Both cells' lines are drawn (SGD green, VSGD blue in the project's styles).
    assert any(c[1] == (44, 160, 44) for c in colors) and any(
        c[1] == (31, 119, 180) for c in colors
    )


def svg_text_x(svg: str, text: str) -> list[float]:
    """Where each drawing of `text` starts in a matplotlib SVG, in points from the left."""
    pattern = r"<!-- " + re.escape(text) + r' -->\s*<g [^>]*transform="translate\(([-\d.e]+) '
    return [float(x) for x in re.findall(pattern, svg)]


def test_one_panel_figures_keep_every_legend_entry_on_the_figure(results):
    """A one-cell grid (the demo preset's) draws one panel: its legends wrap onto more rows
    instead of running off both sides, and the chance level is named on the axes."""
    tuning = results / "tuning"
    tuning.mkdir()
    (tuning / "tuning.csv").write_text(
        "dataset,arch,optimizer,lr,val_acc,diverged,chosen,iterations,run\n"
        "cifar100,convmixer,vsgd,0.03,0.45,False,True,75,r\n"
        "cifar100,convmixer,vsgd,0.1,0.3,False,False,75,r\n"
    )
    run_aggregate(results, ["archs=[convmixer]"])
    figures = results / "figures"
    for name, entries in (
        ("test_acc", [f"{label(o)} (n=2)" for o in ("sgd", "adam", "adamw")] + ["chance"]),
        ("beta1", ["VSGD median", "Adam β1 = 0.9 (fixed)"]),
    ):
        svg = (figures / f"{name}.svg").read_text()
        width = float(re.search(r'<svg [^>]*width="([\d.]+)pt"', svg).group(1))
        for entry in entries:
            [x] = svg_text_x(svg, entry)
            assert 0 <= x < width, (name, entry, x, width)
    assert len(svg_text_x((figures / "test_acc.svg").read_text(), "chance (1/100)")) == 1
    sensitivity = (figures / "sensitivity.svg").read_text()
    assert svg_text_x(sensitivity, "chance (1/100)") and svg_text_x(sensitivity, "chosen")
    # the cell named as the other figures name it, not by its grid keys
    assert svg_text_x(sensitivity, "CIFAR-100 ConvMixer-256/8 VSGD")
    # lr 0.03 and 0.1: a log axis ticked at the values tried, not a linear one (0.03, 0.04, ...)
    assert svg_text_x(sensitivity, "0.03") and svg_text_x(sensitivity, "0.1")
    assert not svg_text_x(sensitivity, "0.04")


def test_summary_counts_the_claim(results):
    run_aggregate(results)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["test_acc"]["cifar100"]["vgg"]["vsgd"] == {
        "test_acc": 0.705,
        "n": 2,
        "delta_to_paper": 0.004,
    }
    assert summary["test_acc"]["cifar100"]["resnext"]["adam"] == {"test_acc": None, "n": 0}
    assert summary["claim"] == {"holds": 2, "rows": 2}


def test_table2_figure_and_curves(results):
    run_aggregate(results)
    md = (results / "tables" / "table2.md").read_text()
    assert (
        "| CIFAR-100 | VGG16-bn | 256 | 0.2500 (1024) | 0.2500 (1024) | 0.2500 (1024) | "
        "0.2500 (1024) | Test CPU |" in md
    )
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
        run = client.create_run(
            exp,
            run_name=f"run{i}",
            tags={"optimizer": "vsgd", "mlflow.source.git.commit": "abc123", "mlflow.user": "me"},
        )
        client.log_param(run.info.run_id, "lr", 0.1)
        client.log_metric(run.info.run_id, "test_acc", 0.5 + i / 10, step=10)
        client.set_terminated(run.info.run_id)
    params = load_params(PARAMS, [f"tracking.uri={uri}"])
    assert mlflow_export.export_mlflow(params, tmp_path / "runs.csv") == 3
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert {r["run_name"] for r in rows} == {"run0", "run1", "run2"}
    assert {r["metrics.test_acc"] for r in rows} == {"0.5", "0.6", "0.7"}
    assert rows[0]["params.lr"] == "0.1" and rows[0]["tags.optimizer"] == "vsgd"
    # The commit the run's code came from stays; MLflow's other bookkeeping does not.
    assert rows[0]["tags.mlflow.source.git.commit"] == "abc123"
    assert "tags.mlflow.user" not in rows[0]


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

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    child_env.update(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "aggregate",
            "--params",
            str(PARAMS),
            "--set",
            "datasets=[cifar100]",
            "--results",
            str(results),
        ],
        cwd=tmp_path,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_tables_and_figure(results):
    for name in ("table1.md", "table1.tex", "table1.csv", "table2.md", "table2.csv"):
        assert (results / "tables" / name).is_file(), name
    for ext in ("png", "svg"):
        for figure in ("test_acc", "beta1", "sensitivity"):
            assert (results / "figures" / f"{figure}.{ext}").stat().st_size > 10_000
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
        "run_id,run_name,status,start_time,end_time"
    ]


@pytest.mark.timeout(90)
def test_credential_in_tracking_uri_is_not_shown(results, tmp_path):
    from pipeline.services import free_port

    port = free_port()
    # One attempt only, whatever the code bounds: this test is about what is printed.
    out = aggregate_cli(
        results,
        tmp_path,
        f"http://user:secret@127.0.0.1:{port}",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )
    summary_text = (results / "summary.json").read_text()
    for text in (out.stdout, out.stderr, summary_text):
        assert "secret" not in text
    assert out.returncode == 0, out.stderr
    assert f"http://***@127.0.0.1:{port}" in out.stderr
    assert json.loads(summary_text)["mlflow_export"]["uri"] == f"http://***@127.0.0.1:{port}"


def test_summary_marks_mlflow_export_complete_with_run_count(
    results, tmp_path, monkeypatch, capsys
):
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
    assert (
        main(
            [
                "aggregate",
                "--params",
                str(PARAMS),
                "--set",
                "datasets=[cifar100]",
                "--results",
                str(results),
            ]
        )
        == 0
    )
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
    options = {
        a.option_strings[0]: a.help
        for a in parser._actions
        if a.option_strings and a.dest != "help"
    }
    assert set(options) == {"--params", "--set", "--results", "--no-mlflow"}
    assert all(options.values()), options


# ---------------------------------------------------------------------------------------------
# Table 2 from the timing stage, and VSGD's adaptive-momentum figure

TIMED = {"sgd": 1.0, "adam": 1.1, "adamw": 1.12, "vsgd": 1.25}  # seconds per step / SGD's


def plant_timing(results, skip=()):
    """What the timing stage writes, for CIFAR-100's three architectures: SGD's step takes
    0.1 s (VGG16), 0.2 s (ConvMixer), 0.4 s (ResNeXt-18) on one GPU."""
    from pipeline import timing_results

    sgd = {"vgg": 0.1, "convmixer": 0.2, "resnext": 0.4}
    models = {"vgg": "vgg16", "convmixer": "convmixer_256_8", "resnext": "resnext18"}
    batch = {"vgg": 256, "convmixer": 256, "resnext": 128}
    rows = [
        {
            "dataset": "cifar100",
            "arch": arch,
            "model": models[arch],
            "optimizer": opt,
            "batch_size": batch[arch],
            "seconds_per_step": sgd[arch] * ratio,
            "images_per_sec": batch[arch] / (sgd[arch] * ratio),
            "ratio_to_sgd": ratio,
            "rounds": 3,
            "steps": 50,
            "warmup": 10,
            "device": "cuda:0",
            "device_name": "Timing GPU",
            "precision": "fp32",
            "torch_version": "9.9",
            "round_seconds": [sgd[arch] * ratio] * 3,
        }
        for arch in sgd
        for opt, ratio in TIMED.items()
        if (arch, opt) not in skip
    ]
    timing_results.write(
        {
            "device": "cuda:0",
            "device_name": "Timing GPU",
            "precision": "fp32",
            "torch_version": "9.9",
            "steps": 50,
            "warmup": 10,
            "rounds": 3,
            "rows": rows,
        },
        results / "timing",
    )


def test_table2_shows_timing_ratios_first_then_seconds_then_the_runs(results):
    plant_timing(results, skip={("resnext", "adam")})
    run_aggregate(results)
    md = (results / "tables" / "table2.md").read_text()
    a, b, c = (
        md.index(h)
        for h in (
            "## (a) Relative to SGD",
            "## (b) Seconds per step",
            "## (c) Seconds per iteration of the grid's runs",
        )
    )
    assert a < b < c
    assert "| CIFAR-100 | VGG16-bn | 256 | 1.00 | 1.10 | 1.12 | 1.25 |" in md[a:b]
    assert "| CIFAR-100 | ResNeXt-18 | 128 | 1.00 | – | 1.12 | 1.25 |" in md[a:b]
    assert (
        "| CIFAR-100 | VGG16-bn | 256 | 0.1000 (2560) | 0.1100 (2327) | 0.1120 (2286) | "
        "0.1250 (2048) | Timing GPU |" in md[b:c]
    )
    assert (
        "| CIFAR-100 | VGG16-bn | 256 | 0.2500 (1024) | 0.2500 (1024) | 0.2500 (1024) | "
        "0.2500 (1024) | Test CPU |" in md[c:]
    )
    caption = md[:a]
    assert "RTX 2080 Ti" in caption and "precision fp32" in caption
    assert (
        "on Timing GPU (cuda:0)" in md[a:b]
        and "3 round(s) of 50 timed steps after 10 warm-up steps" in md[a:b]
    )
    tex = (results / "tables" / "table2.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 3 and "RTX 2080 Ti" in tex
    assert tex.index("% (a) relative to SGD") < tex.index("% (b)") < tex.index("% (c)")
    assert r"CIFAR-100 & VGG16-bn & 256 & 1.00 & 1.10 & 1.12 & 1.25 \\" in tex
    # The timing device, in LaTeX too: (a)'s comment, (b)'s device column.
    assert "% (a) relative to SGD, timing stage on Timing GPU (cuda:0)" in tex
    assert r"0.1250 (2048) & Timing GPU \\" in tex
    rows = {
        (r["arch"], r["optimizer"]): r
        for r in csv.DictReader((results / "tables" / "table2.csv").open())
    }
    assert len(rows) == 12
    vsgd = rows[("vgg", "vsgd")]
    assert float(vsgd["ratio_to_sgd"]) == 1.25 and float(vsgd["seconds_per_iter"]) == 0.25
    assert float(vsgd["timing_seconds_per_step"]) == pytest.approx(0.125)
    assert vsgd["timing_device"] == "Timing GPU (cuda:0)" and vsgd["device"] == "Test CPU"
    assert vsgd["precision"] == "fp32"
    assert rows[("resnext", "adam")]["ratio_to_sgd"] == ""


def test_table2_without_a_timing_measurement_says_so(results):
    run_aggregate(results)
    md = (results / "tables" / "table2.md").read_text()
    assert "No timing measurement: `results/timing/timing.json` was not found" in md
    assert "## (b)" not in md
    assert md.count("| CIFAR-100 | VGG16-bn |") == 1  # the runs' own table only
    assert "no timing measurement" in (results / "tables" / "table2.tex").read_text()
    assert all(
        r["ratio_to_sgd"] == "" for r in csv.DictReader((results / "tables" / "table2.csv").open())
    )


def edit_timing(results, change):
    path = results / "timing" / "timing.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (  # a number changed: still well-formed, only not what the stage wrote
            lambda t: {**t, "rows": [{**t["rows"][0], "seconds_per_step": 0.05}, *t["rows"][1:]]},
            "its content is not what was written",
        ),
        (lambda t: {**t, "rows": "none", "sha256": None}, "rows is not a list of objects"),
        (
            lambda t: {**t, "rows": [{**t["rows"][0], "ratio_to_sgd": -1}], "sha256": None},
            "rows[0].ratio_to_sgd -1 is not null or a finite number > 0",
        ),
        (lambda t: [t], "expected a JSON object, got list"),
    ],
)
def test_table2_refuses_a_damaged_timing_result_rather_than_printing_it(results, damage, problem):
    plant_timing(results)
    edit_timing(results, damage)
    with pytest.raises(ConfigError) as err:
        run_aggregate(results)
    said, again = err.value.problems
    assert said.startswith(f"{results / 'timing' / 'timing.json'}: damaged: {problem}"), said
    assert again == "run the timing stage again (`dvc repro timing` or `python -m pipeline timing`)"
    assert not (results / "tables" / "table2.md").exists()


def test_a_timing_result_from_before_its_digest_is_still_read(results):
    plant_timing(results)
    edit_timing(results, lambda t: {k: v for k, v in t.items() if k != "sha256"})
    run_aggregate(results)
    assert "Measured by the timing stage" in (results / "tables" / "table2.md").read_text()


def plant_beta1(results, pattern, median):
    """beta1.csv in the runs matching `pattern`: `median(seed)` at every 3000th step, the
    quantiles spread around it."""
    for d in sorted((results / "runs").glob(pattern)):
        seed = int(d.name.rsplit("-s", 1)[1])
        lines = ["step,mean,q10,q25,median,q75,q90"]
        for step in range(0, 30001, 3000):
            m = median(seed, step)
            lines.append(f"{step},{m},{m - 0.3},{m - 0.1},{m},{m + 0.1},{m + 0.2}")
        (d / "beta1.csv").write_text("\n".join(lines) + "\n")
        reseal(d)


def blue_pixels(png):
    """Pixels of VSGD's colour (tab:blue, (31, 119, 180)) in the figure: its median line
    and its 25-75% band (the lighter 10-90% band is too pale to count)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    blue = rgb[..., 2] - rgb[..., 0]  # blue well above red: the line and its bands
    return int(((blue > 40) & (rgb[..., 2] > 150)).sum()), rgb.shape


def test_beta1_figure_and_curves_from_the_runs_beta1_csv(results):
    # No beta1 values anywhere yet: the figure exists, with notes. (A whole VSGD result has
    # beta1 rows unless it diverged before its first: such runs stand in meanwhile.)
    waiting = results.parent / "vsgd-runs"
    waiting.mkdir()
    for run in (results / "runs").glob("*-vsgd-*"):
        m = json.loads((run / "metrics.json").read_text())
        run.rename(waiting / run.name)
        write_result(
            run,
            name=run.name,
            arch=m["arch"],
            arch_key=m["arch_key"],
            optimizer="vsgd",
            lr=m["lr"],
            seed=m["seed"],
            beta1=[],
            diverged={"step": 1, "stopped_at": 50},
        )
    run_aggregate(results)
    figure = results / "figures" / "beta1.png"
    assert figure.stat().st_size > 10_000 and (results / "figures" / "beta1.svg").is_file()
    empty, _ = blue_pixels(figure)
    assert list((results / "beta1").glob("*.csv")) == []
    assert "no finished VSGD run" in (results / "figures" / "beta1.svg").read_text()

    for run in waiting.iterdir():
        shutil.rmtree(results / "runs" / run.name)
        run.rename(results / "runs" / run.name)
    plant_beta1(
        results, "cifar100-vgg16-vsgd-*", lambda seed, step: 0.4 + 0.1 * seed + 0.3 * step / 30000
    )
    run_aggregate(results)
    rows = list(csv.DictReader((results / "beta1" / "cifar100_vgg.csv").open()))
    assert list(rows[0]) == ["step", "mean", "q10", "q25", "median", "q75", "q90", "n"]
    assert [int(float(r["step"])) for r in rows] == list(range(0, 30001, 3000))
    # The mean over the two seeds (0.4 and 0.5 at step 0), the band around it.
    assert float(rows[0]["median"]) == pytest.approx(0.45)
    assert float(rows[-1]["median"]) == pytest.approx(0.75)
    assert float(rows[-1]["q10"]) == pytest.approx(0.45)
    assert float(rows[-1]["q90"]) == pytest.approx(0.95)
    assert {r["n"] for r in rows} == {"2"}
    # One per cell with VSGD runs (the other cells' runs carry the fixture's single row).
    assert sorted(p.name for p in (results / "beta1").glob("*.csv")) == [
        "cifar100_convmixer.csv",
        "cifar100_resnext.csv",
        "cifar100_vgg.csv",
    ]
    drawn, shape = blue_pixels(figure)
    assert shape[0] > 400 and shape[1] > 1200
    # The median line and both quantile bands of one panel: thousands of VSGD-blue pixels.
    assert drawn > empty + 5000, (drawn, empty)


def test_the_view_carries_beta1_csv_into_the_figure(results, tmp_path):
    """pipeline.results copies a run's beta1.csv into results/runs/<name>/ with the other
    files, so the aggregate finds it."""
    from pipeline import results as view

    assert view.FILES[-1] == "metrics.json" and "beta1.csv" in view.FILES
    run = next((results / "runs").glob("cifar100-resnext18-vsgd-*"))
    stored = tmp_path / "store" / "h"
    stored.mkdir(parents=True)
    for name in ("config.json", "curve.csv", "metrics.json"):
        if (run / name).exists():
            (stored / name).write_bytes((run / name).read_bytes())
    # At a step of its own: the cell's other seed has its row at 30000 only.
    (stored / "beta1.csv").write_text(
        "step,mean,q10,q25,median,q75,q90\n15000,0.6,0.3,0.5,0.6,0.7,0.8\n"
    )
    reseal(stored)
    view._publish_copy(stored, run)
    run_aggregate(results)
    rows = list(csv.DictReader((results / "beta1" / "cifar100_resnext.csv").open()))
    assert [(r["step"], r["median"], r["n"]) for r in rows][0] == ("15000", "0.6", "1")


# ---------------------------------------------------------------------------------------------
# differences beyond seed noise, the standing, and optimizers beyond the four built-ins

MODELS = {"vgg": "vgg16", "convmixer": "convmixer_256_8", "resnext": "resnext18"}


def plant_cells(runs, accs):
    """One CIFAR-100 run per value of `accs`: (arch_key, optimizer) -> accuracy per seed."""
    for (arch_key, opt), values in accs.items():
        for seed, acc in enumerate(values):
            fake_run(runs, "cifar100", arch_key, MODELS[arch_key], opt, seed, acc)


# VGG16: VSGD 10 points above SGD with a spread of 1 point; ConvMixer: VSGD 1 point above
# SGD with a spread of 2 points (a tie within noise). Adam and AdamW far below in both.
THREE_SEEDS = {
    ("vgg", "vsgd"): [0.70, 0.71, 0.72],
    ("vgg", "sgd"): [0.60, 0.61, 0.62],
    ("vgg", "adam"): [0.50, 0.51, 0.52],
    ("vgg", "adamw"): [0.55, 0.56, 0.57],
    ("convmixer", "vsgd"): [0.70, 0.72, 0.74],
    ("convmixer", "sgd"): [0.69, 0.71, 0.73],
    ("convmixer", "adam"): [0.50, 0.51, 0.52],
    ("convmixer", "adamw"): [0.55, 0.56, 0.57],
}


def test_differences_name_a_winner_only_beyond_seed_noise(tmp_path):
    results = tmp_path / "results"
    plant_cells(results / "runs", THREE_SEEDS)
    run_aggregate(results, ["archs=[vgg,convmixer]"])
    md = (results / "tables" / "differences.md").read_text()
    # VGG16: +10 points, se = sqrt(2 * 1e-4 / 3) = 0.8165 points, df = 4, t = 2.77645:
    # +-2.26696. ConvMixer: +1 point, se = 1.6330, df = 4: +-4.5339, containing zero.
    assert (
        "| CIFAR-100 | VGG16-bn | VSGD − SGD | +10.00 | [+7.73, +12.27] | 3, 3 | "
        "yes: VSGD above |" in md
    )
    assert (
        "| CIFAR-100 | ConvMixer-256/8 | VSGD − SGD | +1.00 | [-3.53, +5.53] | 3, 3 | "
        "no: within noise |" in md
    )
    assert (
        "| CIFAR-100 | VGG16-bn | Adam − AdamW | -5.00 | [-7.27, -2.73] | 3, 3 | "
        "yes: AdamW above |" in md
    )
    assert md.count("| CIFAR-100 | VGG16-bn |") == 6  # every pair of 4 optimizers once
    assert "Welch's t" in md and "95%" in md and "two-sided" in md and "Excludes zero" in md
    tex = (results / "tables" / "differences.tex").read_text()
    assert (
        r"CIFAR-100 & VGG16-bn & VSGD $-$ SGD & +10.00 & [+7.73, +12.27] & 3, 3 & "
        r"yes: VSGD above \\" in tex
    )
    rows = list(csv.DictReader((results / "tables" / "differences.csv").open()))
    vgg = next(
        r for r in rows if (r["arch"], r["optimizer_a"], r["optimizer_b"]) == ("vgg", "vsgd", "sgd")
    )
    assert float(vgg["difference_pp"]) == pytest.approx(10)
    assert float(vgg["low_pp"]) == pytest.approx(10 - 2.26696, abs=1e-4)
    assert float(vgg["df"]) == pytest.approx(4) and vgg["excludes_zero"] == "True"
    assert (vgg["n_a"], vgg["n_b"], vgg["level"]) == ("3", "3", "0.95")

    # The standing adds it up: VSGD best on VGG16, tied with SGD on ConvMixer.
    standing = (results / "tables" / "standing.md").read_text()
    assert "| optimizer | best | tied within noise | worse | not enough seeds |" in standing
    assert "| VSGD | 1 | 1 | 0 | 0 |" in standing and "| SGD | 0 | 1 | 1 | 0 |" in standing
    assert "| Adam | 0 | 0 | 2 | 0 |" in standing
    assert (
        "| CIFAR-100 | ConvMixer-256/8 | tied within noise | worse | worse | "
        "tied within noise |" in standing
    )
    assert all(meaning in standing for meaning in stats.STANDING.values())
    counts = {
        r["optimizer"]: r for r in csv.DictReader((results / "tables" / "standing.csv").open())
    }
    assert counts["vsgd"] == {
        "optimizer": "vsgd",
        "best": "1",
        "tied_within_noise": "1",
        "worse": "0",
        "not_enough_seeds": "0",
        "cells": "2",
    }
    assert r"VSGD & 1 & 1 & 0 & 0 \\" in (results / "tables" / "standing.tex").read_text()
    summary = json.loads((results / "summary.json").read_text())
    assert summary["standing"]["sgd"] == {
        "best": 0,
        "tied_within_noise": 1,
        "worse": 1,
        "not_enough_seeds": 0,
    }
    # Table 1's claim is its own, told against one std, and unchanged by all this.
    table1 = (results / "tables" / "table1.md").read_text()
    assert "| CIFAR-100 | VGG16-bn | holds beyond 1 std | holds |" in table1
    assert "| CIFAR-100 | ConvMixer-256/8 | holds within 1 std | holds |" in table1


def test_one_seed_grid_claims_no_winner(tmp_path):
    results = tmp_path / "results"
    plant_cells(
        results / "runs",
        {
            (arch, opt): [0.5 + 0.05 * i]
            for arch in MODELS
            for i, opt in enumerate(("sgd", "adam", "adamw", "vsgd"))
        },
    )
    run_aggregate(results, ["seeds=[0]"])
    md = (results / "tables" / "differences.md").read_text()
    assert (
        "| CIFAR-100 | VGG16-bn | VSGD − SGD | +15.00 | – | 1, 1 | "
        "1 seed: no interval, no winner |" in md
    )
    assert md.count("1 seed: no interval, no winner |") == 18  # 6 pairs x 3 cells
    assert "yes:" not in md
    standing = (results / "tables" / "standing.md").read_text()
    assert "| VSGD | 0 | 0 | 0 | 3 |" in standing
    assert "| CIFAR-100 | VGG16-bn | not enough seeds (n=1) |" in standing
    summary = json.loads((results / "summary.json").read_text())
    assert all(c["not_enough_seeds"] == 3 for c in summary["standing"].values())


def test_claim_is_not_tested_without_vsgd_or_a_rival_instead_of_failing(results):
    run_aggregate(results, ["optimizers=[sgd,adam,vsgd]"])
    md = (results / "tables" / "table1.md").read_text()
    assert "| CIFAR-100 | VGG16-bn | not tested: AdamW not in the grid | holds |" in md
    assert json.loads((results / "summary.json").read_text())["claim"] == {"holds": 0, "rows": 0}
    assert "AdamW" not in (results / "tables" / "differences.md").read_text()
    run_aggregate(results, ["optimizers=[sgd,adam,adamw]"])
    md = (results / "tables" / "table1.md").read_text()
    assert "| CIFAR-100 | VGG16-bn | not tested: VSGD not in the grid | holds |" in md
    assert "| SGD | 0 | 2 | 0 | 1 |" in (results / "tables" / "standing.md").read_text()


def test_unknown_optimizer_keys_get_distinct_stable_styles_and_their_key_as_label():
    grid = ["sgd", "radam", "adam", "my_opt", "vsgd"]
    assert style("sgd", grid) == STYLES["sgd"]
    assert style("my_opt", grid) == ("tab:red", "-", "v")  # sorted first
    assert style("radam", grid) == ("tab:brown", "-", "P")
    # The grid's order and the built-ins around them change nothing.
    assert style("radam", ["my_opt", "radam"]) == style("radam", grid)
    many = [f"opt{i:02d}" for i in range(12)]
    looks = {style(o, many) for o in many}
    assert len(looks) == 12  # past the colours, the line style tells them apart
    builtin_colors = {c for c, _, _ in STYLES.values()}
    assert not builtin_colors & {c for c, _, _ in looks}
    assert label("radam") == "radam" and label("vsgd") == "VSGD"


def colour_pixels(png, rgb):
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) <= 6).sum())


def test_extra_optimizers_appear_in_every_table_and_figure_and_leave_the_claim(
    results, monkeypatch
):
    """Two optimizers beyond the four built-ins, under keys the aggregate has never seen:
    `radam` above every other optimizer, `my_opt` (an underscore, for LaTeX) below, both named
    by import path as params.yaml does (README, "Compare your optimizer")."""
    params = load_params(
        PARAMS,
        [
            "datasets=[cifar100]",
            "optimizers=[sgd, adam, adamw, vsgd, radam, my_opt]",
            "optimizer.radam={class: 'torch.optim:RAdam', lr: 0.001, betas: [0.9, 0.999], "
            "eps: 1.0e-8, weight_decay: 0.0, grid: {lr: [0.001, 0.01]}}",
            "optimizer.my_opt={class: 'torch.optim:SGD', lr: 0.05, grid: {}}",
        ],
    )
    monkeypatch.setattr(aggregate, "load_params", lambda path, overrides=(), **kw: params)
    for arch_key, arch in MODELS.items():
        for seed in (0, 1):
            fake_run(results / "runs", "cifar100", arch_key, arch, "radam", seed, 0.75 + seed / 100)
            fake_run(
                results / "runs",
                "cifar100",
                arch_key,
                arch,
                "my_opt",
                seed,
                0.40 + seed / 100,
                lr=0.05,
            )
    tuning = results / "tuning"
    tuning.mkdir()
    (tuning / "tuning.csv").write_text(
        "dataset,arch,optimizer,lr,val_acc,diverged,chosen,iterations,run\n"
        "cifar100,vgg,radam,0.001,0.5,False,False,6000,r\n"
        "cifar100,vgg,radam,0.01,0.6,False,True,6000,r\n"
    )
    run_aggregate(results)
    tables = results / "tables"

    table1 = (tables / "table1.md").read_text()
    assert "| dataset | architecture | SGD | Adam | AdamW | VSGD | radam | my_opt |" in table1
    assert "| 0.705 ± 0.007 (n=2) | **0.755 ± 0.007** (n=2) | 0.405 ± 0.007 (n=2) |" in table1
    assert "| CIFAR-100 | VGG16-bn | radam | 0.755 | – | – |" in table1
    # Named in the caption, tuned or pinned: which one is pipeline.config's `tuned_cells`
    # (today it knows only the built-ins' grids and calls the others pinned).
    caption = table1.split("\n\n")[1]
    assert "radam" in caption and "my_opt" in caption
    # The claim is about VSGD against SGD, Adam and AdamW only: radam above VSGD leaves it.
    assert "| CIFAR-100 | VGG16-bn | holds beyond 1 std | holds |" in table1
    assert "| CIFAR-100 | ResNeXt-18 | – | holds |" in table1
    assert json.loads((results / "summary.json").read_text())["claim"] == {"holds": 2, "rows": 2}
    assert r"my\_opt" in (tables / "table1.tex").read_text()
    assert {r["optimizer"] for r in csv.DictReader((tables / "table1.csv").open())} >= {
        "radam",
        "my_opt",
    }

    table2 = (tables / "table2.md").read_text()
    assert "| batch | SGD | Adam | AdamW | VSGD | radam | my_opt | device |" in table2
    assert r"my\_opt" in (tables / "table2.tex").read_text()
    assert len(list(csv.DictReader((tables / "table2.csv").open()))) == 18

    differences = (tables / "differences.md").read_text()
    # radam: 5 points above VSGD, spread 0.71 points a side, df 2: +-4.30265 * 0.7071.
    assert (
        "| CIFAR-100 | VGG16-bn | VSGD − radam | -5.00 | [-8.04, -1.96] | 2, 2 | "
        "yes: radam above |" in differences
    )
    assert "| CIFAR-100 | VGG16-bn | radam − my_opt | +35.00 |" in differences
    assert differences.count("| CIFAR-100 | VGG16-bn |") == 15  # 6 optimizers: 15 pairs
    assert r"radam $-$ my\_opt" in (tables / "differences.tex").read_text()
    standing = (tables / "standing.md").read_text()
    assert "| radam | 2 | 0 | 0 | 1 |" in standing  # ResNeXt-18: Adam has no runs
    assert "| my_opt | 0 | 0 | 2 | 1 |" in standing
    assert "| VSGD | 0 | 0 | 2 | 1 |" in standing
    summary = json.loads((results / "summary.json").read_text())
    assert summary["test_acc"]["cifar100"]["vgg"]["radam"] == {"test_acc": 0.755, "n": 2}
    assert summary["standing"]["radam"]["best"] == 2

    assert (results / "curves" / "cifar100_vgg_radam.csv").is_file()
    assert (results / "curves" / "cifar100_resnext_my_opt.csv").is_file()
    figures = results / "figures"
    svg = (figures / "test_acc.svg").read_text()
    assert "radam (n=2)" in svg and "my_opt (n=2)" in svg
    # radam's curves in tab:brown, my_opt's in tab:red (sorted first of the unknown keys);
    # the figure has neither colour without them.
    assert colour_pixels(figures / "test_acc.png", (140, 86, 75)) > 100
    assert colour_pixels(figures / "test_acc.png", (214, 39, 40)) > 100
    assert "CIFAR-100 VGG16-bn radam" in (figures / "sensitivity.svg").read_text()
    assert colour_pixels(figures / "sensitivity.png", (140, 86, 75)) > 50


@pytest.mark.parametrize(
    "overrides, compared",
    [
        ([], True),  # the paper's protocol on the paper's data
        (["preset=demo"], False),  # synthetic, 100 iterations
        (["preset=tiny"], False),
        (["data.source=synthetic"], False),
        (["protocol.cifar100.schedule.iterations=3000"], False),
    ],
)
def test_published_numbers_are_compared_only_with_runs_of_the_papers_protocol(overrides, compared):
    """A scaled-down or synthetic grid's distance to a number read at 30k iterations on the
    real data says nothing: Table 1 gets no paper column for it."""
    refs = load_references()
    kept = comparable_references(refs, load_params(str(PARAMS), overrides))
    cifar = {k for k in refs if k[0] == "cifar100"}
    assert (set(kept) == cifar) if compared else (kept == {})
