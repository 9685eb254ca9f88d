"""`python -m pipeline jobs list|cancel`: this pipeline's Kubernetes Jobs.

    python -m pipeline jobs list [--stale]           # every Job of this pipeline, its state
    python -m pipeline jobs cancel --stale           # stop the Jobs of an earlier grid
    python -m pipeline jobs cancel NAME [NAME ...]   # stop these Jobs
    python -m pipeline jobs cancel --all             # stop every Job of this pipeline

"This pipeline" is the store and owner of params.yaml (`pipeline.k8s.render.ownership`); Jobs
of other pipelines in the namespace are never listed or touched: `cancel NAME` of one is
refused (exit 78, saying whose it is) and nothing is cancelled. A Job is *stale* when its run is
not in the current grid (the tune stage's runs and the final runs of params.yaml): it was
started for an earlier grid and still uses GPUs. The stages report stale Jobs that are still
running but never cancel them: only `cancel` does, and only when asked. A cancelled Job's pods
get SIGTERM and save a checkpoint at the step they reached (deleted with propagationPolicy
Background: its pods go too, which the API's default for Jobs would leave behind).
"""

import sys

from vsgd.spec import ConfigError

from ..config import add_params_arguments, load_params
from .cluster import Cluster, run_name
from .render import (
    grid_specs,
    why_not_ours,
)
from .status import state

# -- the command ----------------------------------------------------------------------------


def add_arguments(parser):
    sub = parser.add_subparsers(
        dest="action", metavar="<action>", required=True, help="list or cancel"
    )
    for action, text in (
        ("list", "list this pipeline's Jobs"),
        ("cancel", "delete Jobs (their pods save a checkpoint and stop)"),
    ):
        p = sub.add_parser(action, help=text)
        add_params_arguments(p)
        p.add_argument(
            "--stale", action="store_true", help="only Jobs whose run is not in the current grid"
        )
        if action == "cancel":
            p.add_argument("--all", action="store_true", help="every Job of this pipeline")
            p.add_argument("names", nargs="*", metavar="NAME", help="Jobs to cancel")


def run(args) -> int:
    params = load_params(args.params, args.set, build_imported=False)
    if not params["storage"]["remote"]:
        raise ConfigError(
            [
                "storage.remote: Jobs belong to a pipeline by its s3:// remote; "
                "set the one the Jobs were submitted with"
            ]
        )
    if args.action == "cancel":
        chosen = sum(bool(x) for x in (args.stale, args.all, args.names))
        if chosen != 1:
            raise ConfigError(
                ["jobs cancel: say which Jobs: --stale, --all or their names (exactly one of them)"]
            )
    cluster = Cluster(params)
    jobs = cluster.jobs()
    grid, complete = grid_specs(params)
    stale = {j["metadata"]["name"] for j in cluster.stale(jobs, grid)}
    if not complete and (args.stale):
        print(
            "note: the tune stage has not chosen yet (results/tuning/selected.yaml), so the "
            "final runs are unknown and their Jobs count as stale",
            file=sys.stderr,
        )
    if args.action == "list":
        shown = [j for j in jobs if not args.stale or j["metadata"]["name"] in stale]
        print(f"{'NAME':<63}  {'STATE':<8}  {'GRID':<7}  RUN")
        for job in shown:
            name = job["metadata"]["name"]
            print(
                f"{name:<63}  {state(job):<8}  {'stale' if name in stale else 'current':<7}  "
                f"{run_name(job)}"
            )
        print(
            f"{len(shown)} Jobs in namespace {cluster.namespace}"
            + (f" ({len(stale)} stale)" if not args.stale else "")
        )
        return 0
    ours = {j["metadata"]["name"]: j for j in jobs}
    if args.names:
        # All or nothing: a name that is not this pipeline's may be a typo for one that is.
        refused = [_refusal(cluster, params, n) for n in args.names if n not in ours]
        if refused:
            raise ConfigError(refused + ["jobs cancel: nothing was cancelled"])
        names = list(dict.fromkeys(args.names))
    else:
        names = [n for n in ours if args.all or n in stale]
    cancelled = 0
    for name in names:
        if cluster.cancel(ours[name]):
            cancelled += 1
            print(f"cancelled {name} ({state(ours[name])}, {run_name(ours[name])})")
        else:
            print(
                f"{name}: gone or replaced since it was listed; left alone (see `python -m "
                f"pipeline jobs list`)",
                file=sys.stderr,
            )
    print(f"{cancelled} Jobs cancelled in namespace {cluster.namespace}")
    return 0


def _refusal(cluster: Cluster, params: dict, name: str) -> str:
    """Why `jobs cancel NAME` will not delete that Job."""
    job = cluster.job(name)
    if job is None:
        return (
            f"jobs cancel: {name}: no Job of that name in namespace {cluster.namespace}; "
            f"`python -m pipeline jobs list` shows this pipeline's"
        )
    why = why_not_ours(job, params) or "it was created after the Jobs were listed (run again)"
    return (
        f"jobs cancel: {name}: not a Job of this pipeline: {why}; it was left alone "
        f"(only the pipeline that submitted it may cancel it)"
    )
