"""What a pod checks before it trains, so that a doomed run fails at once with 78 (which the
Job's podFailurePolicy does not retry) and says why in its termination message: an image
whose code is not the launcher's, a GPU requested where CUDA is missing. And the run's full
log kept with its published result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_spec

from pipeline.contract import STALE_IMAGE, TERMINATION_LOG_LIMIT
from vsgd.spec import code_version, run_hash

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
for key in (
    "MLFLOW_TRACKING_URI",
    "DVC_STAGE",
    "VSGD_TEE_LOG",
    "VSGD_REQUIRE_CUDA",
    "VSGD_TERMINATION_LOG",
    "VSGD_RESULTS_URI",
):
    ENV.pop(key, None)
OTHER_CODE = "0123456789ab" + "0" * 52


def run_cli(spec: dict, tmp_path, **env) -> tuple[subprocess.CompletedProcess, str | None]:
    """`python -m pipeline.train --spec-json <spec>` with a termination log; the process and
    the termination message (None if none was written)."""
    log = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--spec-json", json.dumps(spec)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "VSGD_TERMINATION_LOG": str(log), **env},
    )
    return proc, log.read_text() if log.exists() else None


def nothing_written(spec) -> bool:
    return not Path(spec["output_dir"]).exists() and not Path(spec["checkpoint"]).exists()


def test_spec_from_other_code_is_a_stale_image_with_both_versions(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path)
    assert run_hash({**spec, "code_version": OTHER_CODE}) == spec["run_hash"]  # not identity
    spec.update(run_hash=run_hash(spec, code=OTHER_CODE), code_version=OTHER_CODE)
    proc, message = run_cli(spec, tmp_path)
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.startswith(STALE_IMAGE), proc.stderr
    for part in (
        OTHER_CODE[:12],
        code_version()[:12],
        spec["run_hash"],
        run_hash(spec),
        "make image",
    ):
        assert part in proc.stderr, part
    assert message == proc.stderr.strip()
    assert "Traceback" not in proc.stderr and nothing_written(spec)


def test_stale_image_without_the_launchers_code_version_says_unknown(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path)
    spec["run_hash"] = run_hash(spec, code=OTHER_CODE)
    proc, message = run_cli(spec, tmp_path)
    assert proc.returncode == 78 and message.startswith(STALE_IMAGE), proc.stderr
    assert "code version unknown" in message and code_version()[:12] in message


def test_spec_edited_after_it_was_built_is_not_called_a_stale_image(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path)
    spec["code_version"] = code_version()
    spec["seed"] = 7  # the identity changed, the hash did not
    proc, message = run_cli(spec, tmp_path)
    assert proc.returncode == 78, proc.stderr
    assert STALE_IMAGE not in message and "changed after it was built" in message
    assert nothing_written(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_gpu_requested_without_cuda_fails_before_any_work(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path, device="cpu")
    proc, message = run_cli(spec, tmp_path, VSGD_REQUIRE_CUDA="1")
    assert proc.returncode == 78, proc.stderr
    assert "GPU requested but CUDA is not available: driver/device plugin (" in message
    assert "580" in message and "device plugin" in message
    assert "training.device: 'cpu', but the Job requests a GPU" in message  # both listed
    assert message == proc.stderr.strip() and "Traceback" not in proc.stderr
    assert nothing_written(spec)  # no data staged, no model built, nothing saved


def test_termination_message_is_cut_to_the_kubernetes_limit(tmp_path):
    spec = {"training": {f"unknown_key_{i:04d}": i for i in range(400)}}
    proc, message = run_cli(spec, tmp_path)
    assert proc.returncode == 78 and len(proc.stderr) > TERMINATION_LOG_LIMIT
    assert message.startswith("invalid configuration (")
    assert len(message.encode()) <= TERMINATION_LOG_LIMIT


def test_unwritable_termination_log_does_not_mask_the_error(tmp_path):
    proc, _ = run_cli(
        {"dataset": "mnist"},
        tmp_path,
        VSGD_TERMINATION_LOG=str(tmp_path / "missing" / "dir" / "log"),
    )
    assert proc.returncode == 78, proc.stderr
    assert "invalid configuration" in proc.stderr and "dataset" in proc.stderr
    assert "could not write the termination message" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_crash_writes_its_last_line_as_termination_message(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path)
    # A crash: the run's directory cannot be made, below a file. (Missing data is not one:
    # like a configuration error, it exits 78 with its message.)
    (tmp_path / "no-such-data").write_text("a file")
    spec["output_dir"] = str(tmp_path / "no-such-data" / "out")
    proc, message = run_cli(spec, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr  # a crash keeps its traceback in the log
    assert message == proc.stderr.strip().splitlines()[-1]
    assert "no-such-data" in message


def test_tee_log_is_published_with_the_result_and_appended_on_each_start(data_root, tmp_path):
    spec = run_spec(data_root, tmp_path, iterations=2)
    published = tmp_path / "published"
    env = {"VSGD_TEE_LOG": "1", "VSGD_RESULTS_URI": str(published)}
    for _ in range(2):  # the second start only reports the finished run (a retried pod)
        proc, message = run_cli(spec, tmp_path, **env)
        assert proc.returncode == 0 and message is None, proc.stderr
    log = (published / "train.log").read_text()
    assert (published / "metrics.json").exists()
    headers = [line for line in log.splitlines() if line.startswith("==== ")]
    assert len(headers) == 2 and "python -m pipeline.train" in headers[0]
    first = log.split(headers[1])[0]
    for part in ("step 1/2 ", "step 2/2 ", "MLflow tracking is off", "done "):
        assert part in first, part
    assert "resuming" in log.split(headers[1])[1]
    # The local copy holds everything the run printed, the published one all but the
    # final line, printed after the upload.
    assert (Path(spec["output_dir"]) / "train.log").read_text().startswith(log)
