"""Finished results: kept by run hash, trusted only when whole, shown per grid, removed only
when asked.

- `results/store/<run_hash>/` (`grid.STORE_DIR`) holds every result finished here or fetched
  from the remote store: `config.json`, `curve.csv`, `beta1.csv` (VSGD), `metrics.json`
  (written last). The pipeline never deletes anything there: a run that leaves the grid
  keeps its result, and when the grid comes back to it nothing is trained.
- A result counts as done only when `vsgd.outputs.check_result` finds it complete and
  well-formed, filed under its own run hash. A damaged one (edited, truncated, half-copied)
  is set aside under `results/damaged/` with a note of what was wrong, never deleted, and
  its run trains again.
- `results/runs/<name>/` (`grid.RESULTS_DIR`) is the view of the current grid: a copy of each
  finished run's files, exactly the grid's runs, which the tables and `dvc metrics` read.
  `show` rebuilds it after every train stage.
- `python -m pipeline gc` (`pipeline.gc`) removes what no run of the current grid uses.
"""

import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vsgd.outputs import check_result, has_result

from .grid import RESULTS_DIR, STORE_DIR
from .runlock import RunLock
from .storage import RESULT_FILES as FILES  # copied where present; metrics.json last
from .storage import open_store

DAMAGED = "damaged"  # beside the store and the view: results/damaged/
REASON = "DAMAGED.txt"  # in each set-aside directory: where it was and what was wrong


def read_metrics(directory) -> dict | None:
    """The metrics.json of `directory` as a dict; None when missing or not a JSON object
    (for listings: whether the result is trustworthy is `problems`)."""
    try:
        value = json.loads((Path(directory) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def problems(directory, run_hash: str) -> list[str]:
    """What is wrong with the finished result in `directory` for run `run_hash` ([]: whole)."""
    return check_result(directory, run_hash)


def is_done(spec: dict) -> bool:
    """The run's result is in the store, complete and well-formed."""
    out = spec["output_dir"]
    return has_result(out) and not problems(out, spec["run_hash"])


def is_shown(spec: dict) -> bool:
    """The current view already shows the run's (whole) result."""
    entry = Path(RESULTS_DIR) / spec["name"]
    return has_result(entry) and not problems(entry, spec["run_hash"])


def set_aside(
    directory, what: list[str], label: str | None = None, source: str | None = None
) -> Path:
    """Move a damaged result out of the way, into `<results>/damaged/<label>-<time>/` (label:
    the directory's name), with a note of where it came from and what was wrong; returns
    where it went. Nothing is deleted."""
    directory = Path(directory)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = directory.parent.parent / DAMAGED / f"{label or directory.name}-{stamp}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(directory, aside)
    (aside / REASON).write_text(
        f"set aside from {source or directory} at {stamp}:\n" + "".join(f"- {p}\n" for p in what)
    )
    return aside


@dataclass
class Survey:
    """What a stage finds for each run before it starts any: each run's state and every
    damaged result it set aside on the way (`damaged`: (what, where it went, problems))."""

    state: dict = field(default_factory=dict)  # name -> done | reused | pending | held
    damaged: list = field(default_factory=list)
    holders: dict = field(default_factory=dict)  # name -> who holds a held run

    def names(self, state: str) -> list[str]:
        return [name for name, s in self.state.items() if s == state]


def survey(specs: list[dict], view: bool, fetch=None) -> Survey:
    """Each run's state: `done` (in the store and, with `view`, shown), `reused` (in the
    store or fetched by `fetch(spec, directory)` from elsewhere, not yet shown), `held` (a
    process holds its lock: another launcher trains it now) or `pending`. Every count adds
    up to the grid. A damaged result in the store, the view or a fetch is set aside (under
    the run's lock, never one another launcher holds) and its run is pending."""
    found = Survey()
    for spec in specs:
        lock = RunLock.of(spec)
        if not lock.try_acquire():
            found.state[spec["name"]] = "held"
            found.holders[spec["name"]] = lock.holder()
            continue
        with lock:
            stored = _check_stored(spec, found)
            shown = view and _check_shown(spec, found)
            if not stored and shown:
                # A view written by an older version may hold the only copy.
                _publish_copy(Path(RESULTS_DIR) / spec["name"], Path(spec["output_dir"]))
                stored = True
            if not stored and fetch is not None:
                stored, damage = fetch_checked(spec, fetch)
                found.damaged += [damage] if damage else []
        found.state[spec["name"]] = (
            "done" if stored and (shown or not view) else "reused" if stored else "pending"
        )
    return found


def _check_stored(spec: dict, found: Survey) -> bool:
    out = Path(spec["output_dir"])
    if not has_result(out):
        return False
    wrong = problems(out, spec["run_hash"])
    if wrong:
        found.damaged.append((f"{out} ({spec['name']})", set_aside(out, wrong), wrong))
        return False
    return True


def _check_shown(spec: dict, found: Survey) -> bool:
    entry = Path(RESULTS_DIR) / spec["name"]
    if not has_result(entry):
        return False
    wrong = problems(entry, spec["run_hash"])
    if wrong:
        found.damaged.append((str(entry), set_aside(entry, wrong), wrong))
        return False
    return True


def fetch_checked(spec: dict, fetch) -> tuple[bool, tuple | None]:
    """Fetch a result from elsewhere (`fetch(spec, directory)` copies it there and says from
    where; None: there is none) into a temporary directory beside the store, and keep it in
    the store only if it is whole. Returns whether it was kept and, for a damaged one (set
    aside too; its source is left alone), (what, where it went, what was wrong)."""
    out = Path(spec["output_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{spec['run_hash']}-", dir=out.parent))
    try:
        source = fetch(spec, tmp)
        if source is None:
            return False, None
        wrong = problems(tmp, spec["run_hash"])
        if wrong:
            aside = set_aside(tmp, wrong, label=f"{spec['run_hash']}-fetched", source=source)
            return False, (f"{source} ({spec['name']})", aside, wrong)
        _publish_copy(tmp, out)
        return True, None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_published(results_uri: str, spec: dict, endpoint_url: str | None = None) -> bool:
    """Copy the run's whole result from `results_uri` (the remote store) into its
    `output_dir`; False when there is none there, or it is damaged (left where it is, with a
    warning: the run trains again and publishes over it)."""
    store = open_store(results_uri.rstrip("/"), endpoint_url)
    if not store.exists("metrics.json"):
        return False
    out = Path(spec["output_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp:
        for name in FILES:
            if store.exists(name):
                store.get_file(name, Path(tmp) / name)
        wrong = problems(tmp, spec["run_hash"])
        if wrong:
            print(
                f"{results_uri} holds a damaged result ({'; '.join(wrong)}): training the "
                "run again",
                flush=True,
            )
            return False
        _publish_copy(Path(tmp), out)
    return True


@dataclass
class Shown:
    runs: int  # finished runs of the grid in the view
    hidden: list  # view entries of runs that left the grid (their results stay stored)


def show(specs: list[dict]) -> Shown:
    """Make `results/runs/` show exactly the whole finished runs of `specs`.

    An entry whose run left the grid is taken out of the view; its result stays in the
    store. One whose result is not in the store (a view written by an older version of
    the pipeline) is moved into the store first, so nothing finished is ever lost; a
    damaged one is set aside.
    """
    view = Path(RESULTS_DIR)
    view.mkdir(parents=True, exist_ok=True)
    names = {s["name"] for s in specs}
    hidden = []
    for entry in sorted(view.iterdir()):
        if entry.name in names or not entry.is_dir() or entry.name.startswith("."):
            continue
        hidden.append(entry.name)
        _retire(entry)
    shown = 0
    for spec in specs:
        if not is_done(spec):
            continue
        shown += 1
        if not is_shown(spec):
            _publish_copy(Path(spec["output_dir"]), view / spec["name"])
    return Shown(shown, hidden)


def _retire(entry: Path) -> None:
    """Take a view entry whose run left the grid out of the view, its result safe in the
    store: it is a copy of a whole stored result (removed), the only whole copy (moved into
    the store), or damaged (set aside). One without a result is a partial copy (removed)."""
    if not has_result(entry):
        shutil.rmtree(entry)
        return
    run_hash = (read_metrics(entry) or {}).get("run_hash")
    kept = Path(STORE_DIR) / str(run_hash)
    wrong = (
        problems(entry, run_hash) if isinstance(run_hash, str) else ["metrics.json: no run_hash"]
    )
    if isinstance(run_hash, str) and has_result(kept) and not problems(kept, run_hash):
        shutil.rmtree(entry)
    elif not wrong:
        if has_result(kept):
            set_aside(kept, problems(kept, run_hash))
        _publish_copy(entry, kept)
        shutil.rmtree(entry)
    else:
        set_aside(entry, wrong)


def _publish_copy(src: Path, dest: Path) -> None:
    """Copy a result directory so that `dest` is the old one or the complete new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name in FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if dest.exists():
            # Whatever else a store directory holds (the executor's spec.json, a partial
            # log) goes along, in the copy that replaces it.
            for extra in dest.iterdir():
                if extra.is_file() and not (tmp / extra.name).exists():
                    shutil.copy2(extra, tmp / extra.name)
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
