"""What the report reads: the grid's finished runs in `results/runs/` and the published
numbers of `pipeline/reference_results.yaml`."""

import csv
import json
import math
from pathlib import Path

import yaml

from vsgd.outputs import BETA1, CURVE, METRICS, check_result
from vsgd.spec import ConfigError

REFERENCES = Path(__file__).parents[1] / "reference_results.yaml"


def load_runs(runs_dir: Path, params: dict) -> list[dict]:
    """Finished runs (those with metrics.json) of the grid's datasets/archs/optimizers.

    Every one must be whole (`vsgd.outputs.check_result`): a damaged result is refused,
    with what is wrong with it, rather than counted into a table (ConfigError: the train
    stage sets it aside and trains its run again)."""
    damaged = []
    for metrics_path in sorted(runs_dir.glob(f"*/{METRICS}")):
        wrong = check_result(metrics_path.parent)
        if wrong:
            damaged.append(f"{metrics_path.parent}: damaged result: {'; '.join(wrong)}")
    if damaged:
        raise ConfigError(
            damaged
            + [
                "run the train stage (`dvc repro train` or `python -m pipeline train`): it sets "
                "damaged results aside and trains their runs again"
            ]
        )
    runs = []
    for metrics_path in sorted(runs_dir.glob(f"*/{METRICS}")):
        m = json.loads(metrics_path.read_text())
        if (
            m["dataset"] in params["datasets"]
            and m["arch_key"] in params["archs"]
            and m["optimizer"] in params["optimizers"]
        ):
            m["curve"] = read_curve(metrics_path.parent / CURVE)
            m["beta1"] = read_curve(metrics_path.parent / BETA1)  # VSGD runs: [] if none
            runs.append(m)
    return runs


def read_curve(path: Path) -> list[dict]:
    """A run's CSV as rows of numbers (`parse_number`); [] when the file is absent."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: parse_number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_references(path: Path = REFERENCES) -> dict:
    """(dataset, arch_key, optimizer) -> {value, precision, iterations, source}."""
    out = {}
    for src in yaml.safe_load(path.read_text()):
        for arch, values in src["values"].items():
            for opt, value in values.items():
                out[(src["dataset"], arch, opt)] = {
                    "value": value,
                    "precision": src["precision"],
                    "iterations": src["iterations"],
                    "source": " ".join(src["source"].split()),
                }
    return out


def comparable_references(refs: dict, params: dict) -> dict:
    """The published numbers that compare with this grid's runs: the paper's data (not a
    synthetic stand-in) at the iterations the numbers were read at. A scaled-down grid (the
    demo, tiny and ci presets) gets none: its distance to a 30k-iteration number says nothing."""
    return {
        key: ref
        for key, ref in refs.items()
        if params["data"]["source"] == "official"
        and key[0] in params["protocol"]
        and params["protocol"][key[0]]["schedule"]["iterations"] == ref["iterations"]
    }


def parse_number(text):
    """A CSV field as a float; None for an empty field or NaN (nothing measured); any other
    text as it is."""
    if text in ("", None):
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return None if math.isnan(value) else value
