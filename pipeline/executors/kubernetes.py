"""The kubernetes executor: every pending run of the grid as its own `batch/v1` Job.

The Jobs are exactly what `python -m pipeline render-jobs` writes: pipeline/templates/
job-template.yaml plus params.yaml's `executor.kubernetes` settings (docs/kubernetes.md).

Before the first Job is submitted, a preflight checks what can be checked cheaply and reports
every problem at once, before any GPU is used: a server-side dry-run of one Job (the
namespace, admission, the schema), the ServiceAccount, Secrets (image pull secrets too) and
ConfigMap the Job refers to, and the launcher's rights (SelfSubjectAccessReview of
`pipeline.k8s_access.ACCESS`). A ResourceQuota that refuses the dry-run is a configuration
error only when one Job alone exceeds it; one that is full because of what runs now is
said and waited for (each run for up to `start_grace`).

Then it submits the runs (at most `executor.max_parallel` Jobs active; every run when the Jobs
go to a Kueue queue) and follows them with a watch on this pipeline's Jobs (resumed from the
last resourceVersion after a reconnect, re-listed after 410 Gone). Every `progress_interval`
seconds it prints each run's state and last log line, and looks for runs that cannot start:
image pulls, missing Secrets or ConfigMaps, pods the Job controller may not create (quota,
Pod Security admission, a missing ServiceAccount: FailedCreate events) and pods no node can
take (Unschedulable). Past their grace period (`start_grace`, `unschedulable_limit`) such a
run fails with the reason and the event's message, and its Job is deleted.

Nothing is lost to an API outage: every call retries with backoff (honouring Retry-After)
for up to `outage_budget` seconds; then the launcher leaves (`Detached`) and says so, the
Jobs keep running, and the next start adopts them. A run fails only when its Job says so.

Ownership: Job names are derived from the run hash and the pipeline's store (and
`executor.kubernetes.owner`), and only Jobs with this pipeline's labels are adopted. Running
it again adopts the Jobs already there instead of starting them twice (also one another
launcher created a moment ago: its create answers 409); a Job that failed before is
replaced. Another pipeline's Job is never adopted, replaced or deleted, even one of the same
name: that run fails, naming it. Deletions carry the uid of the Job meant, so a Job replaced
meanwhile is never deleted by mistake. A run's pods are found by their Job's controller-uid.
A finished run's results are copied from `<storage.remote>/results/<run_hash>/` into its
`output_dir`.
"""

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from vsgd.spec import ConfigError

from ..k8s_access import ACCESS, NAMED
from ..k8s_config import (QUEUE_LABEL, TRAIN_CONTAINER, load_template, max_parallel,
                          parse_quantity, queue_name, settings, template_path)
from ..k8s_jobs import (RUN_HASH_LABEL, condition, is_ours, managed_selector, render_job,
                        results_uri, why_not_ours, write_jobs)
from ..contract import STALE_IMAGE   # how a pod whose code is not the launcher's says so
from . import Detached, Executor, RunOutcome

REQUEST_TIMEOUT = (10, 60)      # connect, read seconds for ordinary API calls
TRANSIENT = (429, 500, 502, 503, 504)
MAX_BACKOFF = 30                # seconds between retries during an outage
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"   # set on a Job's pods (1.27+)
# What a Job's Failed reason means, for the one-line error.
REASONS = {
    "BackoffLimitExceeded": "every retry failed (backoffLimit reached)",
    "DeadlineExceeded": "ran longer than activeDeadlineSeconds",
    "PodFailurePolicy": "a pod failure matched the podFailurePolicy (exit code 78: invalid "
                        "configuration, not retried)",
}
# Container waiting reasons that mean "this pod will not start by itself"
# (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-state-waiting),
# grouped so that ErrImagePull <-> ImagePullBackOff flapping is one trouble, with a hint.
_PULL = ("the nodes cannot pull the image: is it pushed (`make image push`), is the name right, "
         "do the nodes have pull rights (image_pull_secrets)?")
START_FAILURES = {
    "ErrImagePull": ("image", _PULL),
    "ImagePullBackOff": ("image", _PULL),
    "InvalidImageName": ("image", "the image reference is not valid"),
    "ErrImageNeverPull": ("image", "imagePullPolicy Never and the image is not on the node"),
    "CreateContainerConfigError": ("config", "a Secret or ConfigMap the pod refers to is "
                                             "missing (kubectl apply -k k8s/overlays/...)"),
    "CreateContainerError": ("config", "the container runtime refused the container"),
}


# The ResourceQuota admission plugin's refusal (a 403 Forbidden), in its words.
# https://kubernetes.io/docs/concepts/policy/resource-quotas/
QUOTA_REFUSAL = re.compile(r"exceeded quota: (?P<quota>[^,]+), "
                           r"requested: (?P<requested>\S*), used: (?P<used>\S*), "
                           r"limited: (?P<limited>\S*)")
# Admission warnings come back in `Warning` headers: `299 - "<text>"`.
# https://kubernetes.io/blog/2020/09/03/warnings/
WARNING = re.compile(r'\d{3} \S+ "((?:[^"\\]|\\.)*)"')


class KubernetesError(Exception):
    """The cluster cannot be used at all (no config, no rights to watch, ...)."""


@dataclass
class QuotaRefusal:
    """A create refused by a ResourceQuota: its name and the amounts of the resources it
    would have exceeded (resource name -> quantity text)."""
    quota: str
    requested: dict
    used: dict
    limited: dict

    @property
    def beyond(self) -> list[str]:
        """The resources one such object alone asks more of than the quota ever allows: no
        amount of waiting admits it."""
        return [k for k, v in self.requested.items()
                if k in self.limited and parse_quantity(v) > parse_quantity(self.limited[k])]

    def amounts(self, what) -> str:
        return ",".join(f"{k}={v}" for k, v in getattr(self, what).items())


@dataclass
class _Run:
    spec: dict
    job: dict
    uid: str | None = None          # the Job we follow; events of other Jobs are stale
    counts: tuple = ()              # (active, succeeded, failed) last shown
    outcome: RunOutcome | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    created: str = ""               # the Job's creationTimestamp: older events are not ours
    trouble: tuple | None = None    # (kind, since, text) of a pod that does not start
    suspended: bool = False         # held by a queue (spec.suspend)

    @property
    def name(self):
        return self.job["metadata"]["name"]


class _Outage:
    """How long the API has been unreachable without a single successful call."""

    def __init__(self, budget, say):
        self.budget, self._say = float(budget), say
        self.since = None

    def ok(self):
        if self.since is not None:
            self._say(f"Kubernetes API reachable again after "
                      f"{time.monotonic() - self.since:.0f} s")
        self.since = None

    def failed(self, what) -> float:
        """Note a failed call; the seconds left of the budget (Detached when none)."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            self._say(f"Kubernetes API unreachable ({what}); retrying for up to "
                      f"{self.budget:.0f} s (executor.kubernetes.outage_budget)")
        left = self.budget - (now - self.since)
        if left <= 0:
            raise Detached(f"the Kubernetes API has been unreachable for {now - self.since:.0f} "
                           f"s (last: {what})")
        return left


class KubernetesExecutor(Executor):
    def __init__(self, params: dict, *, out=None, fetch_result=None, sleep=time.sleep):
        self.params = params
        self.cfg = settings(params)
        self.max_parallel = max_parallel(params)    # None: no limit (a queue admits)
        self.out = out or sys.stdout
        self._fetch = fetch_result or _fetch_from_store
        self._sleep = sleep
        self.namespace = None
        self._api = None
        self._checked = False     # the preflight passed
        self._outage = _Outage(self.cfg["outage_budget"], self._say)

    # -- the Executor protocol ------------------------------------------------------------

    def run(self, specs: list[dict]) -> list[RunOutcome]:
        if not specs:
            return []
        template = load_template(template_path(self.params))
        runs = [_Run(spec, render_job(spec, self.params, template)) for spec in specs]
        self.namespace = runs[0].job["metadata"]["namespace"]
        self._runs = {r.spec["run_hash"]: r for r in runs}
        self._queue = []
        try:
            self._connect()
            limit = (f"at most {self.max_parallel} at a time" if self.max_parallel else
                     f"all at once: Kueue queue {queue_name(self.params)} admits them")
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
            self._say(f"{why}; {len(active)} Jobs keep running in {self.namespace}: run the "
                      f"stage again (`dvc repro`) to adopt them, `python -m pipeline jobs "
                      f"list` to see them, `python -m pipeline jobs cancel` to stop them")

    # -- preflight --------------------------------------------------------------------------

    def _connect(self):
        if getattr(self, "_api", None) is None:
            self._api = connect(self.cfg["context"])
            self.batch = client.BatchV1Api(self._api)
            self.core = client.CoreV1Api(self._api)
            self.auth = client.AuthorizationV1Api(self._api)

    def before_stage(self, stage: str, unfinished: list[dict]) -> None:
        """The preflight (with one of the unfinished runs' Jobs), then the Jobs of an
        earlier grid still running."""
        from ..jobs import report_stale   # jobs imports this module's client
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

    def _preflight(self, job: dict) -> None:
        """Everything that would make every Job fail, checked before the first is submitted;
        ConfigError with every problem found."""
        problems = []
        ns = self.namespace
        try:
            # A dry run goes through validation and admission like a real create (KEP-576):
            # what would refuse every Job refuses this one, and nothing is stored.
            _, _, headers = self._call(self.batch.create_namespaced_job_with_http_info, ns,
                                       client.V1Job.from_dict(job), dry_run="All")
        except ApiException as exc:
            quota = quota_refusal(exc)
            if exc.status == 404:
                problems.append(f"executor.kubernetes.namespace: namespace {ns!r} does not "
                                f"exist (create it: kubectl apply -k k8s/overlays/<local|"
                                f"cloud>, docs/kubernetes.md)")
            elif quota and quota.beyond:
                problems.append(
                    f"kubernetes: one Job alone exceeds ResourceQuota {quota.quota} of "
                    f"namespace {ns} (requested {quota.amounts('requested')}, the quota's "
                    f"hard limit {quota.amounts('limited')}): no Job can ever be admitted; "
                    f"raise the quota (kubectl -n {ns} describe resourcequota {quota.quota})")
            elif quota:
                # Full because of what runs now: that passes. Each run waits for room as a
                # pod refused by a quota does (FailedCreate), up to start_grace.
                self._say(f"ResourceQuota {quota.quota} of namespace {ns} is full now (used "
                          f"{quota.amounts('used')} of {quota.amounts('limited')}): the runs "
                          f"wait for room, each for up to {self.cfg['start_grace']:.0f} s "
                          f"(executor.kubernetes.start_grace)")
            elif exc.status != 409:   # 409: the name exists; adoption decides about it
                problems.append(f"kubernetes: a dry-run of Job {job['metadata']['name']} was "
                                f"refused: {api_error(exc, 'creating a Job (dry run)')}")
        else:
            for warning in admission_warnings(headers):
                self._say(f"the API server warns about the Job: {warning}"
                          + (" (Pod Security admission refuses such pods, not the Job, "
                             "where the namespace enforces that level: every run would fail "
                             "with FailedCreate)" if "PodSecurity" in warning else ""))
        problems += self._referenced_objects(job)
        problems += self._missing_rights()
        if problems:
            problems.append("kubernetes: nothing was submitted; fix these, then run the "
                            "stage again")
            raise ConfigError(problems)
        self._checked = True
        self._say(f"preflight ok: namespace {ns}, {len(_referenced(job))} referenced objects, "
                  f"{sum(len(a[2]) for a in ACCESS)} rights")

    def _referenced_objects(self, job) -> list[str]:
        """Every ServiceAccount, Secret and ConfigMap the Job refers to exists. Reading each
        by its name is also the check of the launcher's right to: a Role's resourceNames
        grant one name, not another (an image pull secret is not the credentials Secret)."""
        problems, ns = [], self.namespace
        reads = {"serviceaccounts": self.core.read_namespaced_service_account,
                 "secrets": self.core.read_namespaced_secret,
                 "configmaps": self.core.read_namespaced_config_map}
        for resource, name, key in _referenced(job):
            where = f"executor.kubernetes.{key}"
            what = f"{resource[:-1]} {ns}/{name}"
            try:
                # Not deserialized: the launcher has no use for a Secret's values. Drained
                # before the connection goes back to the pool: the next request on it would
                # read this body as its answer.
                answer = self._call(reads[resource], name, ns, _preload_content=False)
                answer.drain_conn()
                answer.release_conn()
            except ApiException as exc:
                if exc.status == 404:
                    problems.append(f"{where}: {what} does not exist (kubectl apply -k "
                                    f"k8s/overlays/<local|cloud>, or create it; "
                                    f"docs/kubernetes.md)")
                elif exc.status == 403:
                    # Not knowing is not "it exists": a missing one would only show as pods
                    # that never start, start_grace later, run after run.
                    problems.append(
                        f"{where}: cannot verify that {what} exists: the launcher may not "
                        f"read it ({status_message(exc)}); grant get on it (its name in the "
                        f"resourceNames of the {resource} rule of the Role in "
                        f"k8s/base/launcher-rbac.yaml), or check that it exists: kubectl -n "
                        f"{ns} get {resource[:-1]} {name}")
                else:
                    problems.append(f"{where}: {api_error(exc, f'reading {what}')}")
        return problems

    def _missing_rights(self) -> list[str]:
        problems = []
        for group, resource, verbs, why in ACCESS:
            resource, _, sub = resource.partition("/")
            if resource in NAMED:
                continue   # gets of the referenced objects: _referenced_objects read them
            for verb in verbs:
                review = client.V1SelfSubjectAccessReview(
                    spec=client.V1SelfSubjectAccessReviewSpec(
                        resource_attributes=client.V1ResourceAttributes(
                            namespace=self.namespace, verb=verb, group=group,
                            resource=resource, subresource=sub or None)))
                try:
                    answer = self._call(self.auth.create_self_subject_access_review, review)
                except ApiException as exc:
                    problems.append("kubernetes: " + api_error(
                        exc, "asking the API server about the launcher's rights"))
                    return problems
                if not answer.status.allowed:
                    what = f"{resource}/{sub}" if sub else resource
                    problems.append(
                        f"kubernetes: missing right: {verb} {what} in "
                        f"{group or 'core'} API group, namespace {self.namespace} (to {why}); "
                        f"grant the Role in k8s/base/launcher-rbac.yaml")
        return problems

    # -- submitting -------------------------------------------------------------------------

    def _sync(self, first=False):
        """List our Jobs: adopt (first time) or catch up (after 410); returns resourceVersion."""
        listing = self._call(self.batch.list_namespaced_job, self.namespace,
                             label_selector=managed_selector(self.params))
        found = {}   # run hash -> its Job; a live one wins over a failed one being replaced
        for item in listing.items:
            job = self._dict(item)
            if not is_ours(job, self.params) or job["metadata"].get("deletionTimestamp"):
                continue   # another pipeline's, or going away: submitted anew (after it)
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
            self._say(f"[{run.name}] replacing Job {job['metadata']['name']} that failed "
                      f"before ({failed.get('reason')})")
            self._delete(job["metadata"]["name"], job["metadata"]["uid"])
            self._queue.append(run)
            return
        run.uid = job["metadata"]["uid"]
        run.created = job["metadata"].get("creationTimestamp") or ""
        self._say(f"[{run.name}] adopting existing Job {job['metadata']['name']}")
        self._observe(run, job)

    def _delete(self, name, uid) -> bool:
        """Delete Job `name` with its pods if it is still the Job with `uid`: one created
        anew meanwhile under the same name (by another launcher) is not ours to delete.
        False when it was gone or replaced."""
        try:
            self._call(self.batch.delete_namespaced_job, name, self.namespace,
                       body=client.V1DeleteOptions(propagation_policy="Background",
                                                   preconditions=client.V1Preconditions(
                                                       uid=uid)))
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

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
                created = self._call(self.batch.create_namespaced_job, self.namespace,
                                     client.V1Job.from_dict(run.job))
            except ApiException as exc:
                if exc.status == 409:
                    # Created meanwhile (another launcher, or the replaced Job's name still
                    # held while it is deleted): adopt if it is ours and the same run.
                    existing = self._existing(run)
                    if existing is not None and not is_ours(existing, self.params):
                        self._finish(run, False, self._foreign(existing))
                        return False
                    if existing is not None and not condition(existing, "Failed"):
                        self._adopt(run, existing)
                        return True
                    self._sleep(2 ** attempt)
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
            run.created = self._dict(created)["metadata"].get("creationTimestamp") or ""
            run.submitted_at = time.monotonic()
            self._say(f"[{run.name}] submitted Job {run.name} "
                      f"({run.spec['dataset']} {run.spec['arch']} "
                      f"{run.spec['optimizer']['name']} seed {run.spec['seed']})")
            return True
        self._finish(run, False, f"Job {run.name} exists and cannot be replaced (being "
                                 f"deleted?); run again later")
        return False

    def _foreign(self, job) -> str:
        """Why the run fails when its name is taken by another pipeline's Job. It is never
        adopted (its results go to another store) nor deleted (it is someone's work), and
        waiting could last as long as its TTL: the run fails, naming it, and the others go
        on."""
        name = job["metadata"]["name"]
        return (f"a Job named {name} exists in namespace {self.namespace} but is not this "
                f"pipeline's: {why_not_ours(job, self.params)}; it was left alone. Delete it "
                f"if nobody needs it (kubectl -n {self.namespace} delete job {name}), or give "
                f"this pipeline its own executor.kubernetes.owner (its Jobs then get other "
                f"names)")

    def _existing(self, run):
        try:
            return self._dict(self._call(self.batch.read_namespaced_job, run.name,
                                         self.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # -- following --------------------------------------------------------------------------

    def _watch(self, rv):
        """One watch window (progress_interval seconds); returns the resourceVersion to
        resume from."""
        window = max(1, int(self.cfg["progress_interval"]))
        w = watch.Watch()
        try:
            for event in w.stream(self.batch.list_namespaced_job, self.namespace,
                                  label_selector=managed_selector(self.params),
                                  resource_version=rv, allow_watch_bookmarks=True,
                                  timeout_seconds=window, _request_timeout=(10, window + 30)):
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
                self._outage.ok()
                self._say("watch expired (410 Gone); listing the Jobs again")
                return self._sync()
            if exc.status in TRANSIENT:
                left = self._outage.failed(f"watch: {exc.status} {exc.reason}")
                self._sleep(min(_retry_after(exc) or 2, left, MAX_BACKOFF))
                return rv
            raise KubernetesError(api_error(exc, "watching Jobs")) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            left = self._outage.failed(f"watch connection lost: {type(exc).__name__}")
            self._say(f"watch connection lost ({type(exc).__name__}); resuming from "
                      f"resourceVersion {rv}")
            self._sleep(min(2, left))
            return rv
        self._outage.ok()
        return rv

    def _queue_has_room(self):
        return bool(self._queue) and (self.max_parallel is None
                                      or self._active() < self.max_parallel)

    def _observe(self, run, job):
        # Only the terminal conditions count: since 1.31 FailureTarget/SuccessCriteriaMet come
        # first, while the Job's pods may still be terminating (and saving a checkpoint).
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
            self._say(f"[{run.name}] " + (f"queued (suspended until Kueue queue {queue} admits "
                                          f"it)" if spec_suspended and queue else
                                          "queued (suspended)" if spec_suspended else
                                          "admitted (no longer suspended)"))
        status = job.get("status") or {}
        counts = (status.get("active") or 0, status.get("succeeded") or 0,
                  status.get("failed") or 0)
        if counts != run.counts:
            if run.counts and counts[2] > run.counts[2]:
                self._say(f"[{run.name}] pod failed ({counts[2]} so far); the Job retries, "
                          f"resuming from the last checkpoint")
            run.counts = counts

    def _failed(self, run, failed):
        reason = failed.get("reason") or "Failed"
        meaning = REASONS.get(reason)
        error = f"Job {run.name} failed: {reason}" + (f" - {meaning}" if meaning else "")
        if failed.get("message"):
            error += f" ({failed['message']})"
        message = self._termination_message(run)
        if message and STALE_IMAGE in message:
            error = (f"image is stale: rebuild and push (`make image push`), then run again "
                     f"- {message}")
        elif message:
            error += f": {message}"
        self._finish(run, False, error, self._log_tail(run))

    def _vanished(self, run):
        """The Job is gone before we saw it finish (deleted by hand, or by its TTL)."""
        try:
            self._fetch(self.params, run.spec)
        except Exception:  # noqa: BLE001 - any failure to find the result means: not done
            self._finish(run, False, f"Job {run.name} was deleted before it finished",
                         self._log_tail(run))
            return
        self._finish(run, True)

    def _succeeded(self, run):
        try:
            self._fetch(self.params, run.spec)
        except Exception as exc:  # noqa: BLE001 - reported as this run's failure
            self._finish(run, False, f"Job {run.name} completed but its results could not be "
                                     f"fetched from {results_uri(self.params, run.spec)}: "
                                     f"{type(exc).__name__}: {exc}")
            return
        self._finish(run, True)

    def _finish(self, run, ok, error=None, log_tail=""):
        run.outcome = RunOutcome(run.spec["name"], run.spec["run_hash"], ok, error, log_tail)
        if ok:
            minutes = (time.monotonic() - run.submitted_at) / 60
            self._say(f"[{run.name}] done ({minutes:.1f} min), results in "
                      f"{run.spec['output_dir']}")
        else:
            self._say(f"[{run.name}] FAILED: {error}")
            for line in log_tail.splitlines():
                self._say(f"[{run.name}] | {line}")

    # -- pods, events and logs --------------------------------------------------------------

    def _pods(self, run):
        """The pods of the Job we follow (by its controller-uid: a run-hash label could also
        match pods of an older Job of the same run), newest last."""
        pods = self._call(self.core.list_namespaced_pod, self.namespace,
                          label_selector=f"{CONTROLLER_UID}={run.uid}").items
        return sorted((self._dict(p) for p in pods),
                      key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def _termination_message(self, run) -> str:
        """What the failed container said about itself (terminationMessagePath, or its log
        tail with FallbackToLogsOnError), stripped to its last lines."""
        try:
            pods = self._pods(run)
        except ApiException:
            return ""
        for pod in reversed(pods):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or {}
                if cs.get("name") == TRAIN_CONTAINER and term.get("message"):
                    return " ".join(term["message"].strip().splitlines()[-6:])
        return ""

    def _warnings(self, uid) -> list[dict]:
        """Warning events about the object with `uid`, oldest first."""
        events = self._call(self.core.list_namespaced_event, self.namespace,
                            field_selector=f"involvedObject.uid={uid},type=Warning").items
        events = [self._dict(e) for e in events]
        return sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def _log_tail(self, run, lines=None) -> str:
        lines = lines or int(self.cfg["log_tail_lines"])
        try:
            pods = self._pods(run)
            if not pods:
                return "(no pod left to read a log from)"
            pod = pods[-1]
            head = _pod_state(pod)
            log = self._read_log(pod, lines)
        except ApiException as exc:
            return f"(no log: {api_error(exc, 'reading the pod log')})"
        return f"pod {pod['metadata']['name']}: {head}\n{log.rstrip()}"

    def _read_log(self, pod, lines) -> str:
        """The last `lines` of the train container's log. A container that has not started
        (ContainerCreating, ImagePullBackOff, a pod on no node yet) has none: the API server
        answers 400 with why, which is what is shown instead."""
        try:
            return self._call(self.core.read_namespaced_pod_log, pod["metadata"]["name"],
                              self.namespace, container=TRAIN_CONTAINER, tail_lines=lines)
        except ApiException as exc:
            if exc.status != 400:
                raise
            return f"(no log yet: {status_message(exc)})"

    def _progress(self):
        for run in self._runs.values():
            if not run.uid or run.outcome:
                continue
            try:
                self._progress_of(run)
            except ApiException as exc:
                self._say(f"[{run.name}] (no progress: {api_error(exc, 'reading pods')})")

    def _progress_of(self, run):
        minutes = (time.monotonic() - run.submitted_at) / 60
        if run.suspended:
            self._say(f"[{run.name}] queued, {minutes:.0f} min")
            return
        pods = self._pods(run)
        trouble = self._start_trouble(run, pods)
        self._track(run, trouble)
        if run.outcome:
            return
        if not pods:
            self._say(f"[{run.name}] waiting for a pod, {minutes:.0f} min"
                      + (f" | {trouble[1]}" if trouble else ""))
            return
        pod = pods[-1]
        line = ""
        if pod.get("status", {}).get("phase") == "Running":
            line = self._read_log(pod, 1).strip()
        self._say(f"[{run.name}] {_pod_state(pod)}, {minutes:.0f} min"
                  + (f" | {line}" if line else ""))

    def _start_trouble(self, run, pods):
        """(kind, text) when the run's newest pod cannot start, or its Job cannot create one;
        kind is "image", "config", "create" or "unschedulable"."""
        if pods:
            pod = pods[-1]
            status = pod.get("status") or {}
            if status.get("phase") != "Pending":
                return None
            for cs in status.get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in START_FAILURES:
                    kind, hint = START_FAILURES[waiting["reason"]]
                    text = f"{waiting['reason']}: {waiting.get('message') or ''}".strip()
                    return kind, text + (f" ({hint})" if hint else "")
            for cond in status.get("conditions") or []:
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and \
                        cond.get("reason") == "Unschedulable":
                    return "unschedulable", f"Unschedulable: {cond.get('message') or ''}"
            return None
        # No pod: the Job controller says why in a FailedCreate event on the Job.
        fresh = [e for e in self._warnings(run.uid) if e.get("reason") == "FailedCreate"
                 and (e.get("lastTimestamp") or e.get("eventTime") or "") >= run.created]
        if fresh:
            return "create", f"FailedCreate: {fresh[-1].get('message') or ''}"
        return None

    def _track(self, run, trouble):
        """Fail the run when the same kind of trouble outlasts its grace period."""
        if trouble is None:
            run.trouble = None
            return
        kind, text = trouble
        now = time.monotonic()
        if run.trouble is None or run.trouble[0] != kind:
            run.trouble = (kind, now, text)
            grace = self._grace(kind)
            self._say(f"[{run.name}] cannot start: {text}"
                      + (f" (the run fails if this lasts {grace:.0f} s)" if grace else ""))
            return
        grace = self._grace(kind)
        if grace is not None and now - run.trouble[1] >= grace:
            self._say(f"[{run.name}] giving up after {now - run.trouble[1]:.0f} s"
                      + (f"; deleting Job {run.name}" if run.uid else ""))
            try:
                if run.uid:
                    self._delete(run.name, run.uid)
            except ApiException as exc:
                self._say(f"[{run.name}] (could not delete: {api_error(exc, 'deleting')})")
            self._finish(run, False, f"Job {run.name} could not start for "
                                     f"{now - run.trouble[1]:.0f} s: {text}")

    def _grace(self, kind):
        if kind == "unschedulable":
            return self.cfg["unschedulable_limit"]
        return self.cfg["start_grace"]

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, fn, *args, **kwargs):
        """An API call, retried through an outage (connection refused or reset, 5xx, 429
        with its Retry-After) for up to `outage_budget` seconds, then `Detached`. Other
        ApiExceptions (404, 403, 409, ...) propagate."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        delay = 1
        while True:
            try:
                result = fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status not in TRANSIENT:
                    self._outage.ok()
                    raise
                wait, what = _retry_after(exc) or delay, f"{exc.status} {exc.reason}"
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                wait, what = delay, f"{type(exc).__name__}: {_short(exc)}"
            else:
                self._outage.ok()
                return result
            left = self._outage.failed(what)
            self._sleep(min(wait, left, MAX_BACKOFF))
            delay = min(delay * 2, MAX_BACKOFF)

    def _dict(self, obj) -> dict:
        return self._api.sanitize_for_serialization(obj)

    def _say(self, text):
        print(f"[k8s] {text}" if not text.startswith("[") else text, file=self.out,
              flush=True)


def _retry_after(exc: ApiException) -> float | None:
    """Seconds from a 429's (or 503's) Retry-After header, as API Priority and Fairness
    sends it."""
    value = (exc.headers or {}).get("Retry-After") if exc.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _short(exc) -> str:
    text = str(exc).splitlines()[0] if str(exc) else repr(exc)
    return text[:200]


def connect(context=None) -> client.ApiClient:
    """API client from the kubeconfig (laptop) or, failing that, the pod's service account."""
    configuration = client.Configuration()
    try:
        # KUBECONFIG read now: the client's default is read once, when it is imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                context=context, client_configuration=configuration)
    except config.ConfigException as kube_error:
        if context:
            raise KubernetesError(f"kubeconfig context {context!r}: {kube_error}") from None
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise KubernetesError(
                f"no Kubernetes configuration: {kube_error}; set KUBECONFIG (or "
                f"~/.kube/config), or run inside the cluster") from None
    # Retries are ours (with the outage budget); urllib3's own would multiply them.
    configuration.retries = False
    return client.ApiClient(configuration)


def _status(exc: ApiException) -> dict:
    """The Status object of an error answer ({} for a body that is none, e.g. a 429's)."""
    try:
        status = json.loads(exc.body or "{}")
    except (ValueError, TypeError):
        return {}
    return status if isinstance(status, dict) else {}


def status_message(exc: ApiException) -> str:
    """What the API server said: the Status message, else the body, else the reason."""
    return _status(exc).get("message") or (exc.body or "").strip() or exc.reason or ""


def quota_refusal(exc: ApiException) -> QuotaRefusal | None:
    """The ResourceQuota behind a 403, None for any other refusal (RBAC, a webhook)."""
    match = QUOTA_REFUSAL.search(status_message(exc)) if exc.status == 403 else None
    if match is None:
        return None
    amounts = [dict(part.split("=", 1) for part in match[what].split(",") if "=" in part)
               for what in ("requested", "used", "limited")]
    return QuotaRefusal(match["quota"].strip(), *amounts)


def admission_warnings(headers) -> list[str]:
    """The texts of an answer's `Warning` headers (several arrive joined by commas)."""
    value = (headers or {}).get("Warning") or ""
    return [re.sub(r"\\(.)", r"\1", text) for text in WARNING.findall(value)]


def _referenced(job: dict) -> list[tuple[str, str, str]]:
    """(resource, name, params key) of every object the Job's pods need to start: the
    ServiceAccount, the Secrets and ConfigMaps of the train container's envFrom (unless
    optional) and the image pull secrets."""
    pod = job["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == TRAIN_CONTAINER)
    wanted = [("serviceaccounts", pod.get("serviceAccountName") or "default",
               NAMED["serviceaccounts"][0])]
    for ref in container.get("envFrom") or []:
        if "secretRef" in ref and not ref["secretRef"].get("optional"):
            wanted.append(("secrets", ref["secretRef"]["name"], NAMED["secrets"][0]))
        if "configMapRef" in ref and not ref["configMapRef"].get("optional"):
            wanted.append(("configmaps", ref["configMapRef"]["name"], NAMED["configmaps"][0]))
    for pull in pod.get("imagePullSecrets") or []:
        wanted.append(("secrets", pull["name"], "image_pull_secrets"))
    return wanted


def api_error(exc: ApiException, doing: str) -> str:
    """One line from an API error: the Status message the server sent, plus a hint."""
    message = status_message(exc)
    reason = _status(exc).get("reason") or exc.reason
    text = f"API error {doing}: {exc.status} {reason}: {message}"
    if exc.status == 403 and "quota" in str(message):
        text += " (a ResourceQuota of the namespace is full: wait for running Jobs or raise it)"
    elif exc.status == 403:
        text += " (the launcher lacks rights: see the Role in k8s/base/launcher-rbac.yaml)"
    elif exc.status == 401:
        text += " (credentials of the kubeconfig rejected or expired)"
    return text


def _pod_state(pod) -> str:
    """`Running`, `Pending: ImagePullBackOff (...)`, `Failed: OOMKilled (exit 137)`, ..."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Unknown"
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("waiting"):
            w = state["waiting"]
            return f"{phase}: {w.get('reason')}" + (f" ({w['message']})" if w.get("message")
                                                     else "")
        if state.get("terminated") and phase != "Running":
            t = state["terminated"]
            return f"{phase}: {t.get('reason') or 'terminated'} (exit {t.get('exitCode')})"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{phase}: {cond.get('reason')} ({cond.get('message')})"
    return phase


def _fetch_from_store(params, spec):
    """Copy a finished run's results from the store into its output_dir."""
    from ..storage import fetch_result   # the storage layer needs boto3: only when used
    fetch_result(params, spec)


# -- `python -m pipeline render-jobs` -------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for the Job YAML files")
    parser.add_argument("--params", default="params.yaml", help="params file (params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. executor.kubernetes.image=... (repeatable)")


def run(args) -> int:
    from ..config import ConfigError, load_params
    from ..jobs import grid_specs
    params = load_params(args.params, args.set)
    if not params["storage"]["remote"]:
        raise ConfigError(["storage.remote: rendering Jobs needs an s3:// remote (pods reach "
                           "their data, checkpoints and results through it)"])
    specs, complete = grid_specs(params)
    if not complete:
        print(f"the grid's final runs need the tune stage's choice "
              f"(results/tuning/selected.yaml): rendering its {len(specs)} tuning runs only")
    paths = write_jobs(specs, params, args.out)
    for spec, path in zip(specs, paths):
        print(f"{path}  ({spec['name']})")
    print(f"{len(paths)} Jobs in {args.out}; submit one with `kubectl apply -f <file>`")
    return 0
