"""`python -m pipeline doctor --gpu-check`: a bounded acceptance of this node.

Items in order, each given a share of the time left (its weight among the items still to
come, so an item that finishes early leaves its time to the next) and skipped with a note
when there is none; an item that runs out of its share mid-way says what it did not get to:

1. the CUDA tests (`pytest -m gpu`, a subprocess, where the working tree has `tests/`);
2. VSGD's single-tensor, multi-tensor and fused paths against the float64 CPU reference,
   and bfloat16 parameters with float32 state through a state-dict round trip;
3. every configuration of the protocol: the training step's images/s against the bare
   forward + backward + step, strict fp32 then bf16, peak memory;
4. no host sync in the training step (CUDA's sync debug mode, from 3's runs);
5. ConvMixer-256/8 on CIFAR-100 as 1, 2 and 4 runs sharing the GPU (`runs_per_gpu`);
6. a compiled run stopped by SIGTERM and resumed in a new process with an empty compile
   cache, against an uninterrupted one;
7. the protocol's estimated wall time, from 3 and 5.

Without CUDA the same items run at CPU size (`CPU`: one configuration, tiny batches, a few
steps, no compilation) and each says what it skipped; the whole sequence takes well under
two minutes on two cores.
"""

import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import load_params
from ..step_timing import timed_training
from . import cuda_probe, estimate, optim_check, resume_check, sharing, throughput
from .facts import cuda_works, package_versions, python_facts
from .markdown import render

DEFAULT_LIMIT = 480.0  # seconds: 8 minutes on one H100
JSON_NAME, MD_NAME = "gpu-check.json", "gpu-check.md"
MIN_SHARE = 1.0  # seconds: an item given less is skipped
SHARING_CONFIG = ("cifar100", "convmixer")


@dataclass(frozen=True)
class Sizes:
    """What each item does on a device: `configurations` None measures every one of the
    protocol, `batch` None is the protocol's batch size."""

    device: str
    configurations: tuple | None
    batch: int | None
    warmup: int
    steps: int
    optim_shapes: tuple
    optim_steps: int
    fused: bool
    sharing_counts: tuple
    sharing_seconds: float
    resume_iterations: int
    resume_stop_at: int
    resume_batch: int | None
    resume_compile: bool
    resume_images: tuple  # (train, test)


GPU = Sizes(
    device="gpu",
    configurations=None,
    batch=None,
    warmup=10,
    steps=30,
    optim_shapes=((64, 32), (7,), (3, 3, 5, 5), (300_000,)),
    optim_steps=300,
    fused=True,
    sharing_counts=(1, 2, 4),
    sharing_seconds=10.0,
    resume_iterations=60,
    resume_stop_at=20,
    resume_batch=None,
    resume_compile=True,
    resume_images=(2048, 256),
)
CPU = Sizes(
    device="cpu",
    configurations=(SHARING_CONFIG,),
    batch=2,
    warmup=1,
    steps=1,
    optim_shapes=((16, 8), (7,), (4, 2, 3, 3), (3000,)),
    optim_steps=30,
    fused=False,
    sharing_counts=(1, 2),
    sharing_seconds=0.5,
    resume_iterations=6,
    resume_stop_at=2,
    resume_batch=2,
    resume_compile=False,
    resume_images=(32, 8),
)


class Check:
    """One gpu-check: params, the device and its sizes, the clock, what items found."""

    def __init__(self, params, device, sizes: Sizes, log):
        self.params, self.device, self.sizes, self.log = params, device, sizes, log
        self.rows = []  # the configurations' figures (item 3), for the estimate
        self.deadline = 0.0

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _tests(check: Check) -> dict:
    if check.device.type != "cuda":
        return {"status": "skipped", "notes": ["no CUDA: every test marked gpu would skip"]}
    if not Path("tests").is_dir():
        return {"status": "skipped", "notes": ["no tests here (tests/ is not in this tree)"]}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=check.left())
    except subprocess.TimeoutExpired:
        return {"status": "incomplete", "notes": ["pytest -m gpu did not finish in its share"]}
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    check.log(f"  {summary}")
    # 5: nothing collected (no test marked gpu), not a failure of the node.
    return {
        "status": "passed" if proc.returncode in (0, 5) else "failed",
        "summary": summary,
        "command": " ".join(cmd[1:]),
    }


def _optim(check: Check) -> dict:
    s = check.sizes
    paths = optim_check.compare_paths(
        check.device, s.optim_shapes, s.optim_steps, fused=s.fused, log=check.log
    )
    bf16 = optim_check.bf16_round_trip(check.device, s.optim_shapes, fused=s.fused)
    ran = [r for r in (*paths.values(), *bf16.values()) if "skipped" not in r]
    notes = [f"{name}: {r['skipped']}" for name, r in paths.items() if "skipped" in r]
    return {
        "status": "passed" if all(r["ok"] for r in ran) else "failed",
        "paths": paths,
        "bf16_round_trip": bf16,
        "steps": s.optim_steps,
        "tolerance": optim_check.TOLERANCE,
        "notes": notes,
    }


def _configurations(check: Check) -> dict:
    s, params = check.sizes, check.params
    wanted = [(ds, arch) for ds in params["datasets"] for arch in params["archs"]]
    precisions = [params["training"]["precision"]]
    precisions += [p for p in ("fp32", "bf16") if p not in precisions]
    skipped, failed, longest = {}, [], 0.0  # skipped: why -> what
    for precision in precisions:  # the protocol's precision for every configuration first
        for ds, arch in wanted:
            name = f"{ds}/{arch}/{precision}"
            if s.configurations is not None and (ds, arch) not in s.configurations:
                skipped.setdefault("not run at CPU size", []).append(name)
                continue
            if check.left() < max(MIN_SHARE, 1.2 * longest):
                skipped.setdefault("the item's share of the time was spent", []).append(name)
                continue
            start = time.monotonic()
            spec = throughput.configuration_spec(params, ds, arch, s.batch)
            try:
                row = throughput.measure(
                    spec, precision, check.device, s.warmup, s.steps, check.log
                )
            except Exception as exc:  # noqa: BLE001 - out of memory, say: the others still run
                failed.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                check.log(f"  {failed[-1]}")
                continue
            finally:
                longest = max(longest, time.monotonic() - start)
            check.rows.append(row)
    return {
        "status": "failed" if failed else "passed" if check.rows else "skipped",
        "errors": failed,
        "rows": check.rows,
        "warmup": s.warmup,
        "steps": s.steps,
        "notes": [f"{why}: {', '.join(names)}" for why, names in skipped.items()],
    }


def _host_sync(check: Check) -> dict:
    if check.device.type != "cuda":
        return {"status": "skipped", "notes": ["CUDA only: a CPU step has no device to wait for"]}
    if not check.rows:
        return {"status": "skipped", "notes": ["no configuration was measured"]}
    synced = {
        f"{r['dataset']}/{r['arch']}/{r['precision']}": r["host_sync"]
        for r in check.rows
        if r["host_sync"]
    }
    return {
        "status": "failed" if synced else "passed",
        "synced": synced,
        "checked": len(check.rows),
        "steps": throughput.SYNC_CHECK_STEPS,
    }


def _sharing(check: Check) -> dict:
    s, params = check.sizes, check.params
    throughput.release(check.device)  # the runs' processes get the whole GPU
    spec = throughput.configuration_spec(params, *SHARING_CONFIG, s.batch)
    training = timed_training(spec, check.device, precision=params["training"]["precision"])
    # At CPU size one thread per run: the figures say nothing about a GPU, and two threads
    # per run on a busy two-core machine spin for a core another process holds.
    threads = None if check.device.type == "cuda" else 1
    found = sharing.measure(
        spec,
        training,
        s.sharing_counts,
        s.warmup,
        s.sharing_seconds,
        check.deadline,
        threads,
        check.log,
    )
    notes = list(found["skipped"])
    if check.device.type != "cuda":
        notes.append("on the CPU the runs share its cores: runs_per_gpu is a GPU setting")
        found["recommended"] = None
    notes += [
        f"{n} runs: not run at CPU size" for n in GPU.sharing_counts if n not in s.sharing_counts
    ]
    return {
        "status": "passed" if found["counts"] else "skipped",
        **found,
        "notes": notes,
        "configuration": "/".join(SHARING_CONFIG),
        "batch_size": spec["batch_size"],
    }


def _resume(check: Check) -> dict:
    s = check.sizes
    throughput.release(check.device)
    work = Path(tempfile.mkdtemp(prefix="vsgd-doctor-resume-"))
    try:
        found = resume_check.check(
            check.params,
            check.device,
            iterations=s.resume_iterations,
            stop_at=s.resume_stop_at,
            batch=s.resume_batch,
            compile_=s.resume_compile,
            train_images=s.resume_images[0],
            test_images=s.resume_images[1],
            work=work,
            deadline=check.deadline,
            log=check.log,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not s.resume_compile:
        found.setdefault("notes", []).append(
            "not compiled at CPU size (compiling costs ~50 s on a CPU); batch "
            f"{s.resume_batch}, not the paper's"
        )
    return found


ITEMS = (  # (key, title, weight of the time budget, function)
    ("tests", "CUDA tests (pytest -m gpu)", 0.15, _tests),
    ("optimizer", "VSGD paths vs float64, bf16 state round trip", 0.07, _optim),
    ("configurations", "training step vs ceiling, every configuration", 0.38, _configurations),
    ("host_sync", "no host sync in the training step", 0.0, _host_sync),
    ("sharing", "runs sharing a GPU (runs_per_gpu)", 0.15, _sharing),
    ("resume", "SIGTERM, resume with an empty compile cache", 0.25, _resume),
)


def run_check(params_path, overrides, limit: float, out: Path, log=None) -> dict:
    """Every item within `limit` seconds; the report (also written to `out`)."""
    log = log or (lambda text: print(text, flush=True))
    params = load_params(params_path, overrides)
    cuda = cuda_probe.probe_cuda()
    on_gpu = cuda_works(cuda)
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    sizes = GPU if on_gpu else CPU
    check = Check(params, device, sizes, log)
    log(
        f"gpu-check on {device} ({cuda['gpus'][0]['name'] if on_gpu else 'no CUDA: CPU size'})"
        f", at most {limit:.0f} s"
    )
    start = time.monotonic()
    items, weight_left = [], sum(w for _, _, w, _ in ITEMS)
    for number, (key, title, weight, function) in enumerate(ITEMS, 1):
        left = limit - (time.monotonic() - start)
        share = left * weight / weight_left if weight_left else left
        weight_left -= weight
        item = {"key": key, "title": title, "size": sizes.device}
        if weight and share < MIN_SHARE:
            item.update(status="skipped", notes=[f"the time limit ({limit:g} s) was spent"])
            items.append(item)
            log(f"[{number}/{len(ITEMS)}] {title}: skipped, the time limit was spent")
            continue
        log(f"[{number}/{len(ITEMS)}] {title}" + (f" (up to {share:.0f} s)" if weight else ""))
        check.deadline = time.monotonic() + share
        began = time.monotonic()
        try:
            item.update(function(check))
        except Exception as exc:  # noqa: BLE001 - an item's failure is a finding; the rest run
            item.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        item["seconds"] = round(time.monotonic() - began, 1)
        item.setdefault("notes", [])
        log(
            f"  -> {item['status']} in {item['seconds']:.0f} s"
            + "".join(f"\n     note: {n}" for n in item["notes"])
            + (f"\n     error: {item['error']}" if "error" in item else "")
        )
        items.append(item)
    by_key = {item["key"]: item for item in items}
    protocol = estimate.estimate(
        params,
        check.rows,
        by_key["sharing"] if by_key["sharing"].get("counts") else None,
        len(cuda["gpus"]) if on_gpu else 0,
    )
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "size": sizes.device,
        "limit_seconds": limit,
        "seconds": round(time.monotonic() - start, 1),
        "passed": all(item["status"] != "failed" for item in items),
        "node": {**_node(cuda), "python": python_facts(), "packages": package_versions()},
        "sizes": asdict(sizes),
        "items": items,
        "estimate": protocol,
    }
    write(report, out)
    log(
        f"gpu-check: {'passed' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s "
        f"-> {out / JSON_NAME}, {out / MD_NAME}"
    )
    return report


def _node(cuda: dict) -> dict:
    return {
        "gpus": [{k: g[k] for k in ("name", "memory_gib", "capability")} for g in cuda["gpus"]],
        "driver": cuda["driver"],
        "torch": cuda["torch"],
        "cuda": cuda["built_cuda"],
        "cudnn": cuda["cudnn"],
        "cuda_error": cuda["error"],
    }


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / MD_NAME).write_text(render(report))
