"""The fake API server (tests/fake_k8s/) driven by the official client only, configured
from the fake's kubeconfig: each test pins one behaviour the executor's tests rely on. The
server keeps real time here (watch timeouts through urllib3 included), except where a test
says otherwise."""

import json
import threading
import time
from pathlib import Path

import pytest
import urllib3
import yaml
from fake_k8s import FakeKube, ScaledClock
from fake_k8s.selectors import matches
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

NS = "vsgd"


@pytest.fixture
def kube():
    fake = FakeKube()
    fake.url = fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def api(kube):
    api = config.new_client_from_config_dict(kube.kubeconfig(kube.url))
    yield api
    api.close()


@pytest.fixture
def batch(api):
    return client.BatchV1Api(api)


@pytest.fixture
def core(api):
    return client.CoreV1Api(api)


def job_body(name, suspend=None, labels=None):
    spec = {
        "backoffLimit": 0,
        "template": {
            "metadata": {"labels": {"app": "t", **(labels or {})}},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": "vsgd-train",
                "containers": [{"name": "train", "image": "vsgd:1"}],
            },
        },
    }
    if suspend is not None:
        spec["suspend"] = suspend
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "t", **(labels or {})}},
        "spec": spec,
    }


def eventually(check, timeout=3.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        else:
            if result is not False:
                return result
            if time.monotonic() > deadline:
                raise AssertionError("condition never became true")
        time.sleep(0.02)


def conditions(job):
    return [(c["type"], c["status"], c["reason"]) for c in job["status"].get("conditions", [])]


# -- faults ---------------------------------------------------------------------------------


def test_429_is_plain_text_with_retry_after(kube, batch):
    kube.outage("429", count=1, retry_after=7)
    with pytest.raises(ApiException) as caught:  # POST: urllib3 does not retry it
        batch.create_namespaced_job(NS, job_body("a"), _request_timeout=2)
    assert caught.value.status == 429
    assert caught.value.headers["Retry-After"] == "7"
    assert caught.value.body.startswith("Too many requests")
    assert kube.faulted == [("POST", "/apis/batch/v1/namespaces/vsgd/jobs", "429")]
    assert kube.outage_over()
    batch.create_namespaced_job(NS, job_body("a"), _request_timeout=2)


def test_urllib3_retries_a_get_after_retry_after_by_itself(kube, batch):
    kube.outage("429", count=1, retry_after=0)
    batch.list_namespaced_job(NS, _request_timeout=2)  # no exception: retried once
    assert [f[2] for f in kube.faulted] == ["429"]
    assert kube.requests.count(("GET", "/apis/batch/v1/namespaces/vsgd/jobs")) == 2


def test_503_and_500_answer_a_status_and_match_selects_requests(kube, batch, core):
    kube.outage("503", count=1, match=lambda method, path: "/pods" in path)
    kube.outage("500", count=1, match=lambda method, path: method == "POST")
    with pytest.raises(ApiException) as caught:
        core.list_namespaced_pod(NS, _request_timeout=2)
    assert caught.value.status == 503
    assert json.loads(caught.value.body)["reason"] == "ServiceUnavailable"
    batch.list_namespaced_job(NS, _request_timeout=2)  # not matched
    with pytest.raises(ApiException) as caught:
        batch.create_namespaced_job(NS, job_body("a"), _request_timeout=2)
    assert caught.value.status == 500 and json.loads(caught.value.body)["reason"] == "InternalError"
    eventually(kube.outage_over)
    core.list_namespaced_pod(NS, _request_timeout=2)


def test_a_watch_in_a_fault_answers_the_fault(kube, batch):
    kube.outage("503", count=1)
    with pytest.raises(ApiException) as caught:
        list(
            watch.Watch().stream(
                batch.list_namespaced_job, NS, timeout_seconds=1, _request_timeout=3
            )
        )
    assert caught.value.status == 503
    assert kube.watch_starts == []


def test_reset_drops_the_connection_without_an_answer(kube, batch):
    kube.outage("reset", count=1)
    with pytest.raises((urllib3.exceptions.HTTPError, OSError)):
        batch.create_namespaced_job(NS, job_body("a"), _request_timeout=2)
    assert kube.job("a") is None and kube.outage_over()
    batch.create_namespaced_job(NS, job_body("a"), _request_timeout=2)


def test_refused_then_listening_again_on_the_same_port(kube, batch):
    batch.create_namespaced_job(NS, job_body("a"), _request_timeout=2)
    cut = []

    def follow():
        try:
            for _ in watch.Watch().stream(
                batch.list_namespaced_job, NS, resource_version=str(kube.rv), _request_timeout=5
            ):
                pass
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            cut.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    eventually(lambda: kube.watch_starts)
    kube.outage("refused", seconds=0.5)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as caught:
        batch.list_namespaced_job(NS, _request_timeout=2)
    assert isinstance(caught.value.reason, urllib3.exceptions.NewConnectionError)
    thread.join(3)
    assert cut, "the open watch was not cut"
    eventually(kube.outage_over)
    assert [j.metadata.name for j in batch.list_namespaced_job(NS, _request_timeout=2).items] == [
        "a"
    ]


def test_its_clock_times_faults_and_watches():
    """Faults of N seconds and a watch's timeoutSeconds last N seconds of the server's clock:
    here one that runs 20 times faster than real time."""
    clock = ScaledClock(20)
    fake = FakeKube(clock=clock)
    api = config.new_client_from_config_dict(fake.kubeconfig(fake.start()))
    batch = client.BatchV1Api(api)
    try:
        fake.outage("503", seconds=4)
        assert not fake.outage_over()
        clock.sleep(4)
        assert fake.outage_over()
        started = time.monotonic()
        assert (
            list(
                watch.Watch().stream(
                    batch.list_namespaced_job, NS, timeout_seconds=4, _request_timeout=10
                )
            )
            == []
        )
        assert time.monotonic() - started < 2  # 4 s of its clock, 0.2 s of real time
    finally:
        api.close()
        fake.stop()


# -- watches --------------------------------------------------------------------------------


def _watch_in_thread(batch, events, **kwargs):
    def run():
        try:
            for event in watch.Watch().stream(batch.list_namespaced_job, NS, **kwargs):
                events.append(event)
        except ApiException as exc:
            events.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_bookmarks_go_to_the_watches_that_asked(kube, batch):
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    asked, not_asked = [], []
    threads = [
        _watch_in_thread(
            batch, asked, resource_version=rv, timeout_seconds=1, allow_watch_bookmarks=True
        ),
        _watch_in_thread(batch, not_asked, resource_version=rv, timeout_seconds=1),
    ]
    eventually(lambda: len(kube.watch_starts) == 2)
    kube.bookmark()
    for thread in threads:
        thread.join(3)
    [bookmark] = asked
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["raw_object"] == {
        "kind": "Job",
        "apiVersion": "batch/v1",
        "metadata": {"resourceVersion": str(kube.rv)},
    }
    assert not_asked == []


def test_expired_watch_ends_with_410_and_cannot_resume(kube, batch):
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    events = []
    thread = _watch_in_thread(batch, events, resource_version=rv, timeout_seconds=5)
    eventually(lambda: kube.watch_starts)
    started = time.monotonic()
    kube.expire_watches()
    thread.join(3)
    assert time.monotonic() - started < 2  # the stream ended, not the timeout
    [error] = events
    assert isinstance(error, ApiException) and error.status == 410
    with pytest.raises(ApiException) as caught:  # resuming from the old version: 410 too
        list(
            watch.Watch().stream(
                batch.list_namespaced_job, NS, resource_version=rv, timeout_seconds=1
            )
        )
    assert caught.value.status == 410


# -- Jobs -----------------------------------------------------------------------------------


def test_conditions_in_the_1_31_order_with_finalize(kube, batch):
    batch.create_namespaced_job(NS, job_body("f"))
    pod = kube.start_pod("f")
    kube.fail(
        "f", "BackoffLimitExceeded", "Job has reached the specified backoff limit", terminal=False
    )
    job = batch.read_namespaced_job("f", NS).to_dict()
    assert [c["type"] for c in job["status"]["conditions"]] == ["FailureTarget"]
    assert kube.pod(pod)["metadata"]["deletionTimestamp"]  # still terminating
    kube.finalize("f")
    job = kube.job("f")
    assert conditions(job) == [
        ("FailureTarget", "True", "BackoffLimitExceeded"),
        ("Failed", "True", "BackoffLimitExceeded"),
    ]
    assert (
        job["status"]["conditions"][1]["message"] == "Job has reached the specified backoff limit"
    )
    assert kube.pod(pod) is None

    batch.create_namespaced_job(NS, job_body("s"))
    kube.start_pod("s")
    kube.complete("s", terminal=False)
    assert [c[0] for c in conditions(kube.job("s"))] == ["SuccessCriteriaMet"]
    assert "completionTime" not in kube.job("s")["status"]
    kube.finalize("s")
    job = batch.read_namespaced_job("s", NS)
    assert [c.type for c in job.status.conditions] == ["SuccessCriteriaMet", "Complete"]
    assert job.status.completion_time is not None


def test_suspended_job_has_no_pod_until_admitted_and_patch_suspends_it(kube, batch, core):
    batch.create_namespaced_job(NS, job_body("q", suspend=True))
    job = kube.job("q")
    assert conditions(job) == [("Suspended", "True", "JobSuspended")]
    assert job["status"]["conditions"][0]["message"] == "Job suspended"
    assert "startTime" not in job["status"] and kube.pods_of("q") == []
    kube.admit("q")
    job = batch.read_namespaced_job("q", NS)
    assert job.spec.suspend is False and job.status.start_time is not None
    assert [(c.type, c.status, c.reason) for c in job.status.conditions] == [
        ("Suspended", "False", "JobResumed")
    ]
    pod = kube.start_pod("q")
    patched = batch.patch_namespaced_job("q", NS, {"spec": {"suspend": True}})
    assert patched.spec.suspend is True and patched.metadata.generation == 3
    assert conditions(kube.job("q")) == [("Suspended", "True", "JobSuspended")]
    assert kube.pod(pod) is None and kube.job("q")["status"]["active"] == 0
    events = {e.reason: e.count for e in core.list_namespaced_event(NS).items}
    assert events == {"Suspended": 2, "Resumed": 1}  # the same event again is counted


def test_patch_keeps_the_kubectl_annotation_merge(kube, batch):
    batch.create_namespaced_job(NS, job_body("p"))
    batch.patch_namespaced_job("p", NS, {"metadata": {"annotations": {"a": "1"}}})
    batch.patch_namespaced_job(
        "p", NS, {"metadata": {"annotations": {"b": "2"}, "labels": {"app": None}}}
    )
    meta = kube.job("p")["metadata"]
    assert meta["annotations"] == {"a": "1", "b": "2"} and "app" not in meta["labels"]
    assert meta["generation"] == 1  # metadata only


def test_delete_policies(kube, batch, core):
    pods = {}
    for name in ("orphan", "background", "foreground"):
        batch.create_namespaced_job(NS, job_body(name))
        pods[name] = kube.start_pod(name)

    _, code, headers = batch.delete_namespaced_job_with_http_info("orphan", NS)
    assert code == 200 and "child pods are preserved" in headers["Warning"]
    eventually(lambda: kube.job("orphan") is None)
    orphan = core.read_namespaced_pod(pods["orphan"], NS)
    assert not orphan.metadata.owner_references  # left behind, ownerless

    batch.delete_namespaced_job("background", NS, propagation_policy="Background")
    assert kube.job("background") is None  # at once
    eventually(lambda: kube.pod(pods["background"]) is None)

    answer = batch.delete_namespaced_job(
        "foreground", NS, body=client.V1DeleteOptions(propagation_policy="Foreground")
    )
    # The client returns a dict here: the Job, still there while it is being deleted.
    assert answer["kind"] == "Job" and answer["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert answer["metadata"]["deletionTimestamp"]
    eventually(lambda: kube.job("foreground") is None)
    assert kube.pod(pods["foreground"]) is None
    assert kube.deletions == [
        ("orphan", None),
        ("background", "Background"),
        ("foreground", "Foreground"),
    ]
    types = [
        (e[2], e[3]["metadata"]["name"])
        for e in kube.history
        if e[1] == "jobs" and e[3]["metadata"]["name"] == "foreground"
    ]
    assert [t for t, _ in types] == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]


def test_dry_run_stores_nothing(kube, batch):
    created = []
    kube.on_create = created.append
    rv = kube.rv
    answer = batch.create_namespaced_job(NS, job_body("d"), dry_run="All")
    assert answer.metadata.name == "d" and answer.metadata.uid
    assert kube.jobs() == [] and kube.rv == rv and kube.dry_runs == ["d"]
    batch.create_namespaced_job(NS, job_body("d"))
    with pytest.raises(ApiException) as caught:
        batch.create_namespaced_job(NS, job_body("d"), dry_run="All")
    assert caught.value.status == 409
    kube.reject_create = lambda job: (403, "Forbidden", "exceeded quota: q")
    with pytest.raises(ApiException) as caught:
        batch.create_namespaced_job(NS, job_body("e"), dry_run="All")
    assert caught.value.status == 403
    time.sleep(0.1)
    assert [j["metadata"]["name"] for j in created] == ["d"]


def test_namespaces(kube, batch, core):
    with pytest.raises(ApiException) as caught:
        batch.create_namespaced_job("nope", job_body("a"))
    assert caught.value.status == 404
    assert json.loads(caught.value.body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'namespaces "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "kind": "namespaces"},
        "code": 404,
    }
    assert core.read_namespace(NS).status.phase == "Active"
    with pytest.raises(ApiException) as caught:
        core.read_namespace("nope")
    assert caught.value.status == 404


def test_serviceaccounts_secrets_configmaps(kube, core):
    assert core.read_namespaced_service_account("vsgd-train", NS).metadata.name == "vsgd-train"
    assert core.read_namespaced_config_map("vsgd-endpoints", NS).data
    kube.add_object("secrets", "extra", data={"k": "v"})
    assert core.read_namespaced_secret("extra", NS).data == {"k": "dg=="}
    kube.remove_object("serviceaccounts", "vsgd-train")
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_service_account("vsgd-train", NS)
    assert caught.value.status == 404
    assert json.loads(caught.value.body)["message"] == 'serviceaccounts "vsgd-train" not found'


# -- authorization --------------------------------------------------------------------------


def test_denied_requests_get_the_rbac_message(kube, api, batch, core):
    batch.create_namespaced_job(NS, job_body("a"))
    pod = kube.start_pod("a")
    kube.denied = {
        ("create", "batch", "jobs"),
        ("list", "", "pods"),
        ("get", "", "pods/log"),
        ("watch", "batch", "jobs"),
    }
    cases = [
        (
            lambda: batch.create_namespaced_job(NS, job_body("b")),
            'jobs.batch is forbidden: User "fake" cannot create resource "jobs" in API group '
            '"batch" in the namespace "vsgd"',
        ),
        (
            lambda: core.list_namespaced_pod(NS),
            'pods is forbidden: User "fake" cannot list resource "pods" in API group "" in the '
            'namespace "vsgd"',
        ),
        (
            lambda: core.read_namespaced_pod_log(pod, NS),
            f'pods "{pod}" is forbidden: User "fake" cannot get resource "pods/log" in API group '
            f'"" in the namespace "vsgd"',
        ),
        (
            lambda: list(watch.Watch().stream(batch.list_namespaced_job, NS, timeout_seconds=1)),
            'jobs.batch is forbidden: User "fake" cannot watch resource "jobs" in API group '
            '"batch" in the namespace "vsgd"',
        ),
    ]
    for call, message in cases:
        with pytest.raises(ApiException) as caught:
            call()
        assert caught.value.status == 403
        assert json.loads(caught.value.body)["message"] == message
    batch.read_namespaced_job("a", NS)  # get is not denied

    authz = client.AuthorizationV1Api(api)

    def review(verb, resource, group="", subresource=None):
        body = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    namespace=NS, verb=verb, group=group, resource=resource, subresource=subresource
                )
            )
        )
        return authz.create_self_subject_access_review(body).status.allowed

    assert review("create", "jobs", "batch") is False
    assert review("get", "jobs", "batch") is True
    assert review("get", "pods", subresource="log") is False
    assert [(r["verb"], r["resource"]) for r in kube.access_reviews] == [
        ("create", "jobs"),
        ("get", "jobs"),
        ("get", "pods"),
    ]


# -- events, pods ---------------------------------------------------------------------------


def test_events_and_field_selectors(kube, batch, core):
    job = batch.create_namespaced_job(NS, job_body("a"))
    message = (
        'pods "a-abcde" is forbidden: error looking up service account vsgd/vsgd-train: '
        'serviceaccount "vsgd-train" not found'
    )
    kube.refuse_pods("a", message)
    kube.refuse_pods("a", message)  # the same again: counted
    pod = kube.start_pod("a")
    kube.event(kube.pod(pod), "BackOff", "Back-off pulling image")
    assert kube.pods_of("a")[0]["metadata"]["name"] == pod
    [event] = core.list_namespaced_event(
        NS, field_selector=f"involvedObject.uid={job.metadata.uid},reason=FailedCreate"
    ).items
    assert event.message == "Error creating: " + message and event.count == 2
    assert event.type == "Warning" and event.source.component == "job-controller"
    assert event.involved_object.kind == "Job" and event.metadata.name.startswith("a.")
    [event] = core.list_namespaced_event(NS, field_selector="involvedObject.kind=Pod").items
    assert event.source.component == "kubelet" and event.reason == "BackOff"
    assert len(core.list_namespaced_event(NS, field_selector="type!=Normal").items) == 2
    with pytest.raises(ApiException) as caught:
        core.list_namespaced_event(NS, field_selector="message=x")
    assert caught.value.status == 400
    assert json.loads(caught.value.body)["message"] == "field label not supported: message"


def test_waiting_reasons_scheduling_and_termination_messages(kube, batch, core):
    batch.create_namespaced_job(NS, job_body("w"))
    pull = kube.start_pod("w", waiting=("ErrImagePull", 'failed to pull image "vsgd:1"'))
    read = core.read_namespaced_pod(pull, NS)
    assert read.status.phase == "Pending"
    assert read.status.container_statuses[0].state.waiting.reason == "ErrImagePull"
    assert kube.job("w")["status"]["active"] == 1  # a Pending pod is active
    kube.set_waiting(pull, "ImagePullBackOff", 'Back-off pulling image "vsgd:1"')
    state = core.read_namespaced_pod(pull, NS).status.container_statuses[0].state
    assert state.waiting.reason == "ImagePullBackOff"
    meta = read.metadata
    assert meta.labels["batch.kubernetes.io/job-name"] == meta.labels["job-name"] == "w"
    uid = kube.job("w")["metadata"]["uid"]
    assert meta.labels["batch.kubernetes.io/controller-uid"] == meta.labels["controller-uid"] == uid
    assert [(r.kind, r.name, r.uid, r.controller) for r in meta.owner_references] == [
        ("Job", "w", uid, True)
    ]

    stuck = kube.unschedulable_pod("w")
    read = core.read_namespaced_pod(stuck, NS)
    assert read.status.phase == "Pending" and read.status.container_statuses is None
    [scheduled] = read.status.conditions
    assert (scheduled.type, scheduled.status, scheduled.reason) == (
        "PodScheduled",
        "False",
        "Unschedulable",
    )
    assert "Insufficient nvidia.com/gpu" in scheduled.message
    [event] = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={stuck}").items
    assert (event.reason, event.source.component) == ("FailedScheduling", "default-scheduler")
    assert kube.job("w")["status"]["active"] == 2

    kube.pod_failed("w", pull, exit_code=137, reason="OOMKilled", message="out of memory")
    terminated = core.read_namespaced_pod(pull, NS).status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason, terminated.message) == (
        137,
        "OOMKilled",
        "out of memory",
    )


def test_label_selectors(kube, batch):
    for name, tier in (("x", "a"), ("y", "b"), ("z", None)):
        batch.create_namespaced_job(NS, job_body(name, labels={"tier": tier} if tier else {}))

    def names(selector):
        return sorted(
            j.metadata.name for j in batch.list_namespaced_job(NS, label_selector=selector).items
        )

    assert names("tier in (a, b)") == ["x", "y"]
    assert names("tier notin (a)") == ["y", "z"]
    assert names("!tier") == ["z"]
    assert names("app=t,tier") == ["x", "y"]
    assert names("tier!=a") == ["y", "z"]
    assert matches({"k": "v"}, "k in (v),k==v,!other")


# -- as strict as a real API server ---------------------------------------------------------


def test_dry_run_runs_admission(kube, batch, core):
    """A dry run is validated and admitted exactly like the create it stands for, and
    persists nothing (KEP-576): https://kubernetes.io/docs/reference/using-api/api-concepts/#dry-run
    """
    invalid = job_body("Bad_Name")
    invalid["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    with pytest.raises(ApiException) as caught:
        batch.create_namespaced_job(NS, invalid, dry_run="All")
    assert caught.value.status == 422
    message = json.loads(caught.value.body)["message"]
    assert message.startswith(
        'Job.batch "Bad_Name" is invalid: [metadata.name: Invalid value: '
        '"Bad_Name": a lowercase RFC 1123 subdomain must consist of'
    )
    assert (
        'spec.template.spec.restartPolicy: Unsupported value: "Always": supported values: '
        '"OnFailure", "Never"' in message
    )

    # ResourceQuota: checked by a dry run, nothing reserved by one.
    kube.add_quota("two-jobs", {"count/jobs.batch": 2})
    batch.create_namespaced_job(NS, job_body("a"))
    batch.create_namespaced_job(NS, job_body("b"), dry_run="All")
    batch.create_namespaced_job(NS, job_body("c"), dry_run="All")  # b reserved nothing
    batch.create_namespaced_job(NS, job_body("b"))
    for name, dry_run in (("c", "All"), ("c", None), ("a", "All")):  # full; "a" exists too,
        with pytest.raises(ApiException) as caught:  # but quota comes first
            batch.create_namespaced_job(NS, job_body(name), dry_run=dry_run)
        assert caught.value.status == 403
        assert json.loads(caught.value.body)["message"] == (
            f'jobs.batch "{name}" is forbidden: exceeded quota: two-jobs, requested: '
            f"count/jobs.batch=1, used: count/jobs.batch=2, limited: count/jobs.batch=2"
        )
    quota = core.read_namespaced_resource_quota("two-jobs", NS)
    assert quota.status.used == {"count/jobs.batch": "2"}
    assert sorted(j["metadata"]["name"] for j in kube.jobs()) == ["a", "b"]
    kube.delete_job("a")
    kube.delete_job("b")

    # Pod Security: a Job's pod template is warned about (warn mode), its pods refused
    # (enforce mode applies to pods only).
    # https://kubernetes.io/docs/concepts/security/pod-security-admission/#workload-resources-and-pod-templates
    kube.label_namespace(
        NS,
        {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted",
        },
    )
    _, code, headers = batch.create_namespaced_job_with_http_info(NS, job_body("p"), dry_run="All")
    assert code == 201 and headers["Warning"].startswith(
        '299 - "would violate PodSecurity \\"restricted:latest\\": '
    )
    assert "Privilege Escalation: containers[train]" in headers["Warning"]
    _, code, headers = batch.create_namespaced_job_with_http_info(NS, job_body("p"))
    assert code == 201 and "would violate PodSecurity" in headers["Warning"]
    assert kube.start_pod("p") is None and kube.pods_of("p") == []
    [event] = core.list_namespaced_event(NS, field_selector="reason=FailedCreate").items
    assert (
        event.message.startswith('Error creating: pods "p-')
        and 'is forbidden: violates PodSecurity "restricted:latest": ' in event.message
    )

    # A webhook is told whether the request is a dry run; a dry run stores nothing.
    seen = []
    kube.webhook = lambda job, dry_run: seen.append((job["metadata"]["name"], dry_run))
    batch.create_namespaced_job(NS, job_body("w"), dry_run="All")
    assert seen == [("w", True)] and kube.job("w") is None
    assert kube.dry_runs == ["b", "c", "p", "w"]


def test_a_pod_over_its_quota_is_refused_with_failed_create(kube, batch, core):
    """Quota on pods is the Job controller's problem: the Job is admitted, its pod is not.
    https://kubernetes.io/docs/concepts/policy/resource-quotas/#compute-resource-quota"""
    kube.add_quota("gpus", {"requests.nvidia.com/gpu": 1, "requests.memory": "16Gi"})
    for name in ("a", "b"):
        body = job_body(name)
        body["spec"]["template"]["spec"]["containers"][0]["resources"] = {
            "limits": {"nvidia.com/gpu": "1", "memory": "8Gi"}
        }
        batch.create_namespaced_job(NS, body)
    assert kube.start_pod("a") is not None
    assert kube.start_pod("b") is None
    [event] = core.list_namespaced_event(NS, field_selector="reason=FailedCreate").items
    assert event.involved_object.name == "b" and event.message.startswith(
        'Error creating: pods "b-'
    )
    assert event.message.endswith(
        " is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, used: "
        "requests.nvidia.com/gpu=1, limited: requests.nvidia.com/gpu=1"
    )
    assert core.read_namespaced_resource_quota("gpus", NS).status.used == {
        "requests.nvidia.com/gpu": "1",
        "requests.memory": "8Gi",
    }


def test_rbac_honours_resource_names(kube, api, batch, core):
    """A Role grants in its namespace only, and a rule with resourceNames grants requests
    naming one of them: never a create, a list only with a metadata.name field selector.
    https://kubernetes.io/docs/reference/access-authn-authz/rbac/#referring-to-resources"""
    rbac = Path(__file__).resolve().parent.parent / "k8s" / "base" / "launcher-rbac.yaml"
    [role] = [d for d in yaml.safe_load_all(rbac.read_text()) if d["kind"] == "Role"]
    kube.add_object("secrets", "regcred")
    kube.add_object("secrets", "vsgd-credentials", ns="default")
    kube.bind_role(role["rules"], NS)
    kube.bind_role(
        [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "verbs": ["list"],
                "resourceNames": ["vsgd-endpoints"],
            }
        ],
        NS,
    )

    core.read_namespaced_secret("vsgd-credentials", NS)  # named in the Role
    core.list_namespaced_config_map(NS, field_selector="metadata.name=vsgd-endpoints")
    batch.create_namespaced_job(NS, job_body("a"))
    forbidden = [
        (
            lambda: core.list_namespaced_config_map(NS),
            'configmaps is forbidden: User "fake" cannot list resource "configmaps" in API '
            'group "" in the namespace "vsgd"',
        ),
        (
            lambda: core.read_namespaced_secret("regcred", NS),
            'secrets "regcred" is forbidden: User "fake" cannot get resource "secrets" in API '
            'group "" in the namespace "vsgd"',
        ),
        (
            lambda: core.list_namespaced_secret(NS),
            'secrets is forbidden: User "fake" cannot list resource "secrets" in API group "" '
            'in the namespace "vsgd"',
        ),
        (
            lambda: core.read_namespaced_secret("vsgd-credentials", "default"),
            'secrets "vsgd-credentials" is forbidden: User "fake" cannot get resource "secrets" '
            'in API group "" in the namespace "default"',
        ),
        (
            lambda: batch.list_namespaced_job("default"),
            'jobs.batch is forbidden: User "fake" cannot list resource "jobs" in API group '
            '"batch" in the namespace "default"',
        ),
    ]
    for call, message in forbidden:
        with pytest.raises(ApiException) as caught:
            call()
        assert caught.value.status == 403
        assert json.loads(caught.value.body)["message"] == message

    authz = client.AuthorizationV1Api(api)

    def review(verb, resource, name=None, namespace=NS):
        body = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace, verb=verb, resource=resource, name=name
                )
            )
        )
        return authz.create_self_subject_access_review(body).status.allowed

    assert review("get", "secrets", "vsgd-credentials") is True
    assert review("get", "secrets", "regcred") is False
    assert review("get", "secrets") is False
    assert review("get", "secrets", "vsgd-credentials", "default") is False


def test_logs_of_a_waiting_container_are_a_400(kube, batch, core):
    """The kubelet has no log of a container that has not started, and says why; the API
    server answers 400 Bad Request with its words (`kubectl logs`: "Error from server
    (BadRequest): container "train" in pod "x" is waiting to start: ContainerCreating")."""
    batch.create_namespaced_job(NS, job_body("w"))

    def refusal(pod, **kwargs):
        with pytest.raises(ApiException) as caught:
            core.read_namespaced_pod_log(pod, NS, **kwargs)
        assert caught.value.status == 400
        body = json.loads(caught.value.body)
        assert body["reason"] == "BadRequest"
        return body["message"]

    pod = kube.start_pod("w", phase="Pending")
    assert (
        refusal(pod, container="train")
        == f'container "train" in pod "{pod}" is waiting to start: ContainerCreating'
    )
    kube.set_waiting(pod, "ErrImagePull", "not found")
    assert (
        refusal(pod) == f'container "train" in pod "{pod}" is waiting to start: image '
        f"can't be pulled"
    )
    kube.set_waiting(pod, "ImagePullBackOff", "Back-off")
    assert (
        refusal(pod) == f'container "train" in pod "{pod}" is waiting to start: trying '
        f"and failing to pull image"
    )
    assert refusal(pod, container="other") == f"container other is not valid for pod {pod}"
    stuck = kube.unschedulable_pod("w")
    assert refusal(stuck) == f"pod {stuck} does not have a host assigned"
    running = kube.start_pod("w", log=["step 1"])
    assert core.read_namespaced_pod_log(running, NS, container="train") == "step 1\n"
    kube.end_pod(running, 1)
    assert core.read_namespaced_pod_log(running, NS) == "step 1\n"  # terminated: kept


def test_lists_are_ordered_by_name(kube, batch, core):
    """Items come back ordered by their storage key, namespace/name, whatever the order of
    creation. https://kubernetes.io/docs/reference/using-api/api-concepts/#retrieving-large-results-sets-in-chunks
    """
    for name in ("m", "z", "a", "k"):
        batch.create_namespaced_job(NS, job_body(name))
        kube.add_object("configmaps", f"cm-{name}")
    assert [j.metadata.name for j in batch.list_namespaced_job(NS).items] == ["a", "k", "m", "z"]
    assert [c.metadata.name for c in core.list_namespaced_config_map(NS).items] == [
        "cm-a",
        "cm-k",
        "cm-m",
        "cm-z",
        "vsgd-endpoints",
    ]
    added = [
        e["object"].metadata.name
        for e in watch.Watch().stream(batch.list_namespaced_job, NS, timeout_seconds=1)
    ]
    assert added == ["a", "k", "m", "z"]


def test_delete_preconditions(kube, batch):
    """DeleteOptions.preconditions: only the object with that uid is deleted, else 409.
    https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/delete-options/"""
    old = batch.create_namespaced_job(NS, job_body("d")).metadata.uid
    kube.delete_job("d")
    new = batch.create_namespaced_job(NS, job_body("d")).metadata.uid
    with pytest.raises(ApiException) as caught:
        batch.delete_namespaced_job(
            "d",
            NS,
            body=client.V1DeleteOptions(
                propagation_policy="Background", preconditions=client.V1Preconditions(uid=old)
            ),
        )
    assert caught.value.status == 409
    status = json.loads(caught.value.body)
    assert status["reason"] == "Conflict" and status["message"].startswith(
        'Operation cannot be fulfilled on jobs.batch "d": StorageError: invalid object'
    )
    assert status["message"].endswith(
        f"Precondition failed: UID in precondition: {old}, UID in object meta: {new}"
    )
    assert kube.job("d") is not None and kube.deletions == []
    batch.delete_namespaced_job(
        "d",
        NS,
        body=client.V1DeleteOptions(
            propagation_policy="Background", preconditions=client.V1Preconditions(uid=new)
        ),
    )
    assert kube.job("d") is None
