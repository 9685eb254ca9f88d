"""`vsgd` as a library: the trainer works without MLflow installed or configured, says so
once, and writes no tracking database unless asked."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
if {block}:
    sys.modules["mlflow"] = None  # as if mlflow were not installed: import fails
from vsgd.trainer import train
spec = json.loads(sys.argv[1])
metrics = train(spec)
print(json.dumps({{"test_acc": metrics["test_acc"], "mlflow_run_id": metrics["mlflow_run_id"],
                  "mlflow_loaded": "mlflow.tracking" in sys.modules}}))
"""


def run_trainer(spec, cwd, block_mlflow):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN.format(block=block_mlflow), json.dumps(spec)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_trainer_runs_without_mlflow_installed(data_root, tmp_path):
    from conftest import run_spec

    spec = run_spec(data_root, tmp_path, iterations=2, tracking_uri="sqlite:///asked.db")
    out, log = run_trainer(spec, tmp_path, block_mlflow=True)
    assert 0 <= out["test_acc"] <= 1 and out["mlflow_run_id"] is None
    lines = [line for line in log.splitlines() if "tracking is off" in line]
    assert len(lines) == 1 and "mlflow is not installed" in lines[0], log
    assert not (tmp_path / "asked.db").exists()


def test_trainer_writes_no_tracking_database_unless_asked(data_root, tmp_path):
    from conftest import run_spec

    spec = run_spec(data_root, tmp_path, iterations=2)
    del spec["tracking"]  # a library user's spec: nothing said about tracking
    out, log = run_trainer(spec, tmp_path, block_mlflow=False)
    assert out["mlflow_run_id"] is None and not out["mlflow_loaded"]
    assert sum("tracking is off" in line for line in log.splitlines()) == 1, log
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
