"""`python -m pipeline gc`: remove the results and checkpoints that no run of the current grid
uses, saying what it removes.

`--dry-run` only lists them. `--remote` also removes them under `storage.remote`, which other
pipelines may share: only with the flag, and only `results/<run_hash>/` and
`checkpoints/<run_hash>/` prefixes (never the datasets under `dvc/`, never anything else).
Whatever a run still holds is kept, whoever runs it: a run's files on this machine while a
process holds its run lock (`pipeline.runlock`; gc holds it itself while it deletes, so no
run starts in between), and a remote run's while its lease is live (`pipeline.lease`).
Damaged results set aside under `results/damaged/` are the user's to look at: gc leaves them.
"""

import shutil
import sys
from pathlib import Path

from vsgd.spec import ConfigError

from . import lease
from .config import add_params_arguments, load_params
from .execute import check_prepared
from .grid import CHECKPOINT_DIR, STORE_DIR
from .plan import plan
from .results import read_metrics
from .runlock import RunLock, lock_path
from .storage import open_store, results_uri


def add_arguments(parser):
    add_params_arguments(parser)
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    parser.add_argument(
        "--remote",
        action="store_true",
        help="also remove results and checkpoints under storage.remote that "
        "no run of this grid uses (the remote may be shared: only with "
        "this flag)",
    )


def run(args) -> int:
    """Remove the results and checkpoints that no run of the current grid uses."""
    params = load_params(args.params, args.set, build_imported=False)
    # Run hashes include the data's checksum: without it every result would look unused.
    check_prepared(params, "gc")
    planned = plan(params)  # the final runs need the tune stage's choice
    tuning, final = planned.tuning, planned.final
    used = {s["run_hash"] for s in tuning + final}
    verb = "would remove" if args.dry_run else "removed"
    removed = kept = 0
    for kind, root in (("result", Path(STORE_DIR)), ("checkpoint", Path(CHECKPOINT_DIR))):
        for entry in sorted(root.iterdir()) if root.is_dir() else ():
            if entry.name.startswith(".") or entry.name in used:
                continue
            lock = RunLock(lock_path(Path(STORE_DIR) / entry.name, entry.name))
            if not lock.try_acquire():
                print(f"gc: kept {kind} {entry}: its run is in progress ({lock.holder()})")
                kept += 1
                continue
            with lock:
                print(f"gc: {verb} {kind} {entry}{_described(entry)}")
                if not args.dry_run:
                    shutil.rmtree(entry)
            removed += 1
    if args.remote:
        r, k = _gc_remote(params, used, args.dry_run, verb)
        removed, kept = removed + r, kept + k
    print(
        f"gc: {verb} {removed} item{'s' if removed != 1 else ''}"
        + (f", kept {kept} that a running run holds" if kept else "")
        + f"; the grid's {len(final)} runs and {len(tuning)} tuning runs kept",
        file=sys.stderr,
    )
    return 0


def _described(entry: Path) -> str:
    metrics = read_metrics(entry) or {}
    acc = metrics.get("test_acc")
    if "name" in metrics and isinstance(acc, (int, float)) and not isinstance(acc, bool):
        return f" ({metrics['name']}, test_acc {acc:.4f})"
    return ""


def _gc_remote(params, used: set, dry_run: bool, verb: str) -> tuple[int, int]:
    remote = params["storage"]["remote"]
    if not remote:
        raise ConfigError(["gc --remote: storage.remote is null; allowed: s3://bucket/prefix"])
    endpoint = params["storage"]["endpoint_url"]
    store = open_store(remote, endpoint)
    removed = kept = 0
    for prefix in ("results", "checkpoints"):
        by_run: dict[str, list[str]] = {}
        for key in store.list_keys(f"{prefix}/"):
            parts = key.split("/")
            if len(parts) >= 3:
                by_run.setdefault(parts[1], []).append(key)
        for run_hash, keys in sorted(by_run.items()):
            if run_hash in used:
                continue
            where = f"{remote.rstrip('/')}/{prefix}/{run_hash}/"
            holder = lease.holder(results_uri(remote, run_hash), endpoint)
            if holder is not None:
                print(f"gc: kept {where}: its run is in progress ({holder})")
                kept += 1
                continue
            print(f"gc: {verb} {where} ({len(keys)} objects)")
            if not dry_run:
                for key in keys:
                    store.delete(key)
            removed += 1
    return removed, kept
