"""The runs the pipeline plans, from params and the tune stage's choice: one function,
`plan`, for every caller (the tune and train stages, validate, gc, the jobs and render-jobs
commands, a run built by hand).

A tuned cell (`pipeline.cells.tuned_cells`) trains the values the tune stage chose; a choice
counts only for the tuning runs it was made among (`load_selection`). Until there is one, the
cell is `undecided`: callers that need the final runs refuse (ConfigError: run the tune stage),
callers that only list them take the cell's pinned values or leave it out.

The tune stage's outputs read here: `results/tuning/selected.yaml` (dataset -> arch ->
optimizer -> the chosen values, null where every point diverged) and `tuning.csv` beside it
(every point, with its run hash). selected.yaml records, in a comment, the sha256 of its
choices and of tuning.csv (`selection_digest`): a pair edited or damaged since the tune stage
wrote it is refused (ConfigError: run the tune stage again), never trained. A pair written
before the digest existed is checked for the rest only.
"""

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vsgd.files import canonical_json
from vsgd.spec import ConfigError

from .cells import resolve_run, tuned_cells
from .grid import expand, tuning_specs

TUNING_DIR = Path("results/tuning")
SELECTED = TUNING_DIR / "selected.yaml"
POINTS = TUNING_DIR / "tuning.csv"
# tuning.csv: the cell, then one column per tuned hyperparameter, then the point's outcome.
CELL_COLUMNS = ("dataset", "arch", "optimizer")
POINT_COLUMNS = ("val_acc", "diverged", "chosen", "iterations", "run", "run_hash")
# selected.yaml's line recording `selection_digest`.
DIGEST_LINE = re.compile(r"^# sha256: ([0-9a-f]{64})\b", re.MULTILINE)
# What `plan` does with an undecided cell's final runs.
REFUSE, PINNED, LEAVE_OUT = "refuse", "pinned", "leave out"


@dataclass
class Plan:
    tuning: list[dict]  # the tune stage's runs
    final: list[dict]  # the train stage's runs
    undecided: list[tuple] = field(default_factory=list)  # tuned cells without a choice

    def stage(self, name: str) -> list[dict]:
        return self.tuning if name == "tune" else self.final


def plan(params: dict, undecided: str = REFUSE, selected: Path = SELECTED) -> Plan:
    """The tune stage's runs and the train stage's; an undecided cell's final runs are
    refused (REFUSE: ConfigError saying to run the tune stage), trained with its pinned
    values (PINNED: for listing the grid) or left out (LEAVE_OUT)."""
    selection = load_selection(params, selected)
    missing = [cell for cell in tuned_cells(params) if cell not in selection]
    if undecided == PINNED:
        selection = {**selection, **{cell: {} for cell in missing}}
    elif undecided == LEAVE_OUT:
        selection = {**selection, **{cell: None for cell in missing}}
    return Plan(tuning_specs(params), expand(params, selection), missing)


def load_selection(params: dict, path: Path = SELECTED) -> dict:
    """(dataset, arch, optimizer) -> chosen values (None: every point diverged), for the
    tuned cells of `params` whose choice in `path` was made on the current grid and tuning
    settings; {} when the file does not exist yet.

    A choice counts only if the tune stage made it among exactly the runs the current params
    give the cell: the run hashes recorded in tuning.csv beside `path` are those of
    `grid.tuning_specs` (they hold every grid point, the budget, the held-out split, the
    seed, the data and the code). A cell whose grid or tuning settings changed since is left
    out: it must be tuned again."""
    try:
        text = Path(path).read_text()
        # Decoded from bytes: read as text, csv's "\r\n" line ends would not be what the
        # digest covers.
        points = Path(path).with_name(POINTS.name).read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return {}
    data = yaml.safe_load(text) or {}
    recorded = DIGEST_LINE.search(text)
    if recorded and recorded[1] != selection_digest(data, points):
        raise ConfigError(
            [
                f"{path}: edited or damaged: its choices and {POINTS.name} beside it are not "
                "what the tune stage wrote (their sha256 differs)",
                "run the tune stage again (`dvc repro tune` or `python -m pipeline tune`)",
            ]
        )
    tuned_on = _tuned_runs(points)
    current: dict = {}
    for spec in tuning_specs(params):
        cell = (spec["dataset"], spec["arch_key"], spec["optimizer"]["name"])
        current.setdefault(cell, set()).add(spec["run_hash"])
    out = {}
    for cell in tuned_cells(params):
        ds, arch, opt = cell
        entry = (
            (data.get(ds) or {}).get(arch, {}).get(opt, "absent")
            if isinstance(data, dict)
            else "absent"
        )
        if entry == "absent" or tuned_on.get(cell) != current.get(cell):
            continue
        grid = resolve_run(params, *cell)["optimizer"]["grid"]
        if entry is None:
            out[cell] = None
        elif (
            isinstance(entry, dict)
            and set(entry) == set(grid)
            and all(any(_same(value, g) for g in grid[key]) for key, value in entry.items())
        ):
            out[cell] = entry
    return out


def selection_digest(choices, points_csv: str) -> str:
    """sha256 of the tune stage's choices (selected.yaml's content, as loaded) and of the
    text of tuning.csv."""
    return hashlib.sha256((canonical_json(choices) + "\n" + points_csv).encode()).hexdigest()


def _tuned_runs(points_csv: str) -> dict:
    """cell -> the run hashes of the points the tune stage chose among (tuning.csv's text); a
    file written before it recorded them gives none, so its choices count as not current."""
    rows = list(csv.DictReader(io.StringIO(points_csv, newline="")))
    out: dict = {}
    for row in rows:
        if row.get("run_hash"):
            cell = tuple(row.get(key) for key in CELL_COLUMNS)
            out.setdefault(cell, set()).add(row["run_hash"])
    return out


def _same(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return (
            isinstance(a, list)
            and isinstance(b, list)
            and len(a) == len(b)
            and all(float(x) == float(y) for x, y in zip(a, b, strict=True))
        )
    return float(a) == float(b)
