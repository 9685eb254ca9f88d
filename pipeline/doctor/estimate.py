"""The whole protocol's wall time on this machine, from the measured training steps: every
run of `pipeline.plan` (the tune stage's and the train stage's, an undecided tuned cell with
its pinned values) costs its iterations x batch size x the measured seconds per image of
its configuration and precision, plus the measured setup (build, warm-up, compile) once.
Evaluation, checkpoints and data staging are not in it."""

from ..plan import PINNED, plan


def estimate(params: dict, rows: list[dict], sharing: dict | None, gpus: int) -> dict:
    """Seconds for the protocol: one run at a time on one device (`one_device_seconds`), on
    one GPU with the recommended runs sharing it (`per_gpu_seconds`), and on this machine's
    `gpus` GPUs (`machine_seconds`, runs spread evenly over them, each stage after the
    previous). `unmeasured`: configurations without a figure (their runs are left out)."""
    local = {**params, "storage": {**params["storage"], "remote": None}}
    planned = plan(local, undecided=PINNED)
    per_image, setup = {}, {}
    for row in rows:
        key = (row["dataset"], row["arch"], row["precision"])
        per_image[key] = row["step_seconds"] / row["batch_size"]
        setup[key] = max(0.0, row["setup_seconds"] - row["warmup"] * row["step_seconds"])
    shared, speedup = 1, 1.0
    if sharing and sharing.get("recommended") and gpus:
        shared = sharing["recommended"]
        speedup = next((m["speedup"] or 1.0 for m in sharing["counts"] if m["runs"] == shared), 1.0)
    unmeasured, stages = set(), {}
    for stage, specs in (("tune", planned.tuning), ("train", planned.final)):
        durations = []
        for spec in specs:
            key = (spec["dataset"], spec["arch_key"], spec["training"]["precision"])
            if key not in per_image:
                unmeasured.add(key)
                continue
            steps = spec["schedule"]["iterations"] * spec["batch_size"] * per_image[key]
            durations.append(steps + setup[key])
        total = sum(durations)
        longest = max(durations, default=0.0)
        slots = max(1, gpus) * speedup
        stages[stage] = {
            "runs": len(specs),
            "estimated_runs": len(durations),
            "one_device_seconds": total,
            "per_gpu_seconds": total / speedup,
            # Never less than its longest run, slowed by the runs that share its GPU.
            "machine_seconds": max(total / slots, longest * shared / speedup),
        }
    out = {
        "stages": stages,
        "unmeasured": sorted("/".join(k) for k in unmeasured),
        "gpus": gpus,
        "runs_per_gpu": shared,
        "sharing_speedup": speedup,
    }
    for key in ("one_device_seconds", "per_gpu_seconds", "machine_seconds"):
        out[key] = sum(s[key] for s in stages.values())
    return out


def hours(seconds: float) -> str:
    """`3.2 h` / `4.1 days`: how a person reads a wall time."""
    if seconds >= 3 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"
