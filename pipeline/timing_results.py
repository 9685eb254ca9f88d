"""The timing stage's results, `results/timing/`: `timing.csv` (one row per configuration,
`COLUMNS`) and `timing.json` (the same rows with every round's seconds, and the settings and
device), written by the stage and read back by the aggregate stage (Table 2)."""

import csv
import io
import json
from pathlib import Path

from vsgd.files import atomic_write

COLUMNS = (
    "dataset",
    "arch",
    "model",
    "optimizer",
    "batch_size",
    "seconds_per_step",
    "images_per_sec",
    "ratio_to_sgd",
    "rounds",
    "steps",
    "warmup",
    "device",
    "device_name",
    "precision",
    "torch_version",
)


def write(result: dict, out: Path) -> None:
    """`timing.csv` (COLUMNS) and `timing.json` (everything) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    atomic_write(out / "timing.csv", text.getvalue())
    atomic_write(out / "timing.json", json.dumps(result, indent=2) + "\n")


def load(directory: Path) -> dict | None:
    """What `write` wrote under `directory`; None when it is absent or unreadable."""
    try:
        return json.loads((Path(directory) / "timing.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
