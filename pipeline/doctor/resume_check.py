"""A run stopped by SIGTERM and resumed in a new process ends where an uninterrupted one
does: both started as the executors start a run (`python -m pipeline.train --spec`,
`pipeline.contract.RUN_MODULE`) on synthetic data of the protocol's first configuration at
its batch size, compiled where the device compiles, every process with an empty compile
cache of its own (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR). The two ends are compared:
the model's and the optimizer's final state (largest difference of an element) and the
result's metrics. Where they differ on CUDA, the ops of the training step without a
deterministic implementation are named (`torch.use_deterministic_algorithms`, warn only).
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from vsgd import engine
from vsgd.checkpoint import LocalCheckpointStore, from_bytes
from vsgd.data import prepare

from ..contract import (
    LOCK_FD_ENV,
    REQUIRE_CUDA_ENV,
    RESULTS_ENV,
    RUN_MODULE,
    STOP_WITH_LAUNCHER_ENV,
    TEE_LOG_ENV,
)
from ..grid import build_spec
from ..step_timing import timed_training
from .throughput import synthetic_data

ROOT = Path(__file__).resolve().parents[2]  # where `pipeline` is importable from
# What two runs of one spec must have alike in metrics.json (the rest is wall-clock time).
RESULT_KEYS = ("steps_done", "diverged", "train_loss", "train_acc", "test_loss", "test_acc")
DATASET, ARCH, OPTIMIZER = "cifar100", "convmixer", "vsgd"


def resume_spec(params, data_root, iterations, batch, compile_, test_images) -> dict:
    """The run: the protocol's CIFAR-100 ConvMixer-256/8 with VSGD at `batch` (None: the
    paper's), `iterations` steps (StepLR halving halfway, so the scheduler's state matters),
    one evaluation at the end, untracked."""
    p = copy.deepcopy(params)
    p["data"].update(root=str(data_root), source="synthetic")
    p["storage"]["remote"] = None
    cell = p["protocol"][DATASET]
    if batch is not None:
        cell["batch_size"][ARCH] = batch
    cell["schedule"] = {
        "iterations": iterations,
        "step_size": max(1, iterations // 2),
        "gamma": 0.5,
    }
    p["experiments"] = []  # the check's own sizes, whatever params override for this cell
    p["training"].update(
        compile=compile_,
        eval_every=iterations,
        checkpoint_every=iterations,
        log_every=1,
        beta1_every=iterations,
        validation_size=0,
        test_limit=test_images,
        eval_batch_size=test_images,
    )
    spec = build_spec(p, DATASET, ARCH, OPTIMIZER, 0)
    spec["tracking"]["uri"] = None
    return spec


def check(
    params,
    device,
    *,
    iterations,
    stop_at,
    batch,
    compile_,
    train_images,
    test_images,
    work: Path,
    deadline: float,
    log=print,
) -> dict:
    """Uninterrupted and interrupted runs side by side, then the resume; the comparison."""
    prepare(
        DATASET,
        "synthetic",
        work / "data",
        synthetic_sizes={"train": train_images, "test": test_images},
    )
    spec = resume_spec(params, work / "data", iterations, batch, compile_, test_images)
    straight, interrupted = _placed(spec, work / "straight"), _placed(spec, work / "interrupted")
    threads = None if device.type == "cuda" else 1
    log(
        f"  {spec['name']}: {iterations} steps at batch {spec['batch_size']}, compile "
        f"{compile_}; SIGTERM after step {stop_at}"
    )
    caches = {name: work / f"cache-{name}" for name in ("straight", "first", "resumed")}
    procs = [_start(straight, caches["straight"], threads)]
    try:
        procs.append(_start(interrupted, caches["first"], threads, pipe=True))
        code, stopped_at = _stop_after(procs[1], stop_at, deadline)
        if code != 128 + signal.SIGTERM:
            return _failed(
                f"the interrupted run exited {code}, not 143 (stopped by SIGTERM): {stopped_at}"
            )
        log(f"  stopped: {stopped_at}")
        procs.append(_start(interrupted, caches["resumed"], threads))
        for name, spec_, proc, cache in (
            ("resumed", interrupted, procs[2], caches["resumed"]),
            ("uninterrupted", straight, procs[0], caches["straight"]),
        ):
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                return _failed(f"the {name} run exited {code}: {_last_line(spec_, cache)}")
    except subprocess.TimeoutExpired:
        return {"status": "incomplete", "detail": "the runs did not finish within the item's share"}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return _compare(straight, interrupted, spec, device, stopped_at, log)


def _placed(spec: dict, where: Path) -> dict:
    """The spec writing under `where` (its run lock there too: `output_dir`'s parent)."""
    placed = {**spec, "output_dir": str(where / "out"), "checkpoint": str(where / "checkpoint")}
    where.mkdir(parents=True, exist_ok=True)
    (where / "spec.json").write_text(json.dumps(placed))
    return placed


def _start(spec, cache: Path, threads, pipe=False) -> subprocess.Popen:
    """`python -m pipeline.train --spec` with an empty compile cache of its own; its output
    piped (`pipe`) or in a log file beside the spec."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "MLFLOW_TRACKING_URI",
            RESULTS_ENV,
            TEE_LOG_ENV,
            STOP_WITH_LAUNCHER_ENV,
            LOCK_FD_ENV,
            REQUIRE_CUDA_ENV,
            "DVC_STAGE",
        )
    }
    env.update(
        TORCHINDUCTOR_CACHE_DIR=str(cache),
        TRITON_CACHE_DIR=str(cache / "triton"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    where = Path(spec["output_dir"]).parent
    with open(where / f"{cache.name}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", RUN_MODULE, "--spec", str(where / "spec.json")],
            stdout=subprocess.PIPE if pipe else log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )


def _stop_after(proc, step: int, deadline: float) -> tuple[int, str]:
    """SIGTERM once the run has logged `step`; its exit code and what it said last."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith(f"step {step}/"):
            proc.send_signal(signal.SIGTERM)
            break
        if time.monotonic() > deadline:
            proc.kill()
            break
    lines.extend(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].splitlines())
    said = [line for line in lines if "stopped by" in line]
    return proc.returncode, said[-1] if said else (lines[-1] if lines else "no output")


def _last_line(spec, cache: Path) -> str:
    log = Path(spec["output_dir"]).parent / f"{cache.name}.log"
    lines = log.read_text(errors="replace").splitlines()
    return lines[-1] if lines else "no output"


def _failed(detail: str) -> dict:
    return {"status": "failed", "detail": detail}


def _compare(straight, interrupted, spec, device, stopped_at, log) -> dict:
    a = from_bytes(LocalCheckpointStore(straight["checkpoint"]).load())
    b = from_bytes(LocalCheckpointStore(interrupted["checkpoint"]).load())
    diffs = _differences(
        {"model": a["model"], "optimizer": a["optimizer"]},
        {"model": b["model"], "optimizer": b["optimizer"]},
    )
    max_diff = max(diffs.values(), default=0.0)
    ma, mb = (
        json.loads((Path(s["output_dir"]) / "metrics.json").read_text())
        for s in (straight, interrupted)
    )
    metrics_differ = [k for k in RESULT_KEYS if ma.get(k) != mb.get(k)]
    identical = max_diff == 0.0 and not metrics_differ
    out = {
        "status": "passed" if identical else "failed",
        "identical": identical,
        "max_abs_difference": max_diff,
        "metrics_that_differ": metrics_differ,
        "stopped": stopped_at,
        "run": spec["name"],
        "batch_size": spec["batch_size"],
        "iterations": spec["schedule"]["iterations"],
        "compiled": spec["training"]["compile"],
    }
    if not identical:
        worst = sorted(diffs, key=diffs.get, reverse=True)[:5]
        out["largest_differences"] = {k: diffs[k] for k in worst}
        if device.type == "cuda":
            out["nondeterministic_ops"] = nondeterministic_ops(spec, device)
    log(
        f"  resumed vs uninterrupted: {'identical' if identical else 'DIFFERENT'}, max "
        f"difference {max_diff:.3g}"
        + (f", metrics differ: {metrics_differ}" if metrics_differ else "")
    )
    return out


def _differences(a, b, prefix="") -> dict:
    """Largest absolute difference per tensor of two nested state dicts (inf: other shape
    or a missing key; non-tensors: 0 if equal, else inf)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for key in a.keys() | b.keys():
            if key not in a or key not in b:
                out[f"{prefix}{key}"] = float("inf")
            else:
                out.update(_differences(a[key], b[key], f"{prefix}{key}."))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        out = {}
        for i, (x, y) in enumerate(zip(a, b)):
            out.update(_differences(x, y, f"{prefix}{i}."))
        return out
    name = prefix.rstrip(".")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return {name: float("inf")}
        if a.numel() == 0 or torch.equal(a, b):
            return {name: 0.0}
        if not a.is_floating_point():
            return {name: float("inf")}
        return {name: float((a.double() - b.double()).abs().max())}
    return {name: 0.0 if a == b else float("inf")}


def nondeterministic_ops(spec, device, steps: int = 3) -> list[str]:
    """What torch says has no deterministic implementation in a few training steps of the
    spec's configuration on `device`: built with `training.deterministic` on, which makes
    such an op warn (`torch.use_deterministic_algorithms(True, warn_only=True)`)."""
    data = synthetic_data(spec["dataset"], spec["batch_size"] * (steps + 1))
    training = timed_training(spec, device, deterministic=True)
    previous = torch.are_deterministic_algorithms_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = engine.build(spec, training, data)
            state = engine.new_state(run)
            for _ in range(steps):
                engine.train_step(run, state)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            engine.set_determinism(previous)
    said = {str(w.message).split(". ")[0] for w in caught if "deterministic" in str(w.message)}
    return sorted(said)
