"""`python -m pipeline doctor`: whether the configured protocol can run on this machine, and
everything that decides it, in one report (text, or one JSON object with `--json`).

Every problem is listed at once; a problem is what would make a stage or a run fail here:
params that do not validate, a device setting this machine cannot honour, CUDA that does not
work where a run would use it, a tracking server or remote store that does not answer, a
package a configured service needs. What only makes it slow (no GPU: the protocol runs on
the CPU) or is still to do (a dataset not prepared yet) is a note.
"""

import json
import os

from vsgd.spec import ConfigError

from ..config import load_params
from ..executors import get_executor
from ..executors.local import VISIBLE_ENV, cuda_visible_devices
from ..grid import data_checksum
from ..plan import PINNED, plan
from . import cuda_probe, reachability
from .facts import (
    device_problems,
    package_versions,
    precision_facts,
    python_facts,
)
from .reachability import store_status, tracking_status

# Which package a configured service needs: (what needs it, distribution).
NEEDED = {
    "tracking": "mlflow",
    "kubernetes": "kubernetes",
    "remote store": "boto3",
}


def build(params_path="params.yaml", overrides=(), wait: float | None = None) -> dict:
    """The doctor's report: the facts, `problems` (each a line) and `notes`; `ok` when there
    is no problem (exit 0). `wait`: seconds each service has to answer (default
    `reachability.WAIT_SECONDS`)."""
    wait = reachability.WAIT_SECONDS if wait is None else wait
    problems, notes = [], []
    cuda = cuda_probe.probe_cuda()
    report = {
        "ok": False,
        "problems": problems,
        "notes": notes,
        "python": python_facts(),
        "packages": package_versions(),
        "torch": {
            "version": cuda["torch"],
            "built_cuda": cuda["built_cuda"],
            "cudnn": cuda["cudnn"],
        },
        "cuda": {
            "available": cuda["available"],
            "error": cuda["error"],
            "driver": cuda["driver"],
            "driver_cuda": cuda["driver_cuda"],
            "device_count": cuda["device_count"],
        },
        "gpus": cuda["gpus"],
    }
    for gpu in cuda["gpus"]:
        if not gpu["tiny_op"]["ok"]:
            problems.append(
                f"GPU {gpu['index']} ({gpu['name']}) fails a small matmul: "
                f"{gpu['tiny_op'].get('error') or 'wrong result'}"
            )
    try:
        params = load_params(params_path, overrides)
    except ConfigError as exc:
        problems.extend(exc.problems)
        notes.append(f"{params_path} does not validate: the checks that need it were skipped")
        report["ok"] = not problems
        return report
    report["params"] = {"file": str(params_path), "preset": params.get("preset")}
    report["precision"] = precision_facts(params["training"]["precision"], cuda)
    # The executor first: the local one judges `training.device` for its runs itself.
    report["executor"] = _executor(params, cuda, problems)
    report["devices"] = _devices(params, cuda, report["executor"], problems, notes)
    report["tracking"] = tracking_status(params["tracking"]["uri"], wait)
    report["storage"] = store_status(
        params["storage"]["remote"], params["storage"]["endpoint_url"], wait
    )
    for what in ("tracking", "storage"):
        if report[what]["ok"] is False:
            name = "tracking server" if what == "tracking" else "remote store"
            problems.append(f"{name} {report[what]['uri']}: {report[what]['detail']}")
    _packages(params, report, problems, notes)
    report["datasets"] = _datasets(params, notes)
    report["ok"] = not problems
    return report


def _devices(params, cuda, executor, problems, notes) -> dict:
    """Where the runs and the timing stage compute, by their device settings."""
    out = {}
    executor_kind = params["executor"]["kind"]
    for key, device in (
        ("training.device", params["training"]["device"]),
        ("timing.device", params["timing"]["device"]),
    ):
        if key == "training.device" and executor_kind == "kubernetes":
            # The runs compute in pods: this machine's devices are not theirs.
            out[key] = {"setting": device, "resolves_to": "the cluster's (Kubernetes Jobs)"}
            continue
        found, where = device_problems(key, device, cuda)
        if not any(p.startswith(key) for p in problems):  # said once, the executor's word first
            problems.extend(found)
        if key == "training.device" and device == "auto" and not executor.get("gpus"):
            where = "cpu"  # the local executor gives its runs no GPU (none, or `gpus: none`)
        out[key] = {"setting": device, "resolves_to": where}
    training = out["training.device"]
    if training["resolves_to"] == "cpu" and not any(
        p.startswith("training.device") for p in problems
    ):
        notes.append(
            ("no GPU here" if not cuda["available"] else "training.device: cpu")
            + ": the protocol runs on this CPU, slowly (hours to days per run at the paper's "
            "sizes; `python -m pipeline doctor --gpu-check` estimates the whole protocol)"
        )
    return out


def _executor(params, cuda, problems) -> dict:
    """The executor the stages get (`pipeline.executors.get_executor`) and, for the local
    one, the GPUs it would give the runs."""
    settings = params["executor"]
    out = {"kind": settings["kind"], "max_parallel": settings["max_parallel"]}
    if settings["kind"] != "local":
        out["detail"] = (
            "runs are Kubernetes Jobs: this machine launches them, the cluster's GPUs train "
            "(`python -m pipeline validate` and the executor's preflight check the cluster)"
        )
        return out
    executor = get_executor(params)
    # The GPUs as the executor names them for its runs (CUDA_VISIBLE_DEVICES read as CUDA
    # reads it), counted by the probe: this process never initialises CUDA itself.
    visible = os.environ.get(VISIBLE_ENV)
    executor.machine_gpus = lambda: cuda_visible_devices(visible, cuda["device_count"])
    specs = plan(_local(params), undecided=PINNED)
    try:
        # The executor's own resolution for the grid's runs: the GPUs they get and how many
        # run at once (ConfigError for runs it would refuse before the stage).
        gpus, _ = executor.plan_runs(specs.tuning + specs.final)
    except ConfigError as exc:
        problems.extend(exc.problems)
        gpus = []
    out["runs_at_once"] = executor.max_parallel
    out["gpus"] = gpus
    out["runs_per_gpu"] = executor.runs_per_gpu
    if visible is not None:
        out["cuda_visible_devices"] = visible
    return out


def _local(params: dict) -> dict:
    """params without the remote store: where a pod would stage a dataset from is no
    question here, and computing it hashes every file of it."""
    return {**params, "storage": {**params["storage"], "remote": None}}


def _packages(params, report, problems, notes) -> None:
    versions = report["packages"]
    needed = {
        "tracking": report["tracking"]["kind"] not in ("none",),
        "kubernetes": params["executor"]["kind"] == "kubernetes",
        "remote store": bool(params["storage"]["remote"]),
    }
    for what, package in NEEDED.items():
        if needed[what] and versions.get(package) is None:
            problems.append(
                f"{package} is not installed, and the {what} needs it: pip install '.[pipeline]'"
            )
    if versions.get("dvc") is None:
        notes.append("dvc is not installed: `dvc repro` is not available (the stages are)")


def _datasets(params, notes) -> dict:
    """Which of the grid's datasets are prepared (their manifest's checksum)."""
    out = {}
    for dataset in params["datasets"]:
        directory = f"{params['data']['root']}/prepared/{dataset}"
        checksum = data_checksum(directory)
        out[dataset] = {"dir": directory, "prepared": checksum is not None, "checksum": checksum}
        if checksum is None:
            notes.append(
                f"{dataset} is not prepared in {directory}: `dvc repro` prepares it "
                f"(or `python -m pipeline prepare {dataset}`)"
            )
    return out


def render_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)


def render_text(report: dict) -> str:
    lines = []

    def row(name, value):
        lines.append(f"{name + ':':<22} {value}")

    py, torch_, cuda = report["python"], report["torch"], report["cuda"]
    row("Python", f"{py['version']} ({py['executable']}), {py['cpu_count']} CPUs")
    row("Platform", py["platform"])
    row("torch", f"{torch_['version']} (built with CUDA {torch_['built_cuda'] or 'none'})")
    row("cuDNN", torch_["cudnn"] or "none")
    row("CUDA works", "yes" if cuda["available"] else f"no ({cuda['error']})")
    row(
        "NVIDIA driver",
        f"{cuda['driver'] or 'none found'}"
        + (f" (supports CUDA {cuda['driver_cuda']})" if cuda["driver_cuda"] else ""),
    )
    if not report["gpus"]:
        row("GPUs", "none")
    for gpu in report["gpus"]:
        op = gpu["tiny_op"]
        row(
            f"GPU {gpu['index']}",
            f"{gpu['name']}, {gpu['memory_gib']:.1f} GiB, compute capability "
            f"{gpu['capability']}, matmul {'ok' if op['ok'] else 'FAILED'}",
        )
    for name, version in report["packages"].items():
        row(name, version or "not installed")
    if "precision" in report:
        p = report["precision"]
        row("training.precision", f"{p['setting']}: {p['meaning']}")
        flags = ", ".join(f"{k}={v}" for k, v in p["flags"].items())
        row("  flags here", f"{flags}; {p['here']}")
        for key, device in report["devices"].items():
            row(key, f"{device['setting']} -> {device['resolves_to']}")
        e = report["executor"]
        detail = e.get("detail") or (
            f"{e['runs_at_once']} run(s) at once, GPUs {', '.join(e['gpus']) or 'none'}, "
            f"{e['runs_per_gpu']} run(s) per GPU"
        )
        row("executor", f"{e['kind']} (max_parallel {e['max_parallel']}): {detail}")
        for what in ("tracking", "storage"):
            s = report[what]
            mark = {True: "ok", False: "FAILED", None: "-"}[s["ok"]]
            row(what, f"{s['uri'] or 'none'} [{mark}] {s['detail']}")
        for dataset, d in report["datasets"].items():
            row(
                f"data {dataset}",
                f"prepared ({d['checksum'][:12]}) in {d['dir']}"
                if d["prepared"]
                else f"not prepared ({d['dir']})",
            )
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if report["problems"]:
        lines.append(f"{len(report['problems'])} problem(s): the protocol cannot run here")
        lines.extend(f"  - {problem}" for problem in report["problems"])
    else:
        lines.append("ok: the configured protocol can run here")
    return "\n".join(lines)
