"""Table 2: seconds per training iteration, as the paper measures it and fair to every
optimizer."""

from .cells import label, rows_of
from .table import DASH, Table, TableFile, tex_escape

PAPER_DEVICE = "GeForce RTX 2080 Ti"


def build_table2(cells, params, timing: dict | None = None) -> TableFile:
    """`table2.{md,tex,csv}`.

    First what the timing stage measured (`timing`: its timing.json; every configuration of
    the grid in one process on one device, interleaved): (a) each optimizer's seconds per
    step as a multiple of SGD's on the same dataset and architecture, then (b) the seconds
    per step themselves, with the device. Then (c) the grid's runs' own time per training
    step (`seconds_per_iter`), each on whatever device it ran on, which compares across
    optimizers only as far as those devices and their load were alike. Without a timing
    measurement, (a) and (b) say so and (c) is all there is.
    """
    opts = params["optimizers"]
    precision = params["training"]["precision"]
    head = ["dataset", "architecture", "batch"] + [label(o) for o in opts]
    tex_head = ["Dataset", "Architecture", "Batch"] + [tex_escape(label(o)) for o in opts]
    # The text columns left-aligned, the optimizers' centred.
    ratios = Table(head, [], "lll" + "c" * len(opts), tex_head)
    timed_seconds = Table(
        head + ["device"], [], "lll" + "c" * len(opts) + "l", tex_head + ["Device"]
    )
    run_seconds = Table(head + ["device"], [], timed_seconds.align, tex_head + ["Device"])
    records = []
    measured = {
        (r["dataset"], r["arch"], r["optimizer"]): r for r in (timing or {}).get("rows", [])
    }
    for ds, arch in rows_of(params):
        row_cells = [cells[(ds, arch, o)] for o in opts]
        timed = [measured.get((ds, arch, o)) for o in opts]
        model = label(row_cells[0]["model"])
        batch = str(params["protocol"][ds]["batch_size"][arch])
        timed_batch = "/".join(sorted({str(t["batch_size"]) for t in timed if t}, key=int)) or batch
        ratios.rows.append(
            [label(ds), model, timed_batch]
            + [
                DASH if t is None or t["ratio_to_sgd"] is None else f"{t['ratio_to_sgd']:.2f}"
                for t in timed
            ]
        )
        timed_seconds.rows.append(
            [label(ds), model, timed_batch]
            + [
                DASH if t is None else step_text(t["seconds_per_step"], t["images_per_sec"])
                for t in timed
            ]
            + [", ".join(sorted({t["device_name"] for t in timed if t})) or DASH]
        )
        run_seconds.rows.append(
            [label(ds), model, batch]
            + [
                DASH
                if c["seconds_per_iter"] is None
                else step_text(c["seconds_per_iter"], c["images_per_sec"])
                for c in row_cells
            ]
            + [", ".join(sorted({d for c in row_cells for d in c["devices"]})) or DASH]
        )
        for o, c, t in zip(opts, row_cells, timed):
            records.append(
                {
                    "dataset": ds,
                    "arch": arch,
                    "model": c["model"],
                    "optimizer": o,
                    "batch_size": int(batch),
                    "ratio_to_sgd": t["ratio_to_sgd"] if t else None,
                    "timing_seconds_per_step": t["seconds_per_step"] if t else None,
                    "timing_batch_size": t["batch_size"] if t else None,
                    "timing_device": f"{t['device_name']} ({t['device']})" if t else None,
                    "n": c["n"],
                    "seconds_per_iter": c["seconds_per_iter"],
                    "images_per_sec": c["images_per_sec"],
                    "device": ";".join(c["devices"]),
                    "precision": precision,
                }
            )
    markdown = [
        "# Table 2: seconds per training iteration",
        "The training step alone (batch, forward, backward, optimizer step), precision "
        f"{precision} (`training.precision` of the runs). The paper measured on a "
        f"{PAPER_DEVICE}. Absolute times depend on the device, so the ratios to SGD, "
        "measured side by side on one device, come first.",
        "## (a) Relative to SGD (timing stage)",
    ]
    latex = [
        f"% Table 2: seconds per training iteration; precision {precision}; the paper "
        f"measured on a {PAPER_DEVICE}."
    ]
    if timing:
        where = f"{timing['device_name']} ({timing['device']})"
        own = timing.get("precision")
        markdown += [
            "Seconds per step divided by SGD's on the same dataset and architecture. "
            f"Measured by the timing stage (`results/timing/timing.csv`) on {where}, "
            "every configuration in one process, interleaved: "
            f"{timing['rounds']} round(s) of {timing['steps']} timed steps after "
            f"{timing['warmup']} warm-up steps each, the median over rounds; torch "
            f"{timing['torch_version']}, precision {own}"
            + (f" (the runs: {precision})" if own and own != precision else "")
            + ".",
            ratios,
            "## (b) Seconds per step (timing stage)",
            f"Median seconds per step (images/s in parentheses) on {where}.",
            timed_seconds,
        ]
        latex += [
            f"% (a) relative to SGD, timing stage on {where}",
            ratios,
            f"% (b) seconds per step (images/s), timing stage on {where}",
            timed_seconds,
        ]
    else:
        markdown += [
            "No timing measurement: `results/timing/timing.json` was not found. "
            "`python -m pipeline timing` (or `dvc repro timing`) measures every "
            "configuration in one process on one device; until then there are only the "
            "runs' own times below, which may come from different devices."
        ]
        latex += ["% (a), (b): no timing measurement (results/timing/timing.json not found)"]
    markdown += [
        "## (c) Seconds per iteration of the grid's runs",
        "Each cell: the mean over its reported runs of the run's own time per training "
        "step (`seconds_per_iter` in its metrics.json: the step alone, without evaluation, "
        "logging and checkpoints; images/s in parentheses), on the device each run used. "
        "Runs on different devices, or sharing one, compare poorly with each other.",
        run_seconds,
    ]
    latex += [
        "% (c) seconds per iteration (images/s) of the grid's runs, each on its device",
        run_seconds,
    ]
    return TableFile("table2", markdown, latex, records)


def step_text(seconds: float, images_per_sec: float) -> str:
    """Seconds per step with the images per second in parentheses."""
    return f"{seconds:.4f} ({images_per_sec:.0f})"
