"""Run a list of specs as a stage: skip what is finished, run the rest through the executor,
say what happened.

The tune and train stages both go through `run_stage`. A run is finished when its result is
in the local store (`pipeline.results`) or, with `storage.remote`, in the remote store
(fetched then, not retrained). A diverged run is finished too. Interrupted runs resume from
their checkpoints at the next call; failed runs are reported with the tail of their logs.
"""

import sys
from dataclasses import dataclass

from vsgd.spec import ConfigError

from . import results


@dataclass
class StageReport:
    total: int
    pending: int
    failed: list     # names of runs that failed (not finished)


def check_prepared(params: dict, stage: str) -> None:
    """Every dataset of the grid is prepared (run hashes include its checksum)."""
    from .grid import data_checksum
    unprepared = [ds for ds in params["datasets"]
                  if data_checksum(f"{params['data']['root']}/prepared/{ds}") is None]
    if unprepared:
        raise ConfigError([f"{stage}: no prepared data for {', '.join(unprepared)}; run "
                           "`dvc repro` (its prepare stage) or `python -m pipeline "
                           f"prepare {unprepared[0]}` first"])


def run_stage(params: dict, specs: list[dict], stage: str, view: bool = False) -> StageReport:
    """Run every spec without a finished result. With `view`, `results/runs/` is made to
    show exactly `specs` (the train stage's grid) and the count says which results were
    already shown ("done") and which came back from the store ("reused")."""
    from .executors import Detached, get_executor, write_spec
    check_prepared(params, stage)
    executor = get_executor(params)
    unfinished = [s for s in specs if not results.is_done(s)]
    if hasattr(executor, "preflight") and unfinished:
        # Before any lookup, upload or run: what would fail every run is said at once.
        executor.preflight(unfinished[0])
    if params["executor"]["kind"] == "kubernetes":
        from .jobs import report_stale
        report_stale(params, stage)
    shown = {s["name"] for s in specs if view and results.is_shown(s)}
    pending = [s for s in specs if not (results.is_done(s) or _fetch_remote_result(params, s))]
    done = len(shown) if view else len(specs) - len(pending)
    hidden = results.show(specs).hidden if view else []
    print(f"{stage}: {len(specs)} runs in the grid, {done} done, "
          f"{len(specs) - len(pending) - done} reused, {len(pending)} to run"
          + (f"; {len(hidden)} left the grid (results kept in results/store, "
             "`python -m pipeline gc` removes them)" if hidden else ""), flush=True)
    for spec in pending:
        write_spec(spec)
    _push_datasets(params, pending)
    if pending:
        _init_tracking(params)
    try:
        outcomes = executor.run(pending)
    except (KeyboardInterrupt, SystemExit):
        # Say what is kept: results in the store count as done, whatever the run's exit.
        kept = sum(results.is_done(s) for s in pending)
        if view:
            results.show(specs)
        print(f"{stage}: interrupted; {kept} of {len(pending)} runs finished and kept, "
              f"{len(pending) - kept} to run; run again to continue (interrupted runs "
              f"resume from their last checkpoint)", file=sys.stderr, flush=True)
        raise
    except Detached as exc:
        kept = sum(results.is_done(s) for s in pending)
        if view:
            results.show(specs)
        print(f"{stage}: the launcher stopped following the runs: {exc}. {kept} of "
              f"{len(pending)} runs finished and kept; the others keep running in the "
              f"cluster, and running the stage again (`dvc repro`) adopts them",
              file=sys.stderr, flush=True)
        raise
    if view:
        results.show(specs)
    # A run killed while exiting, after its result was written, is done (its metrics.json
    # is what counts, here and at the next `dvc repro`).
    by_name = {s["name"]: s for s in pending}
    failed = [o for o in outcomes if not o.ok and not results.is_done(by_name[o.name])]
    for o in failed:
        print(f"\nFAILED {o.name}: {o.error}\n--- last lines of its log ---\n"
              f"{o.log_tail}\n---", file=sys.stderr)
    if failed:
        print(f"{stage}: {len(failed)} of {len(pending)} runs failed: "
              f"{', '.join(o.name for o in failed)}; finished runs are kept, run again "
              f"to retry the rest", file=sys.stderr)
    return StageReport(len(specs), len(pending), [o.name for o in failed])


def _fetch_remote_result(params, spec) -> bool:
    """With a remote store, a run finished on any machine (a pod, another laptop) is done:
    its result is copied into the local store instead of training again."""
    if not params["storage"]["remote"]:
        return False
    from .storage import fetch_result
    try:
        fetch_result(params, spec)  # looks the result up once, then copies it
    except FileNotFoundError:  # no finished result anywhere
        return False
    return results.is_done(spec)


def _push_datasets(params, specs) -> None:
    """Runs that share no disk with us stage their data from the DVC remote: upload what
    is missing there (as `dvc push` would) before any run starts."""
    remote = params["storage"]["remote"]
    if not remote:
        return
    from .storage import push_dataset
    for data_dir in sorted({s["data"]["dir"] for s in specs}):
        push_dataset(data_dir, remote, params["storage"]["endpoint_url"])


def _init_tracking(params):
    """Create the SQLite tracking store and experiment once, before parallel runs would all
    race to run its schema migrations."""
    from vsgd.tracking import tracking_uri
    uri = tracking_uri(params["tracking"]["uri"])
    if uri is None or not uri.startswith("sqlite:"):
        return
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    name = params["tracking"]["experiment"]
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name)
