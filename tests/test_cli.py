"""`python -m pipeline`: every command listed with a description, help for every argument,
examples that keep their line breaks, and user errors that exit 78 with the cause and what
to do, never a traceback."""

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.__main__ import COMMANDS, EXAMPLES

ROOT = Path(__file__).resolve().parents[1]


def pipeline(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_command_with_a_description():
    proc = pipeline("--help")
    assert proc.returncode == 0, proc.stderr
    for name, (_, summary) in COMMANDS.items():
        assert name in proc.stdout and summary in " ".join(proc.stdout.split())
    # The examples keep their line breaks (a raw formatter, not re-wrapped text).
    for line in EXAMPLES.splitlines():
        assert line in proc.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_and_argument_has_help(name):
    command, _ = COMMANDS[name]
    if isinstance(command, str):
        command = importlib.import_module(command)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert (command.__doc__ or "").strip(), f"{name} has no description"
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, (
            f"{name}: {action.dest} has no help"
        )
    proc = pipeline(name, "--help")
    assert proc.returncode == 0 and "usage: python -m pipeline " + name in proc.stdout


def test_train_cli_arguments_have_help():
    from pipeline import train

    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for flag in (
        "--spec",
        "--spec-json",
        "--dataset",
        "--arch",
        "--optimizer",
        "--seed",
        "--set",
        "--params",
    ):
        assert flag in proc.stdout
    assert train.__doc__.splitlines()[2].strip() in proc.stdout  # examples, line by line


@pytest.mark.parametrize(
    "args,message",
    [
        (["trian"], "unknown command 'trian'; allowed: validate"),
        (["validate", "--sett", "x=1"], "unrecognized arguments"),
        (["validate", "--set", "seeds=[0, 0]"], "seeds: duplicates in [0, 0]"),
    ],
)
def test_user_errors_exit_78_without_traceback(args, message):
    proc = pipeline(*args)
    assert proc.returncode == 78, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_train_without_prepared_data_exits_78_and_says_what_to_do(tmp_path):
    proc = pipeline(
        "train",
        "--params",
        str(ROOT / "params.yaml"),
        "--set",
        "preset=ci",
        "--set",
        f"data.root={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 78, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "invalid configuration: train: no prepared data for cifar100, "
        "tinyimagenet; run `dvc repro` (its prepare stage) or `python -m "
        "pipeline prepare cifar100` first"
    ], proc.stderr


def test_single_run_cli_bad_flags_exit_78(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--dataset", "cifar100"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 78 and "--dataset needs --arch and --optimizer" in proc.stderr
    spec = json.dumps({"checkpoint": "ftp://x"})
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--spec-json", spec],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 78 and "Traceback" not in proc.stderr
