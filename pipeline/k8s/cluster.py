"""This pipeline's Kubernetes Jobs in its namespace (`Cluster`: list, the stale ones, read,
cancel), and the stages' report of Jobs of an earlier grid still running (`report_stale`).

"This pipeline" is the store and owner of params.yaml (`pipeline.k8s.render.ownership`); Jobs
of other pipelines in the namespace are never listed or touched. A Job is *stale* when its run
is not in the current grid (the tune stage's runs and the final runs of params.yaml).
"""

import sys

from .client import Api
from .render import (
    RUN_HASH_LABEL,
    RUN_NAME_ANNOTATION,
    grid_specs,
    is_ours,
    job_namespace,
    managed_selector,
)
from .schema import settings
from .status import finished

LIST_TIMEOUT = (5, 20)  # the stages' stale-Job check must not hold them up


class Cluster:
    """This pipeline's Jobs in its namespace."""

    def __init__(self, params: dict, request_timeout=None):
        self.params = params
        self.namespace = job_namespace(params)
        self.api = Api(settings(params)["context"], request_timeout=request_timeout)

    def jobs(self) -> list[dict]:
        listing = self.api.call(
            self.api.batch.list_namespaced_job,
            self.namespace,
            label_selector=managed_selector(self.params),
        )
        jobs = [self.api.to_dict(j) for j in listing.items]
        return sorted(
            (j for j in jobs if is_ours(j, self.params)), key=lambda j: j["metadata"]["name"]
        )

    def stale(self, jobs: list[dict], grid: list[dict]) -> list[dict]:
        current = {s["run_hash"] for s in grid}
        return [j for j in jobs if run_hash_of(j) not in current]

    def job(self, name: str) -> dict | None:
        """The Job of that name in the namespace, whoever's it is; None if there is none."""
        return self.api.read_job(name, self.namespace)

    def cancel(self, job: dict) -> bool:
        """Delete the Job with its pods, only if it is still the Job that was listed (its
        uid). False when it is gone or was replaced."""
        return self.api.delete_job(job["metadata"]["name"], self.namespace, job["metadata"]["uid"])


def run_hash_of(job):
    return (job["metadata"].get("labels") or {}).get(RUN_HASH_LABEL)


def report_stale(params: dict, stage: str) -> None:
    """Say which Jobs of an earlier grid still run (never touch them); a cluster that cannot
    be asked is noted, not an error: the executor deals with it."""
    try:
        cluster = Cluster(params, request_timeout=LIST_TIMEOUT)
        jobs = cluster.jobs()
    except Exception as exc:  # noqa: BLE001 - a check before the stage, not the stage
        print(
            f"{stage}: could not look for Jobs of an earlier grid ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
            file=sys.stderr,
            flush=True,
        )
        return
    grid, complete = grid_specs(params)
    if not complete:
        # Without the final runs, a final run's Job would look stale: only tuning Jobs are
        # judged.
        jobs = [j for j in jobs if run_name(j).startswith("tune-")]
    stale = [j for j in cluster.stale(jobs, grid) if not finished(j)]
    if stale:
        names = ", ".join(j["metadata"]["name"] for j in stale[:5])
        more = f" and {len(stale) - 5} more" if len(stale) > 5 else ""
        print(
            f"{stage}: {len(stale)} Jobs of an earlier grid are still running in namespace "
            f"{cluster.namespace} (their runs are not in this grid): {names}{more}; "
            f"`python -m pipeline jobs list --stale` lists them, `python -m pipeline jobs "
            f"cancel --stale` stops them (they are left alone otherwise)",
            file=sys.stderr,
            flush=True,
        )


def run_name(job):
    return (job["metadata"].get("annotations") or {}).get(RUN_NAME_ANNOTATION) or ""
