"""The timing stage's results, `results/timing/`: `timing.csv` (one row per configuration,
`COLUMNS`) and `timing.json` (the same rows with every round's seconds, and the settings and
device), written by the stage and read back by the aggregate stage (Table 2).

timing.json records the sha256 of its own content (`DIGEST`), and `load` refuses one whose
content is not what was written, or that is not a timing result at all (ConfigError: run the
timing stage again), rather than printing its numbers or quietly leaving Table 2 out. A file
written before the digest existed is checked for its form only."""

import csv
import io
import json
import math
from pathlib import Path

from vsgd.files import atomic_write, json_sha256
from vsgd.spec import ConfigError

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
DIGEST = "sha256"  # timing.json: the sha256 of its canonical JSON with this key left out
AGAIN = "run the timing stage again (`dvc repro timing` or `python -m pipeline timing`)"


def write(result: dict, out: Path) -> None:
    """`timing.csv` (COLUMNS) and `timing.json` (everything) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    atomic_write(out / "timing.csv", text.getvalue())
    sealed = {**result, DIGEST: json_sha256(result)}
    atomic_write(out / "timing.json", json.dumps(sealed, indent=2) + "\n")


def load(directory: Path) -> dict | None:
    """What `write` wrote under `directory` (without its digest); None when there is none.
    ConfigError when it is there but damaged."""
    path = Path(directory) / "timing.json"
    try:
        result = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError([f"{path}: damaged: not readable JSON ({exc})", AGAIN]) from None
    wrong = problems(result)
    if wrong:
        raise ConfigError([f"{path}: damaged: {w}" for w in wrong] + [AGAIN])
    result.pop(DIGEST, None)
    return result


def problems(result) -> list[str]:
    """What is wrong with a timing.json's content ([]: whole)."""
    if not isinstance(result, dict):
        return [f"expected a JSON object, got {type(result).__name__}"]
    recorded = result.get(DIGEST)
    if recorded is not None and recorded != json_sha256(
        {k: v for k, v in result.items() if k != DIGEST}
    ):
        return ["its content is not what was written (its sha256 differs)"]
    rows = result.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return ["rows is not a list of objects"]
    wrong = []
    for i, row in enumerate(rows):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            wrong.append(f"rows[{i}] lacks {', '.join(missing)}")
            continue
        for key in ("seconds_per_step", "images_per_sec", "ratio_to_sgd"):
            value = row[key]
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                wrong.append(f"rows[{i}].{key} {value!r} is not null or a finite number > 0")
    return wrong
