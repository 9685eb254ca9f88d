"""Float denormals on CPU (`training.denormals`): flushed to zero in every thread of a run by
default, kept when asked; checked, part of the run identity, and read back in the run's own
process into its metrics.json (`denormals_in_effect`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, reseal, run_spec

from pipeline.config import ConfigError, load_params
from vsgd import engine, trainer
from vsgd.outputs import DIGESTS, check_result
from vsgd.spec import BOOKKEEPING, TRAINING, check_spec, run_hash

PARAMS = ROOT / "params.yaml"
# Two threads whatever the machine has, so that the pool's workers are checked too.
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
for key in ("MLFLOW_TRACKING_URI", "DVC_STAGE", "VSGD_TEE_LOG", "VSGD_STOP_WITH_LAUNCHER"):
    ENV.pop(key, None)


@pytest.fixture(autouse=True)
def _restore_mode():
    """The mode is process-wide: leave the default (keep, PyTorch's) for the other tests,
    as they were before any build."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    engine.set_denormals("keep")


def test_the_probe_reads_what_the_cpu_does():
    torch.set_num_threads(1)
    engine.set_denormals("flush")
    assert engine.denormals_in_effect() == "flush"
    torch.set_flush_denormal(False)
    assert engine.denormals_in_effect() == "keep"


@pytest.mark.parametrize("first, then", [("flush", "keep"), ("keep", "flush")])
def test_every_thread_takes_the_mode_nothing_of_an_earlier_run_carries_over(first, then):
    """OpenMP's threads keep the mode they were started with: setting it on the calling
    thread alone (torch.set_flush_denormal) leaves them computing the other way ("mixed")."""
    torch.set_num_threads(2)
    engine.set_denormals(first)
    assert engine.denormals_in_effect() == first  # the team has started, in `first`'s mode
    engine.set_denormals(then)
    assert engine.denormals_in_effect() == then


def test_denormals_is_checked_and_part_of_the_identity(data_root, tmp_path):
    assert TRAINING["denormals"] == ("flush", ("flush", "keep"))
    assert "denormals" not in BOOKKEEPING
    spec = run_spec(data_root, tmp_path, denormals="zero")
    assert check_spec(spec) == ["training.denormals: zero is not allowed; allowed: flush, keep"]
    default = run_spec(data_root, tmp_path)
    assert "denormals" not in default["training"]
    flush = run_spec(data_root, tmp_path, denormals="flush")
    keep = run_spec(data_root, tmp_path, denormals="keep")
    assert check_spec(flush) == [] and check_spec(keep) == []
    assert run_hash(flush) == run_hash(default)  # flush is the default
    assert run_hash(keep) != run_hash(default)


def test_params_yaml_flushes_and_checks_the_key():
    assert load_params(PARAMS)["training"]["denormals"] == "flush"
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, ["training.denormals=zero"])
    assert info.value.problems == ["training.denormals: zero is not allowed; allowed: flush, keep"]


def train_in_its_own_process(spec, tmp_path) -> dict:
    spec_file = tmp_path / f"{spec['run_hash']}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--spec", str(spec_file)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(spec["output_dir"], "metrics.json").read_text())


# `keep` in a run process: extended (the in-process test reads both modes back).
@pytest.mark.parametrize("denormals", ["flush", pytest.param("keep", marks=pytest.mark.extended)])
def test_a_cpu_run_records_what_its_process_did_with_denormals(data_root, tmp_path, denormals):
    """Read back inside `python -m pipeline.train`, in both of its CPU threads."""
    spec = run_spec(data_root, tmp_path, iterations=2, denormals=denormals)
    metrics = train_in_its_own_process(spec, tmp_path)
    assert metrics["denormals_in_effect"] == denormals
    assert check_result(spec["output_dir"], spec["run_hash"]) == []


def test_a_run_in_this_process_records_it_too(data_root, tmp_path):
    torch.set_num_threads(2)
    engine.set_denormals("keep")  # an earlier run's mode
    metrics = trainer.train(run_spec(data_root, tmp_path, iterations=1))
    assert metrics["denormals_in_effect"] == "flush"


def test_results_from_before_the_record_stay_whole_and_a_bad_record_is_refused(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path, iterations=1)
    trainer.train(spec)
    out = Path(spec["output_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["denormals_in_effect"] == "flush"

    # Older results have neither the record nor the digests (which came later).
    older = {k: v for k, v in metrics.items() if k not in ("denormals_in_effect", DIGESTS)}
    (out / "metrics.json").write_text(json.dumps(older))
    assert check_result(out, spec["run_hash"]) == []

    for value in (None, "mixed"):  # off the CPU; some threads only
        (out / "metrics.json").write_text(json.dumps({**metrics, "denormals_in_effect": value}))
        reseal(out)
        assert check_result(out, spec["run_hash"]) == []
    (out / "metrics.json").write_text(json.dumps({**metrics, "denormals_in_effect": "yes"}))
    reseal(out)
    assert check_result(out, spec["run_hash"]) == [
        "metrics.json: denormals_in_effect 'yes' is not null or one of flush, keep, mixed"
    ]
