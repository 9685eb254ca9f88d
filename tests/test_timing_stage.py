"""The timing stage: every configuration of the grid timed in one process on one device,
interleaved over rounds, with ratios to SGD; its params section validated like the others."""

import csv
import json
from pathlib import Path

import pytest

from pipeline import timing_results
from pipeline.__main__ import main
from pipeline.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
OPTIMIZERS = ("sgd", "adam", "adamw", "vsgd")


def timing_args(data_root, out, *extra):
    # Both datasets (their image and batch sizes differ), the smallest architecture, every
    # optimizer: 8 configurations, 2 rounds of 1 warm-up + 1 timed step, on CPU.
    return [
        "timing",
        "--params",
        str(PARAMS),
        "--set",
        "preset=ci",
        "--set",
        f"data.root={data_root}",
        "--set",
        "archs=[convmixer]",
        "--set",
        "timing={steps: 1, warmup: 1, rounds: 2, device: cpu}",
        "--out",
        str(out),
        *extra,
    ]


def test_every_configuration_is_timed_interleaved_in_one_process_on_one_device(
    data_root, tmp_path, monkeypatch, capsys
):
    from vsgd import engine

    calls = []  # (run, its training images' address) of every training step, in order
    real_step = engine.train_step

    def recording_step(run, state):
        calls.append((id(run), run.train_x.data_ptr()))
        return real_step(run, state)

    monkeypatch.setattr(engine, "train_step", recording_step)
    out = tmp_path / "timing"
    assert main(timing_args(data_root, out)) == 0

    # Interleaved: each round runs every configuration in turn, warm-up + timed steps as one
    # block, the same built run in every round.
    per_block, configs, rounds = 2, 8, 2
    assert len(calls) == per_block * configs * rounds
    first = calls[: per_block * configs]
    assert calls == first * rounds
    blocks = [first[i : i + per_block] for i in range(0, len(first), per_block)]
    assert all(len(set(b)) == 1 for b in blocks)
    assert len({b[0][0] for b in blocks}) == configs
    # One copy of a dataset's training images, shared by its configurations.
    assert len({b[0][1] for b in blocks[:4]}) == 1 and len({b[0][1] for b in blocks[4:]}) == 1

    text = (out / "timing.csv").read_text()
    assert text.splitlines()[0] == ",".join(timing_results.COLUMNS)
    rows = list(csv.DictReader(text.splitlines()))
    assert [(r["dataset"], r["arch"], r["optimizer"]) for r in rows] == [
        (ds, "convmixer", opt) for ds in ("cifar100", "tinyimagenet") for opt in OPTIMIZERS
    ]
    for r in rows:
        assert float(r["seconds_per_step"]) > 0
        assert float(r["images_per_sec"]) == pytest.approx(4 / float(r["seconds_per_step"]))
        ratio = float(r["ratio_to_sgd"])
        assert ratio == 1.0 if r["optimizer"] == "sgd" else ratio > 0
        assert (r["model"], r["batch_size"], r["rounds"], r["steps"], r["warmup"]) == (
            "convmixer_256_8",
            "4",
            "2",
            "1",
            "1",
        )
        assert r["precision"] == "fp32" and r["torch_version"]
    sgd = {r["dataset"]: float(r["seconds_per_step"]) for r in rows if r["optimizer"] == "sgd"}
    for r in rows:
        assert float(r["ratio_to_sgd"]) == pytest.approx(
            float(r["seconds_per_step"]) / sgd[r["dataset"]]
        )
    # One device for every configuration.
    assert {(r["device"], r["device_name"]) for r in rows} == {
        (rows[0]["device"], rows[0]["device_name"])
    }
    assert rows[0]["device"] == "cpu"

    result = json.loads((out / "timing.json").read_text())
    assert (result["device"], result["precision"]) == ("cpu", "fp32")
    assert (result["steps"], result["warmup"], result["rounds"]) == (1, 1, 2)
    assert len(result["rows"]) == configs
    for row in result["rows"]:
        assert len(row["round_seconds"]) == rounds
        assert row["seconds_per_step"] == pytest.approx(
            sorted(row["round_seconds"])[0] / 2 + sorted(row["round_seconds"])[1] / 2
        )
    assert timing_results.load(out) == {k: v for k, v in result.items() if k != "sha256"}
    assert "timing: 8 configurations" in capsys.readouterr().out


def test_bad_timing_section_lists_every_problem_with_its_key_path():
    with pytest.raises(ConfigError) as info:
        load_params(
            PARAMS,
            [
                "timing.steps=0",
                "timing.warmup=-1",
                "timing.rounds=two",
                "timing.device=gpu",
                "timing.step=3",
            ],
        )
    text = "\n".join(info.value.problems)
    for line in [
        "timing.steps: 0 must be >= 1",
        "timing.warmup: -1 must be >= 0",
        "timing.rounds: expected an integer, got 'two'",
        "timing.device: 'gpu' is not a device; allowed: auto, cpu, cuda, cuda:N, mps",
        "timing.step: unknown key (did you mean 'steps'?)",
    ]:
        assert line in text, f"missing {line!r} in:\n{text}"
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, ["timing=null"])
    assert "timing: expected a mapping, got null" in info.value.problems


def test_timing_cli_exits_78_on_bad_params_and_on_unprepared_data(tmp_path, capsys):
    assert main(["timing", "--params", str(PARAMS), "--set", "timing.rounds=0"]) == 78
    err = capsys.readouterr().err
    assert "timing.rounds: 0 must be >= 1" in err and "Traceback" not in err
    assert (
        main(
            [
                "timing",
                "--params",
                str(PARAMS),
                "--set",
                "preset=ci",
                "--set",
                f"data.root={tmp_path}",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 78
    )
    err = capsys.readouterr().err
    assert "timing: no prepared data for cifar100, tinyimagenet" in err
    assert not (tmp_path / "t").exists()


def test_presets_time_briefly_and_the_protocol_properly():
    full = load_params(PARAMS)["timing"]
    assert full == {"steps": 50, "warmup": 10, "rounds": 3, "device": "auto"}
    ci = load_params(PARAMS, ["preset=ci"])["timing"]
    assert ci["rounds"] == 1 and ci["steps"] + ci["warmup"] <= 3
    tiny = load_params(PARAMS, ["preset=tiny"])["timing"]
    assert tiny["steps"] < full["steps"] and tiny["rounds"] <= full["rounds"]
