"""`python -m pipeline doctor`: the machine's facts, exit 0 where the configured protocol can
run (on a CPU, slowly), 78 with every problem listed where it cannot; `--gpu-check`'s CPU
sequence end to end; the node tables it fills. CUDA-only branches are driven by the GPU
facts the CUDA probe would report, injected."""

import http.server
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

from pipeline import services
from pipeline.__main__ import main
from pipeline.doctor import cuda_probe, estimate, gpu_check, node_table, reachability, report

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without CUDA")


def h100(n=2, broken=()):
    """What the probe says on a node with `n` H100s (GPU indices in `broken` fail the matmul)."""
    return {
        "torch": "2.14.1+cu130",
        "built_cuda": "13.0",
        "cudnn": 92400,
        "available": True,
        "error": None,
        "driver": "580.65.06",
        "driver_cuda": "13.0",
        "device_count": n,
        "gpus": [
            {
                "index": i,
                "name": "NVIDIA H100 80GB HBM3",
                "memory_gib": 79.2,
                "capability": "9.0",
                "bf16": True,
                "tf32": True,
                "tiny_op": {"ok": False, "error": "CUDA error: an illegal memory access"}
                if i in broken
                else {"ok": True, "max_error": 0.0, "seconds": 0.01},
            }
            for i in range(n)
        ],
    }


@pytest.fixture(scope="module")
def this_machine():
    """The real probe's answer, asked once (a child process that imports torch)."""
    return cuda_probe.probe_cuda()


@pytest.fixture
def workspace(tmp_path, monkeypatch, this_machine):
    """cwd is a fresh directory (the SQLite tracking store's), the probe answers as this
    machine, and no tracking URI from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(cuda_probe, "probe_cuda", lambda *a, **k: this_machine)
    return tmp_path


def doctor(*args):
    return ["doctor", "--params", str(PARAMS), *args]


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (taken, then given back)."""
    return services.free_port()


@NO_CUDA
def test_the_real_probe_says_there_is_no_cuda_here(this_machine):
    assert this_machine["available"] is False and this_machine["gpus"] == []
    assert this_machine["error"] and this_machine["torch"] == torch.__version__


@NO_CUDA
def test_doctor_on_a_cpu_machine_exits_0_and_says_the_protocol_runs_slowly_on_the_cpu(
    workspace, capsys
):
    assert main(doctor()) == 0
    out = capsys.readouterr().out
    assert "CUDA works:            no" in out
    assert "GPUs:                  none" in out
    assert "runs on this CPU, slowly" in out
    assert "training.device:       auto -> cpu" in out
    assert "ok: the configured protocol can run here" in out


@NO_CUDA
def test_doctor_json_is_one_object_with_every_fact(workspace, capsys):
    assert main(doctor("--json")) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["ok"] is True and found["problems"] == []
    assert set(found["packages"]) >= {"dvc", "mlflow", "kubernetes", "boto3"}
    assert all(found["packages"][p] for p in ("dvc", "mlflow", "kubernetes", "boto3"))
    assert found["python"]["version"] and found["torch"]["version"] == torch.__version__
    assert found["cuda"]["available"] is False and found["gpus"] == []
    assert found["precision"]["setting"] == "fp32"
    assert found["precision"]["flags"]["cudnn.allow_tf32"] is False
    assert found["executor"] == {
        "kind": "local",
        "max_parallel": None,
        "runs_at_once": 1,
        "gpus": [],
        "runs_per_gpu": 1,
    }
    assert found["tracking"]["kind"] == "sqlite" and found["tracking"]["ok"] is True
    assert found["storage"]["ok"] is None
    assert set(found["datasets"]) == {"cifar100", "tinyimagenet"}
    assert not any(d["prepared"] for d in found["datasets"].values())
    assert any("runs on this CPU, slowly" in n for n in found["notes"])


@NO_CUDA
def test_cuda_asked_for_without_cuda_and_unreachable_services_exit_78_listing_every_problem(
    workspace, capsys, monkeypatch
):
    monkeypatch.setattr(reachability, "WAIT_SECONDS", 2.0)
    for key, value in services.MOTO_CREDENTIALS.items():  # credentials, so the endpoint fails
        monkeypatch.setenv(key, value)
    tracking, store = closed_port(), closed_port()
    code = main(
        doctor(
            "--json",
            "--set",
            "training.device=cuda",
            "--set",
            "timing.device=cuda:1",
            "--set",
            f"tracking.uri=http://127.0.0.1:{tracking}",
            "--set",
            "storage.remote=s3://vsgd/doctor",
            "--set",
            f"storage.endpoint_url=http://127.0.0.1:{store}",
        )
    )
    captured = capsys.readouterr()
    assert code == 78
    found = json.loads(captured.out)
    problems = found["problems"]
    assert found["ok"] is False and len(problems) == 4, problems
    assert problems[0].startswith("training.device: 'cuda'") and "needs a CUDA GPU" in problems[0]
    assert problems[1].startswith("timing.device: 'cuda:1' but CUDA is not available here")
    assert problems[2].startswith(f"tracking server http://127.0.0.1:{tracking}: ")
    assert f"127.0.0.1:{tracking}/health" in problems[2]
    assert problems[3] == (
        f"remote store s3://vsgd/doctor: no answer from http://127.0.0.1:{store} within 2 s"
    )
    # The listing for a person, on stderr; no traceback anywhere.
    assert all(p in captured.err for p in problems)
    assert "Traceback" not in captured.out + captured.err


@NO_CUDA
def test_an_unreachable_tracking_server_alone_exits_78_in_text_mode(workspace, capsys):
    port = closed_port()
    assert main(doctor("--set", f"tracking.uri=http://127.0.0.1:{port}")) == 78
    out = capsys.readouterr().out
    assert "1 problem(s): the protocol cannot run here" in out
    assert f"tracking server http://127.0.0.1:{port}" in out


def test_a_server_that_never_answers_costs_the_wait_and_no_more():
    """A port that accepts connections and says nothing: the probe gives up after `wait`."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        found = reachability.tracking_status(f"http://127.0.0.1:{port}", wait=0.5)
    assert found["ok"] is False and "no answer within 0.5 s" in found["detail"]


def test_an_answering_health_endpoint_is_reachable_and_credentials_stay_out_of_it():
    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        found = reachability.tracking_status(f"http://user:s3cret@127.0.0.1:{port}/mlflow")
    finally:
        server.shutdown()
    assert found["ok"] is True, found
    assert seen == [("/mlflow/health", None)]
    assert "s3cret" not in json.dumps(found)


def test_gpus_as_the_probe_reports_them_decide_the_executor_and_the_devices(workspace, monkeypatch):
    monkeypatch.setattr(cuda_probe, "probe_cuda", lambda *a, **k: h100(2))
    found = report.build(
        PARAMS, ["executor.local.runs_per_gpu=2", "training.precision=tf32"], wait=1.0
    )
    assert found["ok"] is True, found["problems"]
    assert found["executor"]["gpus"] == ["0", "1"] and found["executor"]["runs_at_once"] == 4
    assert found["devices"]["training.device"]["resolves_to"] == "cuda"
    assert found["precision"]["flags"]["cuda.matmul.allow_tf32"] is True
    assert found["precision"]["here"] == "as intended on every GPU here"
    assert not any("slowly" in n for n in found["notes"])
    text = report.render_text(found)
    assert "GPU 1:" in text and "NVIDIA H100 80GB HBM3, 79.2 GiB, compute capability 9.0" in text
    assert "580.65.06 (supports CUDA 13.0)" in text


def test_a_gpu_that_fails_its_first_operation_and_a_missing_gpu_index_are_problems(
    workspace, monkeypatch
):
    monkeypatch.setattr(cuda_probe, "probe_cuda", lambda *a, **k: h100(2, broken={1}))
    found = report.build(PARAMS, ["timing.device=cuda:2"], wait=1.0)
    assert found["problems"] == [
        "GPU 1 (NVIDIA H100 80GB HBM3) fails a small matmul: CUDA error: an illegal memory access",
        "timing.device: 'cuda:2' but this machine has 2 GPU(s) (cuda:0 to cuda:1)",
    ]


def test_the_estimate_adds_every_planned_run_and_spreads_them_over_the_gpus():
    from pipeline.config import load_params

    params = load_params(PARAMS)
    rows = [
        {
            "dataset": ds,
            "arch": arch,
            "precision": "fp32",
            "batch_size": 100,
            "step_seconds": 0.1,  # 1 ms per image
            "setup_seconds": 30.0,
            "warmup": 10,
        }
        for ds in ("cifar100", "tinyimagenet")
        for arch in ("vgg", "convmixer", "resnext")
    ]
    sharing = {
        "recommended": 2,
        "counts": [{"runs": 1, "speedup": 1.0}, {"runs": 2, "speedup": 1.5}],
    }
    found = estimate.estimate(params, rows, sharing, gpus=4)
    tune, train = found["stages"]["tune"], found["stages"]["train"]
    assert (tune["runs"], train["runs"]) == (96, 72) and not found["unmeasured"]
    # Per run: iterations x batch x 1 ms + the setup beyond the warm-up steps (29 s).
    protocol = params["protocol"]
    expected = 0.0
    for spec_ds, budget, runs in (("cifar100", 0.2, 48), ("tinyimagenet", 0.2, 48)):
        for arch in ("vgg", "convmixer", "resnext"):
            iterations = round(protocol[spec_ds]["schedule"]["iterations"] * budget)
            batch = protocol[spec_ds]["batch_size"][arch]
            expected += runs / 3 * (iterations * batch * 1e-3 + 29.0)
    assert tune["one_device_seconds"] == pytest.approx(expected)
    assert found["per_gpu_seconds"] == pytest.approx(found["one_device_seconds"] / 1.5)
    assert tune["machine_seconds"] == pytest.approx(tune["one_device_seconds"] / (4 * 1.5))
    assert estimate.hours(7200) == "2.0 h" and estimate.hours(4 * 86400) == "4.0 days"


@NO_CUDA
def test_gpu_check_on_the_cpu_runs_every_item_at_cpu_size_and_names_what_it_skipped(
    workspace, capsys
):
    out = workspace / "doctor"
    assert main(doctor("--gpu-check", "--out", str(out))) == 0
    progress = capsys.readouterr().out
    assert "[1/6] CUDA tests" in progress and "[6/6] SIGTERM" in progress
    found = json.loads((out / gpu_check.JSON_NAME).read_text())
    assert found["size"] == "cpu" and found["passed"] is True
    items = {item["key"]: item for item in found["items"]}
    assert list(items) == ["tests", "optimizer", "configurations", "host_sync", "sharing", "resume"]
    assert all(item["size"] == "cpu" for item in items.values())
    assert items["tests"]["status"] == "skipped" and "no CUDA" in items["tests"]["notes"][0]
    assert items["host_sync"]["status"] == "skipped"
    optimizer = items["optimizer"]
    assert optimizer["status"] == "passed" and "skipped" in optimizer["paths"]["fused"]
    assert all(optimizer["paths"][p]["ok"] for p in ("single", "default"))
    assert all(optimizer["bf16_round_trip"][p]["ok"] for p in ("single", "default"))
    configurations = items["configurations"]
    assert [(r["dataset"], r["arch"], r["precision"]) for r in configurations["rows"]] == [
        ("cifar100", "convmixer", "fp32"),
        ("cifar100", "convmixer", "bf16"),
    ]
    assert all(
        r["images_per_sec"] > 0 and r["ceiling_images_per_sec"] > 0 for r in configurations["rows"]
    )
    assert any(
        n.startswith("not run at CPU size: cifar100/vgg/fp32") for n in configurations["notes"]
    )
    assert [m["runs"] for m in items["sharing"]["counts"]] == [1, 2]
    assert "4 runs: not run at CPU size" in items["sharing"]["notes"]
    resume = items["resume"]
    assert resume["status"] == "passed" and resume["identical"] is True
    assert resume["max_abs_difference"] == 0.0
    # SIGTERM once step 2 is logged: the run stops after the step in flight, before the end.
    stopped = re.fullmatch(
        r"stopped by SIGTERM at step (\d)/6: checkpoint saved.*", resume["stopped"]
    )
    assert stopped and 2 <= int(stopped.group(1)) < 6, resume["stopped"]
    assert found["estimate"]["stages"]["train"]["estimated_runs"] == 12
    markdown = (out / gpu_check.MD_NAME).read_text()
    assert "| CUDA tests (pytest -m gpu) | skipped | cpu |" in markdown
    assert "**identical**" in markdown and "on this CPU, one run at a time" in markdown
    # A CPU-size report has no place among the GPU nodes.
    table = workspace / "performance.md"
    shutil.copy(ROOT / "docs" / "performance.md", table)
    assert main(doctor("--append-table", str(table), "--report", str(out / "gpu-check.json"))) == 78
    assert table.read_text() == (ROOT / "docs" / "performance.md").read_text()


def test_a_gpu_report_adds_its_node_to_the_tables(tmp_path):
    docs = tmp_path / "performance.md"
    shutil.copy(ROOT / "docs" / "performance.md", docs)
    before = docs.read_text()
    assert node_table.NONE_YET in before
    row = {
        "dataset": "cifar100",
        "arch": "convmixer",
        "model": "convmixer_256_8",
        "batch_size": 256,
        "images_per_sec": 20000.0,
        "ceiling_images_per_sec": 21000.0,
        "peak_memory_mib": 3000.0,
        "host_sync": None,
    }
    fake = {  # the form of a gpu-check.json; these figures were never measured
        "date": "2030-01-01T00:00:00+00:00",
        "size": "gpu",
        "node": {
            "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "capability": "9.0"}],
            "driver": "580.65.06",
            "torch": "2.14.1+cu130",
            "cuda": "13.0",
        },
        "items": [
            {"key": "optimizer", "paths": {"single": {"max_rel": 1e-6}}, "bf16_round_trip": {}},
            {
                "key": "configurations",
                "rows": [
                    {**row, "precision": "fp32"},
                    {**row, "precision": "bf16", "peak_memory_mib": 2000.0},
                ],
            },
            {
                "key": "sharing",
                "counts": [{"runs": 1, "total_images_per_sec": 20000.0}],
                "recommended": 1,
            },
            {"key": "resume", "identical": True, "max_abs_difference": 0.0},
        ],
        "estimate": {
            "stages": {"tune": {"estimated_runs": 96}},
            "unmeasured": [],
            "per_gpu_seconds": 7200.0,
            "machine_seconds": 3600.0,
            "gpus": 1,
        },
    }
    node_table.append(docs, fake)
    after = docs.read_text()
    assert node_table.NONE_YET not in after
    assert (
        "| 2030-01-01 | NVIDIA H100 80GB HBM3 | 580.65.06 | 2.14.1+cu130 (13.0) | 1.0e-06 / - "
        "/ - | - | 20000 / - / - | 1 | yes | 2.0 h | 1.0 h on 1 |"
    ) in after
    assert (
        "| 2030-01-01 | NVIDIA H100 80GB HBM3 | cifar100 | convmixer_256_8 | 256 | "
        "20000 / 21000 | 20000 / 21000 | 3000 / 2000 | none |"
    ) in after
    # Every other line of the file is as it was.
    assert [line for line in after.splitlines() if "2030-01-01" not in line] == [
        line for line in before.splitlines() if line != node_table.NONE_YET
    ]
