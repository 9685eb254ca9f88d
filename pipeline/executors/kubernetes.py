"""Render the Kubernetes Job of every run of the grid to YAML files (`kubectl apply -f` one).

The files are exactly what the kubernetes executor submits (`executor.kind: kubernetes`):
one `batch/v1` Job per run, from pipeline/templates/job-template.yaml and params.yaml's
`executor.kubernetes` settings (docs/kubernetes.md).

The executor (`KubernetesExecutor`) submits every pending run at once, at most
`executor.max_parallel` Jobs active, then follows them with a watch on the Jobs it manages
(resumed from the last resourceVersion after a reconnect, re-listed after 410 Gone), prints
each run's progress every `progress_interval` seconds, and on failure the Job's reason and the
pod's last log lines. Job names are derived from the run hash and every Job carries the hash
as a label, so running it again adopts the Jobs already there instead of starting them twice;
a Job that failed before is replaced. A finished run's results are copied from
`<storage.remote>/results/<run_hash>/` into its `output_dir`.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from ..k8s_config import TRAIN_CONTAINER, load_template, settings, template_path
from ..k8s_jobs import MANAGED_SELECTOR, RUN_HASH_LABEL, render_job, results_uri, write_jobs
from . import RunOutcome

REQUEST_TIMEOUT = (10, 60)      # connect, read seconds for ordinary API calls
RETRIES = 4                     # transient API errors (5xx, 429, connection) per call
TRANSIENT = (429, 500, 502, 503, 504)
# What a Job's Failed reason means, for the one-line error.
REASONS = {
    "BackoffLimitExceeded": "every retry failed (backoffLimit reached)",
    "DeadlineExceeded": "ran longer than activeDeadlineSeconds",
    "PodFailurePolicy": "a pod failure matched the podFailurePolicy (exit code 78: invalid "
                        "configuration, not retried)",
}


class KubernetesError(Exception):
    """The cluster cannot be used at all (no config, no rights to watch, ...)."""


@dataclass
class _Run:
    spec: dict
    job: dict
    uid: str | None = None          # the Job we follow; events of other Jobs are stale
    counts: tuple = ()              # (active, succeeded, failed) last shown
    outcome: RunOutcome | None = None
    submitted_at: float = field(default_factory=time.monotonic)

    @property
    def name(self):
        return self.job["metadata"]["name"]


class KubernetesExecutor:
    def __init__(self, params: dict, *, out=None, fetch_result=None, sleep=time.sleep):
        self.params = params
        self.cfg = settings(params)
        self.max_parallel = max(1, int(params["executor"]["max_parallel"]))
        self.out = out or sys.stdout
        self._fetch = fetch_result or _fetch_from_store
        self._sleep = sleep
        self.namespace = None

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
            self._api = connect(self.cfg["context"])
            self.batch = client.BatchV1Api(self._api)
            self.core = client.CoreV1Api(self._api)
            self._say(f"{len(runs)} runs -> Jobs in namespace {self.namespace} "
                      f"(at most {self.max_parallel} at a time)")
            rv = self._sync(first=True)
            self._submit_ready()
            while not all(r.outcome for r in runs):
                rv = self._watch(rv)
                self._submit_ready()
                self._progress()
        except KeyboardInterrupt:
            active = [r.name for r in runs if r.uid and not r.outcome]
            if active:
                self._say(f"interrupted; {len(active)} Jobs keep running in {self.namespace} "
                          f"(run again to adopt them, or `kubectl -n {self.namespace} delete "
                          f"jobs -l {MANAGED_SELECTOR}`)")
            raise
        except KubernetesError as exc:
            for r in runs:
                if not r.outcome:
                    self._finish(r, False, str(exc))
        return [r.outcome for r in runs]

    # -- submitting -------------------------------------------------------------------------

    def _sync(self, first=False):
        """List our Jobs: adopt (first time) or catch up (after 410); returns resourceVersion."""
        listing = self._call(self.batch.list_namespaced_job, self.namespace,
                             label_selector=MANAGED_SELECTOR)
        found = {}   # run hash -> its Job; a live one wins over a failed one being replaced
        for item in listing.items:
            job = self._dict(item)
            key = job["metadata"].get("labels", {}).get(RUN_HASH_LABEL)
            if key in self._runs and (key not in found or _condition(found[key], "Failed")):
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
        failed = _condition(job, "Failed")
        if failed:
            # Resubmitting a failed run means "try again": replace the old Job.
            self._say(f"[{run.name}] replacing Job {job['metadata']['name']} that failed "
                      f"before ({failed.get('reason')})")
            self._call(self.batch.delete_namespaced_job, job["metadata"]["name"],
                       self.namespace, propagation_policy="Background")
            self._queue.append(run)
            return
        run.uid = job["metadata"]["uid"]
        self._say(f"[{run.name}] adopting existing Job {job['metadata']['name']}")
        self._observe(run, job)

    def _submit_ready(self):
        active = sum(1 for r in self._runs.values() if r.uid and not r.outcome)
        while self._queue and active < self.max_parallel:
            run = self._queue.pop(0)
            if self._create(run):
                active += 1

    def _create(self, run) -> bool:
        for attempt in range(3):
            try:
                created = self._call(self.batch.create_namespaced_job, self.namespace,
                                     client.V1Job.from_dict(run.job))
            except ApiException as exc:
                if exc.status == 409:
                    # Created meanwhile (another launcher, or the replaced Job's name still
                    # held while it is deleted): adopt if it is the same run, else wait.
                    existing = self._existing(run)
                    if existing is not None and not _condition(existing, "Failed"):
                        self._adopt(run, existing)
                        return True
                    self._sleep(2 ** attempt)
                    continue
                self._finish(run, False, api_error(exc, f"creating Job {run.name}"))
                return False
            run.uid = created.metadata.uid
            run.submitted_at = time.monotonic()
            self._say(f"[{run.name}] submitted Job {run.name} "
                      f"({run.spec['dataset']} {run.spec['arch']} "
                      f"{run.spec['optimizer']['name']} seed {run.spec['seed']})")
            return True
        self._finish(run, False, f"Job {run.name} exists and cannot be replaced (being "
                                 f"deleted?); run again later")
        return False

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
                                  label_selector=MANAGED_SELECTOR, resource_version=rv,
                                  allow_watch_bookmarks=True, timeout_seconds=window,
                                  _request_timeout=(10, window + 30)):
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
                self._say("watch expired (410 Gone); listing the Jobs again")
                return self._sync()
            if exc.status in TRANSIENT:
                self._say(f"watch interrupted ({exc.status} {exc.reason}); resuming")
                self._sleep(2)
                return rv
            raise KubernetesError(api_error(exc, "watching Jobs")) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self._say(f"watch connection lost ({type(exc).__name__}); resuming from "
                      f"resourceVersion {rv}")
            self._sleep(2)
        return rv

    def _queue_has_room(self):
        active = sum(1 for r in self._runs.values() if r.uid and not r.outcome)
        return bool(self._queue) and active < self.max_parallel

    def _observe(self, run, job):
        if _condition(job, "Complete"):
            self._succeeded(run)
            return
        failed = _condition(job, "Failed")
        if failed:
            reason = failed.get("reason") or "Failed"
            meaning = REASONS.get(reason)
            error = f"Job {run.name} failed: {reason}" + (f" - {meaning}" if meaning else "")
            if failed.get("message"):
                error += f" ({failed['message']})"
            self._finish(run, False, error, self._log_tail(run))
            return
        status = job.get("status") or {}
        counts = (status.get("active") or 0, status.get("succeeded") or 0,
                  status.get("failed") or 0)
        if counts != run.counts:
            if run.counts and counts[2] > run.counts[2]:
                self._say(f"[{run.name}] pod failed ({counts[2]} so far); the Job retries, "
                          f"resuming from the last checkpoint")
            run.counts = counts

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

    # -- pods and logs ----------------------------------------------------------------------

    def _pods(self, run):
        """The run's pods, newest last."""
        pods = self._call(self.core.list_namespaced_pod, self.namespace,
                          label_selector=f"{RUN_HASH_LABEL}={run.spec['run_hash']}").items
        return sorted((self._dict(p) for p in pods),
                      key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def _log_tail(self, run, lines=None) -> str:
        lines = lines or int(self.cfg["log_tail_lines"])
        try:
            pods = self._pods(run)
            if not pods:
                return "(no pod left to read a log from)"
            pod = pods[-1]
            head = _pod_state(pod)
            log = self._call(self.core.read_namespaced_pod_log, pod["metadata"]["name"],
                             self.namespace, container=TRAIN_CONTAINER, tail_lines=lines)
        except ApiException as exc:
            return f"(no log: {api_error(exc, 'reading the pod log')})"
        return f"pod {pod['metadata']['name']}: {head}\n{log.rstrip()}"

    def _progress(self):
        for run in self._runs.values():
            if not run.uid or run.outcome:
                continue
            try:
                pods = self._pods(run)
                if not pods:
                    self._say(f"[{run.name}] waiting for a pod")
                    continue
                pod = pods[-1]
                line = ""
                if pod.get("status", {}).get("phase") == "Running":
                    line = self._call(self.core.read_namespaced_pod_log,
                                      pod["metadata"]["name"], self.namespace,
                                      container=TRAIN_CONTAINER, tail_lines=1).strip()
            except ApiException as exc:
                self._say(f"[{run.name}] (no progress: {api_error(exc, 'reading pods')})")
                continue
            minutes = (time.monotonic() - run.submitted_at) / 60
            self._say(f"[{run.name}] {_pod_state(pod)}, {minutes:.0f} min"
                      + (f" | {line}" if line else ""))

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, fn, *args, **kwargs):
        """An API call with retries on transient errors; other ApiExceptions propagate."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        for attempt in range(RETRIES):
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status not in TRANSIENT or attempt == RETRIES - 1:
                    raise
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if attempt == RETRIES - 1:
                    raise KubernetesError(f"cannot reach the Kubernetes API: {exc}") from exc
            self._sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def _dict(self, obj) -> dict:
        return self._api.sanitize_for_serialization(obj)

    def _say(self, text):
        print(f"[k8s] {text}" if not text.startswith("[") else text, file=self.out,
              flush=True)


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
    return client.ApiClient(configuration)


def api_error(exc: ApiException, doing: str) -> str:
    """One line from an API error: the Status message the server sent, plus a hint."""
    try:
        status = json.loads(exc.body or "{}")
    except ValueError:
        status = {}
    message = status.get("message") or (exc.body or "").strip() or exc.reason
    reason = status.get("reason") or exc.reason
    text = f"API error {doing}: {exc.status} {reason}: {message}"
    if exc.status == 403 and "quota" in str(message):
        text += " (a ResourceQuota of the namespace is full: wait for running Jobs or raise it)"
    elif exc.status == 403:
        text += " (the launcher lacks rights: see the Role in k8s/base/launcher-rbac.yaml)"
    elif exc.status == 401:
        text += " (credentials of the kubeconfig rejected or expired)"
    return text


def _condition(job, kind):
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


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
    from ..grid import expand, tuning_specs
    from ..tune import load_selection
    params = load_params(args.params, args.set)
    if not params["storage"]["remote"]:
        raise ConfigError(["storage.remote: rendering Jobs needs an s3:// remote (pods reach "
                           "their data, checkpoints and results through it)"])
    specs = tuning_specs(params)
    try:
        specs += expand(params, load_selection(params))
    except ConfigError:  # the final runs' values come from the tune stage
        print(f"the grid's final runs need the tune stage's choice "
              f"(results/tuning/selected.yaml): rendering its {len(specs)} tuning runs only")
    paths = write_jobs(specs, params, args.out)
    for spec, path in zip(specs, paths):
        print(f"{path}  ({spec['name']})")
    print(f"{len(paths)} Jobs in {args.out}; submit one with `kubectl apply -f <file>`")
    return 0

