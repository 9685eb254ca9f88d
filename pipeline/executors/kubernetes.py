"""The kubernetes executor: every pending run of the grid as its own `batch/v1` Job, submitted,
adopted and followed here; the cluster's side is `pipeline.k8s`'s (the client and its outage
budget, the preflight, the Jobs as rendered, pods, docs/kubernetes.md).

At most `executor.max_parallel` Jobs are active (every run when a Kueue queue admits them).
One watch on this pipeline's Jobs follows them, resumed from the last resourceVersion after a
reconnect and re-listed after 410 Gone; between watch windows (`progress_interval`) each run's
state and last log line are printed, and a run whose pod cannot start fails past its grace
period (`start_grace`, `unschedulable_limit`), its Job deleted. A run fails only when its Job
says so: an API outage longer than `outage_budget` makes the launcher leave (`Detached`) while
the Jobs run on. Running again adopts this pipeline's Jobs (also one another launcher created a
moment ago: its create answers 409) and replaces failed ones; another pipeline's Job is never
adopted or deleted, even of the same name (that run fails, naming it), and deletions carry the
uid of the Job meant. A finished run's result is fetched from the store and kept only if it
is whole; a damaged one replaces the Job once (`pipeline.k8s.outcomes`).
The stage hears of each run as it goes (`events`): its pod first seen running, the pod's last
log line every `progress_interval`, its outcome.
"""

import sys
from dataclasses import dataclass

import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from vsgd.spec import ConfigError

from ..contract import Detached
from ..k8s.client import (
    SYSTEM_CLOCK,
    TRANSIENT,
    Api,
    KubernetesError,
    api_error,
    quota_refusal,
    retry_after,
)
from ..k8s.cluster import report_stale
from ..k8s.outcomes import RunOutcomes
from ..k8s.pods import Pods
from ..k8s.preflight import preflight
from ..k8s.progress import RunProgress
from ..k8s.render import (
    RUN_HASH_LABEL,
    is_ours,
    load_template,
    managed_selector,
    name_taken,
    render_job,
)
from ..k8s.schema import QUEUE_LABEL, max_parallel, queue_name, settings, template_path
from ..k8s.status import condition
from ..storage import fetch_result
from .base import Executor, RunOutcome


@dataclass
class _Run:
    spec: dict
    job: dict
    submitted_at: float
    uid: str | None = None  # the Job we follow; events of other Jobs are stale
    counts: tuple = ()  # (active, succeeded, failed) last shown
    outcome: RunOutcome | None = None
    created: str = ""  # the Job's creationTimestamp: older events are not ours
    trouble: tuple | None = None  # (kind, since, text) of a pod that does not start
    suspended: bool = False  # held by a queue (spec.suspend)
    started: bool = False  # its pod was seen running (told to `events`)
    retrained: bool = False  # its Job was replaced once because its result was damaged

    @property
    def name(self):
        return self.job["metadata"]["name"]


class KubernetesExecutor(RunProgress, RunOutcomes, Executor):
    """`clock` (monotonic(), sleep()) times the grace periods, the outage budget and every
    wait; the watch windows are the API server's (timeoutSeconds)."""

    def __init__(self, params: dict, *, out=None, fetch=fetch_result, clock=SYSTEM_CLOCK):
        """`fetch(params, spec, directory)` copies a finished run's result into `directory`
        (FileNotFoundError: there is none)."""
        self.params = params
        self.cfg = settings(params)
        self.max_parallel = max_parallel(params)  # None: no limit (a queue admits)
        self.out = out or sys.stdout
        self._fetch = fetch
        self.clock = clock
        self.namespace = None
        self.api = None
        self._checked = False  # the preflight passed

    # -- the Executor protocol ------------------------------------------------------------

    def before_stage(self, stage: str, unfinished: list[dict]) -> None:
        """The preflight (with one of the unfinished runs' Jobs), then the Jobs of an
        earlier grid still running."""
        if unfinished:
            self.preflight(unfinished[0])
        report_stale(self.params, stage)

    def preflight(self, spec: dict) -> None:
        """Check the cluster with `spec`'s Job before the stage does any work (the stage
        calls this first; `run` does it otherwise): ConfigError with every problem found."""
        job = render_job(spec, self.params)
        self.namespace = job["metadata"]["namespace"]
        try:
            self._connect()
        except KubernetesError as exc:
            raise ConfigError([f"kubernetes: {exc}"]) from None
        self._preflight(job)

    def run(self, specs: list[dict]) -> list[RunOutcome]:
        if not specs:
            return []
        template = load_template(template_path(self.params))
        now = self.clock.monotonic()
        runs = [_Run(spec, render_job(spec, self.params, template), now) for spec in specs]
        self.namespace = runs[0].job["metadata"]["namespace"]
        self._runs = {r.spec["run_hash"]: r for r in runs}
        self._queue = []
        try:
            self._connect()
            limit = (
                f"at most {self.max_parallel} at a time"
                if self.max_parallel
                else f"all at once: Kueue queue {queue_name(self.params)} admits them"
            )
            self._say(f"{len(runs)} runs -> Jobs in namespace {self.namespace} ({limit})")
            rv = self._sync(first=True)
            if self._queue and not self._checked:
                self._preflight(self._queue[0].job)
            self._submit_ready()
            while not all(r.outcome for r in runs):
                rv = self._watch(rv)
                self._submit_ready()
                self._progress()
        except KeyboardInterrupt:
            self._leaving("interrupted")
            raise
        except Detached as exc:
            self._leaving(str(exc))
            raise
        except KubernetesError as exc:
            for r in runs:
                if not r.outcome:
                    self._finish(r, False, str(exc))
        return [r.outcome for r in runs]

    def _leaving(self, why):
        active = [r.name for r in self._runs.values() if r.uid and not r.outcome]
        if active:
            self._say(
                f"{why}; {len(active)} Jobs keep running in {self.namespace}: run the "
                f"stage again (`dvc repro`) to adopt them, `python -m pipeline jobs "
                f"list` to see them, `python -m pipeline jobs cancel` to stop them"
            )

    def _connect(self):
        if self.api is None:
            self.api = Api(
                self.cfg["context"],
                outage_budget=self.cfg["outage_budget"],
                say=self._say,
                clock=self.clock,
            )
            self.pods = Pods(self.api, self.namespace, self.cfg["log_tail_lines"])

    def _preflight(self, job):
        preflight(self.api, job, start_grace=self.cfg["start_grace"], say=self._say)
        self._checked = True

    # -- submitting -------------------------------------------------------------------------

    def _sync(self, first=False):
        """List our Jobs: adopt (first time) or catch up (after 410); returns resourceVersion."""
        listing = self.api.call(
            self.api.batch.list_namespaced_job,
            self.namespace,
            label_selector=managed_selector(self.params),
        )
        found = {}  # run hash -> its Job; a live one wins over a failed one being replaced
        for item in listing.items:
            job = self.api.to_dict(item)
            if not is_ours(job, self.params) or job["metadata"].get("deletionTimestamp"):
                continue  # another pipeline's, or going away: submitted anew (after it)
            key = job["metadata"].get("labels", {}).get(RUN_HASH_LABEL)
            if key in self._runs and (key not in found or condition(found[key], "Failed")):
                found[key] = job
        seen = set(found)
        for key, job in found.items():
            run = self._runs[key]
            if run.outcome:
                continue
            if first:
                self._adopt(run, job)
            elif job["metadata"]["uid"] == run.uid:
                self._observe(run, job)
        for run in self._runs.values():
            if first and run.spec["run_hash"] not in seen and not run.outcome:
                self._queue.append(run)
            elif not first and run.uid and not run.outcome and run.spec["run_hash"] not in seen:
                self._vanished(run)
        return listing.metadata.resource_version

    def _adopt(self, run, job):
        failed = condition(job, "Failed")
        if failed:
            # Resubmitting a failed run means "try again": replace the old Job (its pods
            # too: the API's default for Jobs would orphan them). Gone or replaced already
            # (another launcher): the create then adopts what is there.
            self._say(
                f"[{run.name}] replacing Job {job['metadata']['name']} that failed "
                f"before ({failed.get('reason')})"
            )
            self.api.delete_job(job["metadata"]["name"], self.namespace, job["metadata"]["uid"])
            self._queue.append(run)
            return
        run.uid = job["metadata"]["uid"]
        run.created = job["metadata"].get("creationTimestamp") or ""
        self._say(f"[{run.name}] adopting existing Job {job['metadata']['name']}")
        self._observe(run, job)

    def _active(self):
        return sum(1 for r in self._runs.values() if r.uid and not r.outcome)

    def _submit_ready(self):
        active = self._active()
        while self._queue and (self.max_parallel is None or active < self.max_parallel):
            run = self._queue.pop(0)
            created = self._create(run)
            if created is None:
                # A full quota: the next ones would be refused too; this one is tried
                # again first, after the next watch window.
                self._queue.insert(0, run)
                return
            if created:
                active += 1

    def _create(self, run) -> bool | None:
        """Submit the run's Job: True when a Job now runs for it (created or adopted), False
        when the run has ended (failed), None when a full ResourceQuota refused it for now."""
        for attempt in range(3):
            try:
                created = self.api.call(
                    self.api.batch.create_namespaced_job,
                    self.namespace,
                    client.V1Job.from_dict(run.job),
                )
            except ApiException as exc:
                if exc.status == 409:
                    # Created meanwhile (another launcher, or the replaced Job's name still
                    # held while it is deleted): adopt if it is ours and the same run.
                    existing = self.api.read_job(run.name, self.namespace)
                    if existing is not None and not is_ours(existing, self.params):
                        self._finish(run, False, name_taken(existing, self.params))
                        return False
                    if (
                        existing is not None
                        and not condition(existing, "Failed")
                        and not existing["metadata"].get("deletionTimestamp")
                    ):
                        self._adopt(run, existing)
                        return True
                    self.clock.sleep(2**attempt)
                    continue
                quota = quota_refusal(exc)
                if quota and not quota.beyond:
                    # Full because of other work: room comes back when it ends. Waited for
                    # like a pod the quota refuses (FailedCreate), up to start_grace.
                    self._track(run, ("quota", api_error(exc, f"creating Job {run.name}")))
                    return False if run.outcome else None
                self._finish(run, False, api_error(exc, f"creating Job {run.name}"))
                return False
            run.trouble = None
            run.uid = created.metadata.uid
            run.created = self.api.to_dict(created)["metadata"].get("creationTimestamp") or ""
            run.submitted_at = self.clock.monotonic()
            self._say(
                f"[{run.name}] submitted Job {run.name} "
                f"({run.spec['dataset']} {run.spec['arch']} "
                f"{run.spec['optimizer']['name']} seed {run.spec['seed']})"
            )
            return True
        self._finish(
            run,
            False,
            f"Job {run.name} exists and cannot be replaced (being deleted?); run again later",
        )
        return False

    # -- following --------------------------------------------------------------------------

    def _watch(self, rv):
        """One watch window (progress_interval seconds); returns the resourceVersion to
        resume from."""
        window = max(1, int(self.cfg["progress_interval"]))
        outage = self.api.outage
        w = watch.Watch()
        try:
            for event in w.stream(
                self.api.batch.list_namespaced_job,
                self.namespace,
                label_selector=managed_selector(self.params),
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=window,
                _request_timeout=(10, window + 30),
            ):
                job = event["raw_object"]
                rv = job.get("metadata", {}).get("resourceVersion") or rv
                if event["type"] == "BOOKMARK":
                    continue
                run = self._runs.get(job["metadata"].get("labels", {}).get(RUN_HASH_LABEL))
                if run is None or run.outcome or job["metadata"].get("uid") != run.uid:
                    continue
                if event["type"] == "DELETED":
                    self._vanished(run)
                else:
                    self._observe(run, job)
                if all(r.outcome for r in self._runs.values()) or self._queue_has_room():
                    w.stop()
        except ApiException as exc:
            if exc.status == 410:
                outage.ok()
                self._say("watch expired (410 Gone); listing the Jobs again")
                return self._sync()
            if exc.status in TRANSIENT:
                self.api.wait_out(f"watch: {exc.status} {exc.reason}", retry_after(exc) or 2)
                return rv
            raise KubernetesError(api_error(exc, "watching Jobs")) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            left = outage.failed(f"watch connection lost: {type(exc).__name__}")
            self._say(
                f"watch connection lost ({type(exc).__name__}); resuming from resourceVersion {rv}"
            )
            self.clock.sleep(min(2, left))
            return rv
        outage.ok()
        return rv

    def _queue_has_room(self):
        return bool(self._queue) and (
            self.max_parallel is None or self._active() < self.max_parallel
        )

    def _observe(self, run, job):
        # Only the terminal conditions count (pipeline.k8s.status).
        if condition(job, "Complete"):
            self._succeeded(run)
            return
        failed = condition(job, "Failed")
        if failed:
            self._failed(run, failed)
            return
        spec_suspended = bool((job.get("spec") or {}).get("suspend"))
        if spec_suspended != run.suspended:
            run.suspended = spec_suspended
            queue = job["metadata"].get("labels", {}).get(QUEUE_LABEL)
            self._say(
                f"[{run.name}] "
                + (
                    f"queued (suspended until Kueue queue {queue} admits it)"
                    if spec_suspended and queue
                    else "queued (suspended)"
                    if spec_suspended
                    else "admitted (no longer suspended)"
                )
            )
        status = job.get("status") or {}
        counts = (
            status.get("active") or 0,
            status.get("succeeded") or 0,
            status.get("failed") or 0,
        )
        if counts != run.counts:
            if run.counts and counts[2] > run.counts[2]:
                self._say(
                    f"[{run.name}] pod failed ({counts[2]} so far); the Job retries, "
                    f"resuming from the last checkpoint"
                )
            run.counts = counts

    def _finish(self, run, ok, error=None, log_tail=""):
        run.outcome = RunOutcome(run.spec["name"], run.spec["run_hash"], ok, error, log_tail)
        self.events.run_ended(run.outcome)
        if ok:
            minutes = (self.clock.monotonic() - run.submitted_at) / 60
            self._say(f"[{run.name}] done ({minutes:.1f} min), results in {run.spec['output_dir']}")
        else:
            self._say(f"[{run.name}] FAILED: {error}")
            for line in log_tail.splitlines():
                self._say(f"[{run.name}] | {line}")

    # -- progress and runs that cannot start -------------------------------------------------

    def _say(self, text):
        print(f"[k8s] {text}" if not text.startswith("[") else text, file=self.out, flush=True)
