"""What a Job controller, the scheduler, the kubelet and the garbage collector would do,
as methods the tests call (there is no controller): pods that start, wait, fail or cannot be
scheduled, Jobs that complete or fail (with the 1.31+ conditions), suspend and resume,
events, deletion with its propagation policies, and why there is no log of a container yet."""

import copy
import time
import uuid

from .objects import NODE, condition, set_condition, timestamp
from .policy import pod_requests


class Scenario:
    """The controllers' side of the test API server."""

    # -- events -------------------------------------------------------------------------

    def event(self, obj, reason, message, type="Warning", ns="vsgd"):
        """Record an Event about `obj` (a Job or Pod dict as stored), as the job-controller,
        the default-scheduler (FailedScheduling) or the kubelet would; an identical event
        again only bumps `count` and `lastTimestamp`. Returns the Event's name.
        https://kubernetes.io/docs/reference/kubernetes-api/cluster-resources/event-v1/
        """
        meta = obj["metadata"]
        kind = obj.get("kind") or ("Job" if "template" in (obj.get("spec") or {}) else "Pod")
        component = (
            "job-controller"
            if kind == "Job"
            else "default-scheduler"
            if reason == "FailedScheduling"
            else "kubelet"
        )
        involved = {
            "kind": kind,
            "namespace": meta.get("namespace", ns),
            "name": meta["name"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
            "apiVersion": obj.get("apiVersion") or ("batch/v1" if kind == "Job" else "v1"),
        }
        source = {"component": component, **({"host": NODE} if component == "kubelet" else {})}
        now = timestamp()
        with self.cond:
            for existing in self.objects["events"].values():
                if (
                    existing["involvedObject"]["uid"],
                    existing["reason"],
                    existing["message"],
                    existing["type"],
                    existing["source"],
                ) == (involved["uid"], reason, message, type, source):
                    event = copy.deepcopy(existing)
                    event["count"] += 1
                    event["lastTimestamp"] = now
                    return self._put("events", event, "MODIFIED")["metadata"]["name"]
            # The name client-go's recorder gives an event: <object>.<hex of unix nanos>.
            event = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{time.time_ns():x}",
                    "namespace": ns,
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": now,
                },
                "involvedObject": involved,
                "reason": reason,
                "message": message,
                "type": type,
                "count": 1,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "eventTime": None,
                "source": source,
                "reportingComponent": component,
                "reportingInstance": source.get("host", ""),
            }
            return self._put("events", event, "ADDED")["metadata"]["name"]

    def events(self, ns="vsgd"):
        with self.cond:
            return [copy.deepcopy(e) for (n, _), e in self.objects["events"].items() if n == ns]

    def refuse_pods(self, job_name, message, ns="vsgd"):
        """The Job controller's pod creation is refused (ResourceQuota, Pod Security
        admission, a missing ServiceAccount, ...): a Warning FailedCreate event on the Job,
        and no pod. https://kubernetes.io/docs/concepts/workloads/controllers/job/#controlling-parallelism
        (fewer pods "if the Job controller failed to create Pods for any reason")."""
        if not message.startswith("Error creating: "):
            message = "Error creating: " + message
        return self.event(self.job(job_name, ns), "FailedCreate", message, "Warning", ns)

    # -- what a controller and kubelet would do -----------------------------------------

    def _owned(self, uid, ns):
        """The pods a Job (by uid) owns, through their ownerReferences.
        https://kubernetes.io/docs/concepts/overview/working-with-objects/owners-dependents/
        """
        with self.cond:
            return [
                copy.deepcopy(p)
                for (n, _), p in self.objects["pods"].items()
                if n == ns
                and any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences", []))
            ]

    def _recount(self, job):
        """status.active: "the number of pending and running pods which are not terminating
        (without a deletionTimestamp)"; status.ready: those with a Ready condition.
        https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/job-v1/#JobStatus
        """
        pods = [
            p
            for p in self._owned(job["metadata"]["uid"], job["metadata"]["namespace"])
            if p["status"]["phase"] in ("Pending", "Running")
        ]
        active = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        job["status"]["active"] = len(active)
        job["status"]["ready"] = sum(
            1 for p in active if (condition(p, "Ready") or {}).get("status") == "True"
        )
        terminating = len(pods) - len(active)
        if terminating or "terminating" in job["status"]:
            job["status"]["terminating"] = terminating

    def _new_pod(self, job_name, ns, phase, containers, conditions, scheduled=True):
        """A pod as the Job controller creates it: the labels it sets (both the
        batch.kubernetes.io/ ones and, deprecated since 1.27 but still set, the unprefixed
        ones: https://kubernetes.io/docs/reference/labels-annotations-taints/#batchkubernetesio-job-name)
        and an ownerReference to the Job (controller: true). The pod goes through admission
        first: Pod Security `enforce` and ResourceQuota refuse it as they would the Job
        controller's create, which then records FailedCreate on the Job (returns None)."""
        job = self.job(job_name, ns)
        template = job["spec"]["template"]
        uid = job["metadata"]["uid"]
        name = f"{job_name[:57]}-{uuid.uuid4().hex[:5]}"
        labels = {
            **template.get("metadata", {}).get("labels", {}),
            "job-name": job_name,
            "controller-uid": uid,
            "batch.kubernetes.io/job-name": job_name,
            "batch.kubernetes.io/controller-uid": uid,
        }
        spec = copy.deepcopy(template["spec"])
        refusal = self._pod_security(
            ns, "enforce", spec, template.get("metadata")
        ) or self._quota_refusal(ns, pod_requests(spec))
        if refusal:
            self.refuse_pods(job_name, f'pods "{name}" is forbidden: {refusal}', ns)
            return None
        status = {"phase": phase, "conditions": conditions}
        if scheduled:
            spec["nodeName"] = NODE
            status["startTime"] = timestamp()
        if containers is not None:
            status["containerStatuses"] = [
                {
                    "name": c.get("name", "train"),
                    "image": c.get("image", ""),
                    "imageID": "",
                    "restartCount": 0,
                    **containers,
                }
                for c in spec["containers"]
            ]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": labels,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": timestamp(),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job_name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
            "status": status,
        }
        self._put("pods", pod, "ADDED")

        def change(j):
            self._recount(j)
            j["status"].setdefault("startTime", timestamp())

        self._update_job(job_name, ns, change)
        return name

    @staticmethod
    def _pod_conditions(ready, reason="ContainersNotReady", message=""):
        """https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-conditions"""
        now = timestamp()
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
        ]
        for type_ in ("ContainersReady", "Ready"):
            conditions.append(
                {"type": type_, "status": "True", "lastTransitionTime": now}
                if ready
                else {
                    "type": type_,
                    "status": "False",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now,
                }
            )
        return conditions

    def start_pod(self, job_name, ns="vsgd", phase="Running", log=(), waiting=None):
        """A pod for the Job, as the Job controller would create it; returns its name (None
        when admission refused it: a FailedCreate event on the Job says why).
        `waiting=(reason, message)`: the pod is Pending with its containers in
        state.waiting (ErrImagePull, ImagePullBackOff, CreateContainerConfigError, ...).
        https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-state-waiting
        """
        names = [
            c.get("name", "train")
            for c in self.job(job_name, ns)["spec"]["template"]["spec"]["containers"]
        ]
        unready = f"containers with unready status: [{' '.join(names)}]"
        if waiting is not None:
            phase = "Pending"
            state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
        elif phase == "Running":
            state = {"running": {"startedAt": timestamp()}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        running = "running" in state
        containers = {"ready": running, "started": running, "state": state}
        name = self._new_pod(
            job_name, ns, phase, containers, self._pod_conditions(running, message=unready)
        )
        if name is not None:
            with self.cond:
                self.logs[(ns, name)] = list(log)
        return name

    def set_waiting(self, pod_name, reason, message, ns="vsgd"):
        """The pod's containers go (back) to waiting, e.g. ErrImagePull -> ImagePullBackOff.
        https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-state-waiting
        """

        def change(pod):
            statuses = pod["status"].setdefault("containerStatuses", [])
            for status in statuses:
                status.update(
                    ready=False,
                    started=False,
                    state={"waiting": {"reason": reason, "message": message}},
                )
            unready = (
                "containers with unready status: [" + " ".join(s["name"] for s in statuses) + "]"
            )
            pod["status"]["conditions"] = self._pod_conditions(False, message=unready)

        return self._update_pod(pod_name, ns, change)

    def unschedulable_pod(
        self,
        job_name,
        message="0/3 nodes are available: 3 Insufficient "
        "nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No "
        "preemption victims found for incoming pod.",
        ns="vsgd",
    ):
        """A pod the scheduler cannot place: Pending, PodScheduled=False/Unschedulable, no
        containerStatuses, and a Warning FailedScheduling event on it. Returns its name.
        https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-conditions
        """
        conditions = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastProbeTime": None,
                "lastTransitionTime": timestamp(),
            }
        ]
        name = self._new_pod(job_name, ns, "Pending", None, conditions, scheduled=False)
        if name is not None:
            self.event(self.pod(name, ns), "FailedScheduling", message, "Warning", ns)
        return name

    def log(self, pod, *lines, ns="vsgd"):
        with self.cond:
            self.logs.setdefault((ns, pod), []).extend(lines)

    def end_pod(self, pod, exit_code, reason=None, ns="vsgd", message=None):
        """The pod's containers exit. `message` is what the kubelet puts in
        state.terminated.message from terminationMessagePath (or the log tail with
        FallbackToLogsOnError).
        https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/
        """
        phase = "Succeeded" if exit_code == 0 else "Failed"

        def change(obj):
            obj["status"]["phase"] = phase
            for status in obj["status"].get("containerStatuses", []):
                terminated = {
                    "exitCode": exit_code,
                    "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                    "finishedAt": timestamp(),
                }
                started = (status.get("state") or {}).get("running", {}).get("startedAt")
                if started:
                    terminated["startedAt"] = started
                if message is not None:
                    terminated["message"] = message
                status.update(ready=False, started=False, state={"terminated": terminated})
            for cond in obj["status"].get("conditions", []):
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond.update(status="False", reason="PodCompleted", message="")

        self._update_pod(pod, ns, change)

    def pod_failed(self, job_name, pod, exit_code=1, reason="Error", ns="vsgd", message=None):
        """One attempt failed; the Job goes on (status.failed counts it)."""
        self.end_pod(pod, exit_code, reason, ns, message)
        self._update_job(
            job_name,
            ns,
            lambda j: j["status"].update(active=0, failed=j["status"].get("failed", 0) + 1),
        )

    # Conditions in the 1.31+ order: SuccessCriteriaMet / FailureTarget first (pods are then
    # terminated), Complete / Failed only once every pod has terminated.
    # https://kubernetes.io/docs/concepts/workloads/controllers/job/#termination-of-job-pods

    def complete(self, job_name, ns="vsgd", terminal=True):
        """The Job succeeded. terminal=False: only SuccessCriteriaMet (`finalize` adds
        Complete)."""
        message = "Reached expected number of succeeded pods"

        def change(job):
            job["status"].update(active=0, succeeded=1, ready=0)
            set_condition(job, "SuccessCriteriaMet", "True", "CompletionsReached", message)
            if terminal:
                job["status"]["completionTime"] = timestamp()
                set_condition(job, "Complete", "True", "CompletionsReached", message)

        for pod in self.pods_of(job_name, ns):
            if pod["status"]["phase"] == "Running":
                self.end_pod(pod["metadata"]["name"], 0, ns=ns)
        return self._update_job(job_name, ns, change)

    def fail(self, job_name, reason, message="", ns="vsgd", terminal=True):
        """The Job failed. terminal=False: only FailureTarget, and its active pods are being
        terminated (deletionTimestamp set); `finalize` removes them and adds Failed."""

        def change(job):
            job["status"].update(active=0, failed=job["status"].get("failed", 0) + 1)
            set_condition(job, "FailureTarget", "True", reason, message)
            if terminal:
                set_condition(job, "Failed", "True", reason, message)
            else:
                self._recount(job)

        if not terminal:
            for pod in self.pods_of(job_name, ns):
                if pod["status"]["phase"] in ("Pending", "Running"):
                    self._update_pod(
                        pod["metadata"]["name"],
                        ns,
                        lambda p: p["metadata"].update(
                            deletionTimestamp=timestamp(), deletionGracePeriodSeconds=30
                        ),
                    )
        return self._update_job(job_name, ns, change)

    def finalize(self, job_name, ns="vsgd"):
        """Every pod has terminated: add Complete after SuccessCriteriaMet, or Failed after
        FailureTarget (same reason and message)."""
        job = self.job(job_name, ns)
        for pod in self._owned(job["metadata"]["uid"], ns):
            if pod["metadata"].get("deletionTimestamp"):
                self._put("pods", pod, "DELETED")
        success, failure = condition(job, "SuccessCriteriaMet"), condition(job, "FailureTarget")
        if not (success or failure):
            raise ValueError(f"Job {job_name} has neither SuccessCriteriaMet nor FailureTarget")

        def change(j):
            self._recount(j)
            if success:
                j["status"]["completionTime"] = timestamp()
                set_condition(j, "Complete", "True", success["reason"], success["message"])
            else:
                set_condition(j, "Failed", "True", failure["reason"], failure["message"])

        return self._update_job(job_name, ns, change)

    def _suspend_changed(self, job_name, ns, suspended):
        """The Job controller's answer to spec.suspend: suspended, its active pods are
        deleted and Suspended=True (JobSuspended); resumed, Suspended=False (JobResumed) and
        startTime is reset. Events Suspended / Resumed.
        https://kubernetes.io/docs/concepts/workloads/controllers/job/#suspending-a-job
        """
        job = self.job(job_name, ns)
        if suspended:
            for pod in self._owned(job["metadata"]["uid"], ns):
                if pod["status"]["phase"] in ("Pending", "Running"):
                    self._put("pods", pod, "DELETED")

        def change(j):
            if suspended:
                set_condition(j, "Suspended", "True", "JobSuspended", "Job suspended")
                self._recount(j)
            else:
                set_condition(j, "Suspended", "False", "JobResumed", "Job resumed")
                j["status"]["startTime"] = timestamp()

        updated = self._update_job(job_name, ns, change)
        self.event(
            updated,
            "Suspended" if suspended else "Resumed",
            "Job suspended" if suspended else "Job resumed",
            "Normal",
            ns,
        )
        return updated

    def admit(self, job_name, ns="vsgd"):
        """What Kueue does to admit a Job it holds: spec.suspend=false (one write), then the
        Job controller resumes it (another)."""
        if not (self.job(job_name, ns)["spec"].get("suspend")):
            raise ValueError(f"Job {job_name} is not suspended")

        def change(job):
            job["spec"]["suspend"] = False
            job["metadata"]["generation"] = job["metadata"].get("generation", 1) + 1

        self._update_job(job_name, ns, change)
        return self._suspend_changed(job_name, ns, False)

    def delete_job(self, name, ns="vsgd"):
        with self.cond:
            job = copy.deepcopy(self.objects["jobs"].get((ns, name)))
        if job is None:
            return None
        for pod in self.pods_of(name, ns):
            self._put("pods", pod, "DELETED")
        return self._put("jobs", job, "DELETED")

    def _delete_job(self, job, policy):
        """A DELETE through the API. batch/v1 Jobs orphan their pods unless told otherwise
        ("unmanaged jobs ... have a default deletion policy of orphanDependents":
        https://kubernetes.io/docs/concepts/workloads/controllers/job/#ttl-mechanism-for-finished-jobs);
        the cascading policies follow
        https://kubernetes.io/docs/concepts/architecture/garbage-collection/#cascading-deletion
        Returns the object the API answers with (None: a Status)."""
        name, ns, uid = (
            job["metadata"]["name"],
            job["metadata"]["namespace"],
            job["metadata"]["uid"],
        )
        if policy == "Background":  # gone now; the garbage collector deletes the pods after
            self._put("jobs", job, "DELETED")
            self._later(self.gc_delay, self._gc_pods, uid, ns, False)
            return None
        finalizer = "foregroundDeletion" if policy == "Foreground" else "orphan"

        def mark(j):
            j["metadata"].update(deletionTimestamp=timestamp(), deletionGracePeriodSeconds=0)
            j["metadata"]["finalizers"] = [*j["metadata"].get("finalizers", []), finalizer]

        marked = self._update_job(name, ns, mark)
        self._later(
            self.gc_delay, self._gc_finish, name, ns, uid, policy == "Orphan" or policy is None
        )
        return marked

    def _gc_pods(self, uid, ns, orphan):
        for pod in self._owned(uid, ns):
            if orphan:  # the dependents lose their ownerReference and stay
                self._update_pod(
                    pod["metadata"]["name"],
                    ns,
                    lambda p: p["metadata"].update(
                        ownerReferences=[
                            r for r in p["metadata"]["ownerReferences"] if r.get("uid") != uid
                        ]
                    ),
                )
            else:
                self._put("pods", pod, "DELETED")

    def _gc_finish(self, name, ns, uid, orphan):
        self._gc_pods(uid, ns, orphan)
        with self.cond:
            job = copy.deepcopy(self.objects["jobs"].get((ns, name)))
        if job is not None and job["metadata"]["uid"] == uid:
            job["metadata"]["finalizers"] = [
                f
                for f in job["metadata"]["finalizers"]
                if f not in ("orphan", "foregroundDeletion")
            ]
            self._put("jobs", job, "DELETED")  # last finalizer gone: the object goes

    def pods_of(self, job_name, ns="vsgd"):
        job = self.job(job_name, ns)
        uid = job and job["metadata"]["uid"]
        with self.cond:
            return [
                copy.deepcopy(p)
                for (n, _), p in self.objects["pods"].items()
                if n == ns
                and p["metadata"]["labels"].get("job-name") == job_name
                and (uid is None or p["metadata"]["labels"].get("controller-uid", uid) == uid)
            ]


def log_refusal(pod, container):
    """Why the log of `container` cannot be read (a 400 Bad Request), or None: the API
    server's own checks (a pod not yet on a node, a container it does not have), then the
    kubelet's (validateContainerLogStatus), whose error the API server passes on as a 400:
    `kubectl logs` shows it as "Error from server (BadRequest): container "train" in pod
    "x" is waiting to start: ContainerCreating".
    https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#get-read-log-of-the-specified-pod
    """
    name = pod["metadata"]["name"]
    names = [c["name"] for c in pod["spec"].get("containers") or []]
    if container is None:
        if len(names) != 1:
            return (
                f"a container name must be specified for pod {name}, choose one of: "
                f"[{' '.join(names)}]"
            )
        container = names[0]
    elif container not in names:
        return f"container {container} is not valid for pod {name}"
    if not pod["spec"].get("nodeName"):
        return f"pod {name} does not have a host assigned"
    status = next(
        (
            s
            for s in (pod.get("status") or {}).get("containerStatuses") or []
            if s.get("name") == container
        ),
        None,
    )
    if status is None:
        return f'container "{container}" in pod "{name}" is not available'
    state, last = status.get("state") or {}, status.get("lastState") or {}
    if state.get("running") or state.get("terminated") or last.get("terminated"):
        return None
    reason = (state.get("waiting") or {}).get("reason")
    if reason is None:
        return f'container "{container}" in pod "{name}" is waiting to start - no logs yet'
    why = {
        "ErrImagePull": "image can't be pulled",
        "ImagePullBackOff": "trying and failing to pull image",
    }.get(reason, reason)
    return f'container "{container}" in pod "{name}" is waiting to start: {why}'
