"""Run a list of specs as a stage: skip what is finished, run the rest through the executor,
say what happened.

The tune and train stages both go through `run_stage`. A run is finished when its whole
result is in the local store (`pipeline.results`) or, with `storage.remote`, in the remote
store (fetched then, checked, not retrained). A diverged run is finished too. A damaged result
is set aside and its run trained again. A run that another launcher holds (its run lock on
this machine) is left to it and waited for. Interrupted runs resume from their checkpoints at
the next call; failed runs are reported with the tail of their logs. While the executor runs,
the stage shows its progress as a whole (`pipeline.stage_progress`).
"""

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from vsgd.spec import ConfigError
from vsgd.tracking import tracking_uri
from vsgd.tracking_store import ensure_tracking_store

from . import estimate, results
from .contract import Detached
from .executors import Executor, get_executor, write_spec
from .executors.base import RunEvents
from .grid import STORE_DIR, data_checksum
from .runlock import LOCKS_DIR
from .stage_progress import StageProgress
from .storage import fetch_result, find_result, push_dataset


@dataclass
class StageReport:
    total: int
    pending: int
    failed: list  # names of runs that failed (not finished)


def check_prepared(params: dict, stage: str) -> None:
    """Every dataset of the grid is prepared (run hashes include its checksum)."""
    unprepared = [
        ds
        for ds in params["datasets"]
        if data_checksum(f"{params['data']['root']}/prepared/{ds}") is None
    ]
    if unprepared:
        raise ConfigError(
            [
                f"{stage}: no prepared data for {', '.join(unprepared)}; run "
                "`dvc repro` (its prepare stage) or `python -m pipeline "
                f"prepare {unprepared[0]}` first"
            ]
        )


def run_stage(params: dict, specs: list[dict], stage: str, view: bool = False) -> StageReport:
    """Run every spec without a whole finished result. With `view`, `results/runs/` is made
    to show exactly `specs` (the train stage's grid) and the count says which results were
    already shown ("done") and which came back from the store ("reused"). Damaged results
    are set aside and their runs trained again; a run another launcher is training is left
    to it and waited for, after the others (`pipeline.runlock`, `pipeline.lease`)."""
    check_prepared(params, stage)
    executor = get_executor(params)
    # Before any lookup, upload or run: what would fail every run is said at once.
    executor.before_stage(stage, [s for s in specs if not results.is_done(s)])
    fetch = _remote_fetcher(params) if params["storage"]["remote"] else None
    with view_lock():
        found = results.survey(specs, view, fetch)
        hidden = results.show(specs).hidden if view else []
    for what, aside, wrong in found.damaged:
        print(
            f"{stage}: damaged result {what}: {'; '.join(wrong)}; set aside in {aside}, "
            "the run trains again",
            file=sys.stderr,
            flush=True,
        )
    held = found.names("held")
    # Held runs last: their launcher may well finish them while we train the others.
    pending = sorted(
        (s for s in specs if found.state[s["name"]] in ("pending", "held")),
        key=lambda s: found.state[s["name"]] == "held",
    )
    done, reused = len(found.names("done")), len(found.names("reused"))
    print(
        f"{stage}: {len(specs)} runs in the grid, {done} done, {reused} reused, "
        f"{len(pending)} to run"
        + (f" ({len(found.damaged)} damaged results set aside)" if found.damaged else "")
        + (
            f"; {len(hidden)} left the grid (results kept in results/store, "
            "`python -m pipeline gc` removes them)"
            if hidden
            else ""
        ),
        flush=True,
    )
    if held:
        print(
            f"{stage}: {len(held)} of them being trained by another launcher "
            f"({found.holders[held[0]]}{' and others' if len(held) > 1 else ''}): "
            "waited for after the others, and trained here only if that launcher stops "
            "without finishing them",
            flush=True,
        )
    if pending:
        # How long the runs take here, before any starts (measured step times, cached).
        print(estimate.stage_line(params, pending, stage, executor.max_parallel), flush=True)
    for spec in pending:
        if not held or spec["name"] not in held:
            write_spec(spec)
    _push_datasets(params, pending)
    if pending:
        _init_tracking(params)
    try:
        with _progress_shown(executor, stage, pending, done + reused):
            outcomes = executor.run(pending)
    except (KeyboardInterrupt, SystemExit):
        # Say what is kept: results in the store count as done, whatever the run's exit.
        kept = sum(results.is_done(s) for s in pending)
        _show(specs, view)
        print(
            f"{stage}: interrupted; {kept} of {len(pending)} runs finished and kept, "
            f"{len(pending) - kept} to run; run again to continue (interrupted runs "
            f"resume from their last checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        raise
    except Detached as exc:
        kept = sum(results.is_done(s) for s in pending)
        _show(specs, view)
        print(
            f"{stage}: the launcher stopped following the runs: {exc}. {kept} of "
            f"{len(pending)} runs finished and kept; the others keep running in the "
            f"cluster, and running the stage again (`dvc repro`) adopts them",
            file=sys.stderr,
            flush=True,
        )
        raise
    _show(specs, view)
    # What counts is a whole result in the store, here and at the next `dvc repro`: a run
    # killed while exiting, after its result was written, is done; one that ended well
    # without a whole result is not (the next survey sets a damaged one aside).
    by_name = {s["name"]: s for s in pending}
    failed = [o for o in outcomes if not results.is_done(by_name[o.name])]
    for o in failed:
        if o.ok:
            out = by_name[o.name]["output_dir"]
            wrong = "; ".join(results.problems(out, o.run_hash))
            o.error = f"ended as finished, but {out} holds no whole result: {wrong}"
        print(
            f"\nFAILED {o.name}: {o.error}\n--- last lines of its log ---\n{o.log_tail}\n---",
            file=sys.stderr,
        )
    if failed:
        print(
            f"{stage}: {len(failed)} of {len(pending)} runs failed: "
            f"{', '.join(o.name for o in failed)}; finished runs are kept, run again "
            f"to retry the rest",
            file=sys.stderr,
        )
    return StageReport(len(specs), len(pending), [o.name for o in failed])


@contextmanager
def _progress_shown(executor: Executor, stage: str, pending: list[dict], done_before: int):
    """The stage's progress while `executor` runs `pending`: it hears the executor's events,
    and the executor prints through it (each line kept whole next to the progress line)."""
    out = executor.out
    progress = StageProgress(
        stage,
        pending,
        done_before=done_before,
        slots=lambda: executor.max_parallel,
        out=out or sys.stdout,
    )
    executor.events, executor.out = progress, progress.stream
    try:
        yield progress
    finally:
        progress.close()
        executor.events, executor.out = RunEvents(), out


def view_lock() -> FileLock:
    """Held while `results/runs/` is rebuilt: two stages on one workspace take turns."""
    path = Path(STORE_DIR) / LOCKS_DIR / "view.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path, thread_local=False)


def _show(specs: list[dict], view: bool) -> None:
    if view:
        with view_lock():
            results.show(specs)


def _remote_fetcher(params):
    """With a remote store, a run finished on any machine (a pod, another laptop) is done:
    `fetch(spec, directory)` copies its result there (to be checked) and says from where;
    None when there is none."""

    def fetch(spec: dict, directory) -> str | None:
        found = find_result(params, spec)  # looks the result up once
        if found is None:
            return None
        fetch_result(params, spec, directory, result=found)
        return found.location if found.source == "store" else f"MLflow run {found.location}"

    return fetch


def _push_datasets(params, specs) -> None:
    """Runs that share no disk with us stage their data from the DVC remote: upload what
    is missing there (as `dvc push` would) before any run starts."""
    remote = params["storage"]["remote"]
    if not remote:
        return
    for data_dir in sorted({s["data"]["dir"] for s in specs}):
        push_dataset(data_dir, remote, params["storage"]["endpoint_url"])


def _init_tracking(params):
    """Create the tracking store and experiment once, before parallel runs (and another
    stage starting at the same moment) would all race to run its schema migrations."""
    uri = tracking_uri(params["tracking"]["uri"])
    # A server creates its own schema; an unreachable one must not hold up the stage (the
    # runs carry on untracked, and say so).
    if uri is not None and uri.startswith("sqlite:"):
        ensure_tracking_store(uri, params["tracking"]["experiment"])
