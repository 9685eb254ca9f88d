"""The GPU nodes measured, as tables in docs/performance.md, filled from gpu-check reports
only (`python -m pipeline doctor --append-table FILE`): one row per node in the nodes table,
one per node and configuration in the configurations table. Each table follows its marker
comment; the sentence saying that no node was measured goes with the first row."""

import json
from pathlib import Path

from vsgd.files import atomic_write
from vsgd.spec import ConfigError

from .estimate import hours

NODES_MARKER = "<!-- doctor:nodes -->"
CONFIGS_MARKER = "<!-- doctor:configurations -->"
NONE_YET = "No GPU node has been measured yet."


def read_report(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(
            [
                f"--report: {path} does not exist; run `python -m pipeline doctor --gpu-check` "
                "on the node first"
            ]
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError([f"--report: cannot read {path} as JSON ({exc})"]) from None


def append(path: Path, report: dict) -> None:
    """Add the node of `report` to the tables of `path`; a report taken at CPU size has no
    place there (ConfigError), nor a file without the tables' markers."""
    if report.get("size") != "gpu":
        raise ConfigError(
            [
                f"--append-table: the report was taken at {report.get('size', '?').upper()} size "
                "(no CUDA): only a GPU node's figures go into the table"
            ]
        )
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"--append-table: cannot read {path} ({exc.strerror})"]) from None
    lines = text.splitlines()
    missing = [m for m in (NODES_MARKER, CONFIGS_MARKER) if m not in lines]
    if missing:
        raise ConfigError(
            [f"--append-table: {path} has no {' or '.join(missing)} line before its table"]
        )
    lines = _insert(lines, NODES_MARKER, [node_row(report)])
    lines = _insert(lines, CONFIGS_MARKER, configuration_rows(report))
    lines = [line for line in lines if line.strip() != NONE_YET]
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode())


def _insert(lines: list[str], marker: str, rows: list[str]) -> list[str]:
    """`rows` after the last line of the table that follows `marker`."""
    at = lines.index(marker) + 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    return lines[:at] + rows + lines[at:]


def _items(report: dict) -> dict:
    return {item["key"]: item for item in report["items"]}


def node_row(report: dict) -> str:
    items, node = _items(report), report["node"]
    gpus = ", ".join(g["name"] for g in node["gpus"])
    paths = items["optimizer"].get("paths", {})
    rel = " / ".join(
        f"{paths[p]['max_rel']:.1e}" if "max_rel" in paths.get(p, {}) else "-"
        for p in ("single", "default", "fused")
    )
    trips = items["optimizer"].get("bf16_round_trip", {}).values()
    trip = "-" if not trips else "ok" if all(t.get("ok", True) for t in trips) else "FAILED"
    counts = {m["runs"]: m["total_images_per_sec"] for m in items["sharing"].get("counts", [])}
    shared = " / ".join(f"{counts[n]:.0f}" if n in counts else "-" for n in (1, 2, 4))
    resume = items["resume"]
    resumed = (
        "-"
        if "identical" not in resume
        else "yes"
        if resume["identical"]
        else f"no ({resume['max_abs_difference']:.2g})"
    )
    e = report["estimate"]
    estimated = any(s["estimated_runs"] for s in e["stages"].values())
    partial = " (partial)" if e["unmeasured"] else ""
    per_gpu = f"{hours(e['per_gpu_seconds'])}{partial}" if estimated else "-"
    machine = f"{hours(e['machine_seconds'])} on {e['gpus']}{partial}" if estimated else "-"
    cells = [
        report["date"][:10],
        gpus,
        node["driver"] or "-",
        f"{node['torch']} ({node['cuda']})",
        rel,
        trip,
        shared,
        str(items["sharing"].get("recommended") or "-"),
        resumed,
        per_gpu,
        machine,
    ]
    return "| " + " | ".join(cells) + " |"


def _figures(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['images_per_sec']:.0f} / {row['ceiling_images_per_sec']:.0f}"


def _memory(row: dict | None) -> str:
    return "-" if row is None or row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"


def configuration_rows(report: dict) -> list[str]:
    rows = _items(report)["configurations"].get("rows", [])
    gpu = report["node"]["gpus"][0]["name"] if report["node"]["gpus"] else "-"
    by_config: dict = {}
    for r in rows:
        by_config.setdefault((r["dataset"], r["model"], r["batch_size"]), {})[r["precision"]] = r
    out = []
    for (dataset, model, batch), found in by_config.items():
        fp32, bf16 = found.get("fp32"), found.get("bf16")
        synced = sorted({r["host_sync"] for r in found.values() if r["host_sync"]})
        cells = [
            report["date"][:10],
            gpu,
            dataset,
            model,
            str(batch),
            _figures(fp32),
            _figures(bf16),
            f"{_memory(fp32)} / {_memory(bf16)}",
            "; ".join(synced) or "none",
        ]
        out.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return out
