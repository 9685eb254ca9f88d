"""Runs sharing one device: 1, 2, 4 separate processes (`python -m pipeline.doctor.worker`)
of one configuration started together, each timed over the same window after its warm-up;
the total images/s of each count says how many runs a GPU should take at once
(`executor.local.runs_per_gpu`)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_MODULE = "pipeline.doctor.worker"
# A count whose total is within this of the best is as good: the fewest runs that reach it
# are recommended (fewer runs at once: less memory, each run finishes sooner).
AS_GOOD = 0.95


def measure(spec, training, counts, warmup, seconds, deadline, threads=None, log=print) -> dict:
    """`{counts: [{runs, total_images_per_sec, per_run}...], skipped: [...], recommended}`;
    a count is skipped when `deadline` (time.monotonic) leaves less than the last count took
    (scaled by its runs)."""
    measured, skipped, took = [], [], None
    for n in counts:
        left = deadline - time.monotonic()
        if took is not None and left < took * 1.5:
            skipped.append(f"{n} runs: the item's share of the time was spent ({left:.0f} s left)")
            continue
        start = time.monotonic()
        try:
            per_run = _together(spec, training, n, warmup, seconds, left, threads)
        except RuntimeError as exc:
            skipped.append(f"{n} runs: {exc}")
            continue
        took = time.monotonic() - start
        total = sum(r["images_per_sec"] for r in per_run)
        measured.append({"runs": n, "total_images_per_sec": total, "per_run": per_run})
        log(f"  {n} run(s) at once: {total:.1f} img/s in all ({took:.0f} s)")
    out = {"counts": measured, "skipped": skipped, "recommended": None}
    if measured:
        best = max(m["total_images_per_sec"] for m in measured)
        out["recommended"] = min(
            m["runs"] for m in measured if m["total_images_per_sec"] >= AS_GOOD * best
        )
        one = next((m for m in measured if m["runs"] == 1), None)
        for m in measured:
            m["speedup"] = m["total_images_per_sec"] / one["total_images_per_sec"] if one else None
    return out


def _together(spec, training, n, warmup, seconds, timeout, threads) -> list[dict]:
    """`n` workers started at once, timed over one window; each one's figures."""
    with tempfile.TemporaryDirectory(prefix="vsgd-sharing-") as tmp:
        go = Path(tmp) / "go"
        env = dict(os.environ)
        if threads is not None:  # CPU threads per run
            env["OMP_NUM_THREADS"] = str(threads)
        procs = []
        for i in range(n):
            job = {
                "spec": spec,
                "training": training,
                "warmup": warmup,
                "seconds": seconds,
                "ready": str(Path(tmp) / f"ready-{i}"),
                "go": str(go),
            }
            # Output to files: a pipe nobody reads before the window could fill and block it.
            with open(Path(tmp) / f"out-{i}", "w") as out, open(Path(tmp) / f"err-{i}", "w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", WORKER_MODULE, json.dumps(job)],
                        stdout=out,
                        stderr=err,
                        stdin=subprocess.DEVNULL,
                        env=env,
                    )
                )
        try:
            deadline = time.monotonic() + timeout
            while not all((Path(tmp) / f"ready-{i}").exists() for i in range(n)):
                failed = [i for i, p in enumerate(procs) if p.poll() is not None]
                if failed:
                    raise RuntimeError(f"a run failed to start: {_tail(tmp, failed[0])}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the runs were not ready within the item's share")
                time.sleep(0.05)
            go.touch()
            results = []
            for i, proc in enumerate(procs):
                if proc.wait(timeout=max(1.0, deadline - time.monotonic()) + 60) != 0:
                    raise RuntimeError(f"a run failed: {_tail(tmp, i)}")
                out = (Path(tmp) / f"out-{i}").read_text()
                results.append(json.loads(out.strip().splitlines()[-1]))
            return results
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError("the runs did not finish within the item's share") from exc
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _tail(tmp, i) -> str:
    err = (Path(tmp) / f"err-{i}").read_text(errors="replace")
    return (err.strip().splitlines() or ["no output"])[-1]
