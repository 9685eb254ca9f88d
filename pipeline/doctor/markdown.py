"""`gpu-check.md`: the gpu-check's report for a person, from its JSON."""

from .estimate import hours


def _num(value, digits=1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render(report: dict) -> str:
    node = report["node"]
    gpus = (
        ", ".join(
            f"{g['name']} ({g['memory_gib']:.0f} GiB, cc {g['capability']})" for g in node["gpus"]
        )
        or f"none ({node['cuda_error']})"
    )
    lines = [
        f"# gpu-check, {report['date']}",
        "",
        f"- result: **{'passed' if report['passed'] else 'FAILED'}** in {report['seconds']:.0f} s "
        f"(limit {report['limit_seconds']:.0f} s), at {report['size'].upper()} size",
        f"- GPUs: {gpus}",
        f"- driver {node['driver'] or 'none'}, torch {node['torch']} (CUDA {node['cuda']}, "
        f"cuDNN {node['cudnn']}), Python {node['python']['version']}, "
        f"{node['python']['cpu_count']} CPUs",
        "",
        "| item | status | size | seconds | notes |",
        "|---|---|---|---:|---|",
    ]
    for item in report["items"]:
        notes = "; ".join(
            item.get("notes", [])
            + item.get("errors", [])
            + ([item["error"]] if "error" in item else [])
        )
        lines.append(
            f"| {item['title']} | {item['status']} | {item['size']} | "
            f"{_num(item.get('seconds'), 0)} | {notes.replace('|', '/')} |"
        )
    items = {item["key"]: item for item in report["items"]}
    lines += _optimizer(items["optimizer"]) + _configurations(items["configurations"])
    lines += _sharing(items["sharing"]) + _resume(items["resume"])
    lines += _estimate(report["estimate"], report["size"])
    return "\n".join(lines) + "\n"


def _optimizer(item) -> list[str]:
    if "paths" not in item:
        return []
    lines = [
        "",
        f"## VSGD paths ({item['steps']} steps, float32 vs the float64 CPU reference)",
        "",
        "| path | max abs difference | max rel difference | bf16 round trip |",
        "|---|---:|---:|---|",
    ]
    for name, r in item["paths"].items():
        trip = item["bf16_round_trip"][name]
        trip_text = trip.get("skipped") or ("ok" if trip["ok"] else f"FAILED: {trip['detail']}")
        if "skipped" in r:
            lines.append(f"| {name} | skipped | | {trip_text} |")
        else:
            lines.append(f"| {name} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {trip_text} |")
    return lines


def _configurations(item) -> list[str]:
    rows = item.get("rows") or []
    if not rows:
        return []
    lines = [
        "",
        f"## Training step vs ceiling ({item['warmup']} warm-up, {item['steps']} timed "
        "steps; VSGD)",
        "",
        "| dataset | model | precision | batch | compiled | step img/s | ceiling img/s | "
        "step / ceiling | peak MiB | host sync |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sync = (
            "-"
            if r["host_sync"] is None and r["peak_memory_mib"] is None
            else (r["host_sync"] or "none")
        )
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['precision']} | {r['batch_size']} | "
            f"{'yes' if r['compiled'] else 'no'} | {r['images_per_sec']:.1f} | "
            f"{r['ceiling_images_per_sec']:.1f} | {r['ratio_to_ceiling']:.2f} | "
            f"{_num(r['peak_memory_mib'], 0)} | {sync} |"
        )
    return lines


def _sharing(item) -> list[str]:
    counts = item.get("counts") or []
    if not counts:
        return []
    lines = [
        "",
        f"## Runs sharing one device ({item['configuration']}, batch {item['batch_size']})",
        "",
        "| runs | total img/s | x one run |",
        "|---:|---:|---:|",
    ]
    for m in counts:
        lines.append(f"| {m['runs']} | {m['total_images_per_sec']:.1f} | {_num(m['speedup'], 2)} |")
    if item.get("recommended"):
        lines += [
            "",
            f"Recommended `executor.local.runs_per_gpu: {item['recommended']}` (the "
            "fewest runs within 5% of the best total).",
        ]
    return lines


def _resume(item) -> list[str]:
    if "identical" not in item:
        return []
    lines = [
        "",
        "## SIGTERM and resume",
        "",
        f"{item['run']}: {item['iterations']} steps at batch {item['batch_size']}, "
        f"compiled: {item['compiled']}; {item['stopped']}. Resumed in a new process with an "
        f"empty compile cache against an uninterrupted run: "
        f"**{'identical' if item['identical'] else 'different'}** (largest difference "
        f"{item['max_abs_difference']:.3g}).",
    ]
    if item.get("metrics_that_differ"):
        lines.append(f"Metrics that differ: {', '.join(item['metrics_that_differ'])}.")
    if item.get("nondeterministic_ops"):
        lines.append(
            "Ops without a deterministic implementation in the training step: "
            + "; ".join(item["nondeterministic_ops"])
            + "."
        )
    return lines


def _estimate(e: dict, size: str) -> list[str]:
    lines = ["", "## The protocol's wall time (estimate)", ""]
    if not any(s["estimated_runs"] for s in e["stages"].values()):
        return lines + ["No configuration was measured: no estimate."]
    for stage, s in e["stages"].items():
        lines.append(
            f"- {stage}: {s['estimated_runs']} of {s['runs']} runs estimated, "
            f"{hours(s['one_device_seconds'])} one run at a time on one device"
        )
    if size == "cpu":
        lines.append(
            f"- on this CPU, one run at a time: **{hours(e['one_device_seconds'])}** "
            "(extrapolated per image from the CPU-size batch)"
        )
    else:
        lines.append(
            f"- per GPU ({e['runs_per_gpu']} run(s) at once): "
            f"**{hours(e['per_gpu_seconds'])}**; on this machine's {e['gpus']} GPU(s): "
            f"**{hours(e['machine_seconds'])}**"
        )
    if e["unmeasured"]:
        lines.append(f"- left out (not measured): {', '.join(e['unmeasured'])}")
    lines.append(
        "- training steps and one setup (build, warm-up, compile) per run; evaluation, "
        "checkpoints and data staging are not in it"
    )
    return lines
