"""A run's pods as the launcher sees them: found by their Job's controller-uid (a run-hash
label could also match pods of an older Job of the same run), their state in one line, why
one cannot start, what a failed container said, and the last lines of the log.

A pod that will not start by itself is one of: a container waiting for a reason that does not
pass (an image that cannot be pulled, a missing Secret or ConfigMap), a pod the scheduler
cannot place (Unschedulable), or no pod at all because the Job controller may not create one
(a FailedCreate event on the Job: quota, Pod Security admission, a missing ServiceAccount).
"""

from kubernetes.client.exceptions import ApiException

from .client import Api, api_error, status_message
from .schema import TRAIN_CONTAINER

CONTROLLER_UID = "batch.kubernetes.io/controller-uid"  # set on a Job's pods (1.27+)
# Container waiting reasons that mean "this pod will not start by itself"
# (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-state-waiting),
# grouped so that ErrImagePull <-> ImagePullBackOff flapping is one trouble, with a hint.
_PULL = (
    "the nodes cannot pull the image: is it pushed (`make image push`), is the name right, "
    "do the nodes have pull rights (image_pull_secrets)?"
)
START_FAILURES = {
    "ErrImagePull": ("image", _PULL),
    "ImagePullBackOff": ("image", _PULL),
    "InvalidImageName": ("image", "the image reference is not valid"),
    "ErrImageNeverPull": ("image", "imagePullPolicy Never and the image is not on the node"),
    "CreateContainerConfigError": (
        "config",
        "a Secret or ConfigMap the pod refers to is missing (kubectl apply -k k8s/overlays/...)",
    ),
    "CreateContainerError": ("config", "the container runtime refused the container"),
}


def pod_state(pod) -> str:
    """`Running`, `Pending: ImagePullBackOff (...)`, `Failed: OOMKilled (exit 137)`, ..."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Unknown"
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("waiting"):
            w = state["waiting"]
            return f"{phase}: {w.get('reason')}" + (
                f" ({w['message']})" if w.get("message") else ""
            )
        if state.get("terminated") and phase != "Running":
            t = state["terminated"]
            return f"{phase}: {t.get('reason') or 'terminated'} (exit {t.get('exitCode')})"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{phase}: {cond.get('reason')} ({cond.get('message')})"
    return phase


def pod_start_failure(pod) -> tuple[str, str] | None:
    """(kind, text) when the pod cannot start: kind "image", "config" or "unschedulable"."""
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
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return "unschedulable", f"Unschedulable: {cond.get('message') or ''}"
    return None


class Pods:
    """The pods of Jobs in one namespace, with their events and logs."""

    def __init__(self, api: Api, namespace: str, log_tail_lines: int):
        self.api, self.namespace, self.log_tail_lines = api, namespace, int(log_tail_lines)

    def of(self, job_uid: str) -> list[dict]:
        """The pods of the Job with `job_uid`, newest last."""
        pods = self._list(
            self.api.core.list_namespaced_pod, label_selector=f"{CONTROLLER_UID}={job_uid}"
        )
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def warnings(self, uid: str) -> list[dict]:
        """Warning events about the object with `uid`, oldest first."""
        events = self._list(
            self.api.core.list_namespaced_event,
            field_selector=f"involvedObject.uid={uid},type=Warning",
        )
        return sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def _list(self, method, **selector) -> list[dict]:
        """The objects of a namespaced list call in this namespace, as dicts."""
        return [
            self.api.to_dict(o) for o in self.api.call(method, self.namespace, **selector).items
        ]

    def start_failure(self, job_uid: str, created: str, pods: list[dict]):
        """(kind, text) when the Job's newest pod cannot start, or the Job cannot create one
        (kind "create": a FailedCreate event on it since `created`, its creationTimestamp:
        older events are of an earlier Job of that name); None otherwise."""
        if pods:
            return pod_start_failure(pods[-1])
        fresh = [
            e
            for e in self.warnings(job_uid)
            if e.get("reason") == "FailedCreate"
            and (e.get("lastTimestamp") or e.get("eventTime") or "") >= created
        ]
        if fresh:
            return "create", f"FailedCreate: {fresh[-1].get('message') or ''}"
        return None

    def termination_message(self, job_uid: str) -> str:
        """What the failed container said about itself (terminationMessagePath, or its log
        tail with FallbackToLogsOnError), stripped to its last lines."""
        try:
            pods = self.of(job_uid)
        except ApiException:
            return ""
        for pod in reversed(pods):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or {}
                if cs.get("name") == TRAIN_CONTAINER and term.get("message"):
                    return " ".join(term["message"].strip().splitlines()[-6:])
        return ""

    def log_tail(self, job_uid: str) -> str:
        """The newest pod's state and the last `log_tail_lines` of its log."""
        try:
            pods = self.of(job_uid)
            if not pods:
                return "(no pod left to read a log from)"
            pod = pods[-1]
            head = pod_state(pod)
            log = self.read_log(pod, self.log_tail_lines)
        except ApiException as exc:
            return f"(no log: {api_error(exc, 'reading the pod log')})"
        return f"pod {pod['metadata']['name']}: {head}\n{log.rstrip()}"

    def read_log(self, pod: dict, lines: int) -> str:
        """The last `lines` of the train container's log. A container that has not started
        (ContainerCreating, ImagePullBackOff, a pod on no node yet) has none: the API server
        answers 400 with why, which is what is shown instead."""
        try:
            return self.api.call(
                self.api.core.read_namespaced_pod_log,
                pod["metadata"]["name"],
                self.namespace,
                container=TRAIN_CONTAINER,
                tail_lines=lines,
            )
        except ApiException as exc:
            if exc.status != 400:
                raise
            return f"(no log yet: {status_message(exc)})"
