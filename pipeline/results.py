"""Finished results: kept by run hash, shown per grid, removed only when asked.

- `results/store/<run_hash>/` (`grid.STORE_DIR`) holds every result finished here or fetched
  from the remote store: `config.json`, `curve.csv`, `metrics.json` (written last; with the
  run's hash it marks the run as done). The pipeline never deletes anything there: a run that
  leaves the grid keeps its result, and when the grid comes back to it nothing is trained.
- `results/runs/<name>/` (`grid.RESULTS_DIR`) is the view of the current grid: a copy of each
  finished run's files, exactly the grid's runs, which the tables and `dvc metrics` read.
  `show` rebuilds it after every train stage.
- `python -m pipeline gc` removes what no run of the current grid uses (results in the
  store, local checkpoints; with `--remote` also those under `storage.remote`) and lists
  every item it removes; `--dry-run` only lists them.
"""

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .grid import CHECKPOINT_DIR, RESULTS_DIR, STORE_DIR
from .storage import RESULT_FILES as FILES  # copied where present; metrics.json last


def read_metrics(directory) -> dict | None:
    try:
        return json.loads((Path(directory) / "metrics.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def is_done(spec: dict) -> bool:
    """The run's result is in the store (its metrics.json names the run's hash)."""
    metrics = read_metrics(spec["output_dir"])
    return metrics is not None and metrics.get("run_hash") == spec["run_hash"]


def is_shown(spec: dict) -> bool:
    """The current view already shows the run's result."""
    metrics = read_metrics(Path(RESULTS_DIR) / spec["name"])
    return metrics is not None and metrics.get("run_hash") == spec["run_hash"]


@dataclass
class Shown:
    runs: int           # finished runs of the grid in the view
    hidden: list        # view entries of runs that left the grid (their results stay stored)


def show(specs: list[dict]) -> Shown:
    """Make `results/runs/` show exactly the finished runs of `specs`.

    An entry whose run left the grid is taken out of the view; its result stays in the
    store. One whose result is not in the store (a view written by an older version of
    the pipeline) is moved into the store first, so nothing finished is ever lost.
    """
    view = Path(RESULTS_DIR)
    view.mkdir(parents=True, exist_ok=True)
    names = {s["name"] for s in specs}
    hidden = []
    for entry in sorted(view.iterdir()):
        if entry.name in names or not entry.is_dir():
            continue
        metrics = read_metrics(entry)
        if metrics and metrics.get("run_hash"):
            kept = Path(STORE_DIR) / metrics["run_hash"]
            if read_metrics(kept) is None:
                _publish_copy(entry, kept)
        shutil.rmtree(entry)
        hidden.append(entry.name)
    shown = 0
    for spec in specs:
        if not is_done(spec):
            continue
        shown += 1
        if not is_shown(spec):
            _publish_copy(Path(spec["output_dir"]), view / spec["name"])
    return Shown(shown, hidden)


def _publish_copy(src: Path, dest: Path) -> None:
    """Copy a result directory so that `dest` is the old one or the complete new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name in FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# python -m pipeline gc


def add_arguments(parser):
    from .config import add_params_arguments
    add_params_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be removed, remove nothing")
    parser.add_argument("--remote", action="store_true",
                        help="also remove results and checkpoints under storage.remote that "
                             "no run of this grid uses (the remote may be shared: only with "
                             "this flag)")


def run(args) -> int:
    """Remove the results and checkpoints that no run of the current grid uses."""
    from .config import load_params
    from .execute import check_prepared
    from .tune import planned_runs
    params = load_params(args.params, args.set, build_imported=False)
    # Run hashes include the data's checksum: without it every result would look unused.
    check_prepared(params, "gc")
    tuning, final = planned_runs(params)  # the final runs need the tune stage's choice
    used = {s["run_hash"] for s in tuning + final}
    verb = "would remove" if args.dry_run else "removed"
    removed = 0
    for kind, root in (("result", Path(STORE_DIR)), ("checkpoint", Path(CHECKPOINT_DIR))):
        for entry in sorted(root.iterdir()) if root.is_dir() else ():
            if entry.name.startswith(".") or entry.name in used:
                continue
            metrics = read_metrics(entry) or {}
            what = f" ({metrics['name']}, test_acc {metrics['test_acc']:.4f})" \
                if "name" in metrics and metrics.get("test_acc") is not None else ""
            print(f"gc: {verb} {kind} {entry}{what}")
            if not args.dry_run:
                shutil.rmtree(entry)
            removed += 1
    if args.remote:
        removed += _gc_remote(params, used, args.dry_run, verb)
    print(f"gc: {verb} {removed} item{'s' if removed != 1 else ''}; the grid's "
          f"{len(final)} runs and {len(tuning)} tuning runs kept", file=sys.stderr)
    return 0


def _gc_remote(params, used: set, dry_run: bool, verb: str) -> int:
    from vsgd.spec import ConfigError

    from .storage import open_store
    remote = params["storage"]["remote"]
    if not remote:
        raise ConfigError(["gc --remote: storage.remote is null; allowed: s3://bucket/prefix"])
    store = open_store(remote, params["storage"]["endpoint_url"])
    removed = 0
    for prefix in ("results", "checkpoints"):
        by_run: dict[str, list[str]] = {}
        for key in store.list_keys(f"{prefix}/"):
            parts = key.split("/")
            if len(parts) >= 3:
                by_run.setdefault(parts[1], []).append(key)
        for run_hash, keys in sorted(by_run.items()):
            if run_hash in used:
                continue
            print(f"gc: {verb} {remote.rstrip('/')}/{prefix}/{run_hash}/ ({len(keys)} objects)")
            if not dry_run:
                for key in keys:
                    store.delete(key)
            removed += 1
    return removed
