"""What a real GPU cluster does to the kubernetes executor, against the test API server
(tests/fake_k8s/, driven by the official client, on its faster clock `kube.clock`): pods
that cannot start, API outages, stale images, Jobs of other pipelines and of earlier grids,
Kueue queues, and the preflight that finds every problem before a GPU is used. Each test is
named after the failure it guards against.
"""

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_k8s_executor import PARAMS, api_delete, executor, grid, spec_of

from pipeline.config import ConfigError
from pipeline.contract import Detached
from pipeline.k8s.cluster import report_stale
from pipeline.k8s.render import OWNER_LABEL, STORE_LABEL, job_name, render_job
from pipeline.k8s.schema import QUEUE_LABEL

ROOT = Path(__file__).resolve().parent.parent
JOBS = "/apis/batch/v1/namespaces/vsgd/jobs"


def created(kube):
    """Jobs really created (dry runs aside)."""
    return [r for r in kube.requests if r == ("POST", JOBS)][len(kube.dry_runs) :]


def finish_ok(kube, store, specs):
    """A cluster where every Job's pod runs and completes."""

    def cluster(job):
        name = job["metadata"]["name"]
        if job["spec"].get("suspend"):
            return
        kube.start_pod(name)
        kube.clock.sleep(0.2)
        store(spec_of(job, specs))
        kube.complete(name)

    return cluster


# -- results come from the code they claim ---------------------------------------------------


def test_a_stale_image_is_reported_as_stale_and_not_retried(kube, store):
    params, specs = grid(optimizers="[vsgd]")
    message = (
        "invalid configuration: stale image: this image's code version 0123456789ab is "
        "not the launcher's 89abcdef0123 (run hash 1111 != 2222); rebuild and push "
        "the image (make image)"
    )

    def cluster(job):
        name = job["metadata"]["name"]
        pod = kube.start_pod(name, log=[message])
        kube.pod_failed(name, pod, exit_code=78, message=message)
        kube.fail(
            name,
            "PodFailurePolicy",
            f"Container train for pod vsgd/{pod} failed with "
            "exit code 78 matching FailJob rule at index 1",
        )

    kube.on_create = cluster
    [outcome] = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert not outcome.ok
    assert outcome.error.startswith("image is stale: rebuild and push")
    assert "0123456789ab" in outcome.error and "89abcdef0123" in outcome.error
    assert len(created(kube)) == 1  # one Job, one pod: nothing retried


def test_a_job_requesting_gpus_tells_the_pod_to_require_cuda(kube):
    params, specs = grid(optimizers="[vsgd]")
    env = {
        e["name"]: e.get("value")
        for e in render_job(specs[0], params)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env.get("VSGD_REQUIRE_CUDA") == "1"
    params, specs = grid("executor.kubernetes.gpus=0", optimizers="[vsgd]")
    env = {
        e["name"]: e.get("value")
        for e in render_job(specs[0], params)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "VSGD_REQUIRE_CUDA" not in env


def test_more_than_one_gpu_per_run_is_refused():
    with pytest.raises(ConfigError) as err:
        grid("executor.kubernetes.gpus=2")
    assert "executor.kubernetes.gpus" in str(err.value) and "one device" in str(err.value)


# -- nothing silent --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reasons, expected",
    [
        (
            (
                ("ErrImagePull", 'failed to pull image "vsgd-repro:gone": not found'),
                ("ImagePullBackOff", 'Back-off pulling image "vsgd-repro:gone"'),
            ),
            "ImagePullBackOff",
        ),
        (
            (("CreateContainerConfigError", 'secret "vsgd-credentials" not found'),),
            'secret "vsgd-credentials" not found',
        ),
    ],
)
def test_a_pod_that_cannot_start_fails_its_run_after_the_grace_period(
    kube, store, reasons, expected
):
    params, specs = grid("executor.kubernetes.start_grace=2", optimizers="[vsgd]")

    def cluster(job):
        name = job["metadata"]["name"]
        pod = kube.start_pod(name, waiting=reasons[0])
        for reason in reasons[1:]:
            kube.clock.sleep(0.5)
            kube.set_waiting(pod, *reason)

    kube.on_create = cluster
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert not outcome.ok and "could not start" in outcome.error
    assert expected in outcome.error
    # Given up on: its Job is deleted with its pods, not left pulling or holding quota.
    assert (job_name(specs[0], params), "Background") in kube.deletions
    assert kube.job(job_name(specs[0], params)) is None
    assert "cannot start" in out.getvalue()


def test_a_job_whose_pods_are_refused_fails_with_the_failed_create_event(kube, store):
    params, specs = grid("executor.kubernetes.start_grace=1", optimizers="[vsgd]")
    refusal = (
        'Error creating: pods "x-abcde" is forbidden: error looking up service account '
        'vsgd/vsgd-train: serviceaccount "vsgd-train" not found'
    )
    kube.on_create = lambda job: kube.refuse_pods(job["metadata"]["name"], refusal)
    [outcome] = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert not outcome.ok
    assert (
        "FailedCreate" in outcome.error and 'serviceaccount "vsgd-train" not found' in outcome.error
    )


def test_an_unschedulable_pod_waits_within_its_limit_and_fails_beyond_it(kube, store):
    params, specs = grid(
        "executor.kubernetes.start_grace=1",
        "executor.kubernetes.unschedulable_limit=3",
        optimizers="[sgd, vsgd]",
    )
    waiting, stuck = specs

    def cluster(job):
        name = job["metadata"]["name"]
        kube.unschedulable_pod(name)
        if spec_of(job, specs) is waiting:  # a GPU frees up within the limit
            kube.clock.sleep(1.5)
            kube.start_pod(name)
            store(waiting)
            kube.complete(name)

    kube.on_create = cluster
    ok, failed = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert ok.ok, ok.error
    assert not failed.ok and "Unschedulable" in failed.error
    assert "Insufficient nvidia.com/gpu" in failed.error


def test_preflight_reports_every_problem_before_any_job_is_submitted(kube, store):
    params, specs = grid(optimizers="[sgd, vsgd]")
    kube.remove_object("serviceaccounts", "vsgd-train")
    kube.remove_object("secrets", "vsgd-credentials")
    kube.denied.add(("delete", "batch", "jobs"))
    kube.denied.add(("get", "", "pods/log"))
    with pytest.raises(ConfigError) as err:
        executor(params, store, io.StringIO(), kube.clock).run(specs)
    text = str(err.value)
    assert "serviceaccount vsgd/vsgd-train does not exist" in text
    assert "secret vsgd/vsgd-credentials does not exist" in text
    assert "missing right: delete jobs" in text and "missing right: get pods/log" in text
    assert len(err.value.problems) == 5  # the four, and "nothing was submitted"
    assert kube.jobs() == [] and created(kube) == [] and len(kube.dry_runs) == 1


def test_a_missing_namespace_is_found_by_the_dry_run(kube, store):
    params, specs = grid("executor.kubernetes.namespace=nowhere", optimizers="[vsgd]")
    with pytest.raises(ConfigError) as err:
        executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert "namespace 'nowhere' does not exist" in str(err.value)
    assert kube.jobs() == []


@pytest.mark.real_time  # the executor runs in a subprocess, on the real clock
def test_the_stage_exits_78_when_the_preflight_fails(kube, tmp_path):
    """Through `python -m pipeline train`: a cluster problem is a configuration problem."""
    from conftest import fake_prepared

    fake_prepared(tmp_path / "data")
    kube.remove_object("configmaps", "vsgd-endpoints")
    env = {**os.environ, "KUBECONFIG": os.environ["KUBECONFIG"]}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "--params",
            str(PARAMS),
            "--set",
            "preset=ci",
            "--set",
            "datasets=[cifar100]",
            "--set",
            "archs=[vgg]",
            "--set",
            "optimizers=[vsgd]",
            "--set",
            "tune.enabled=false",
            "--set",
            f"data.root={tmp_path / 'data'}",
            "--set",
            "storage.remote=s3://vsgd/grid",
            "--set",
            "storage.endpoint_url=http://127.0.0.1:9",
            "--set",
            "executor.kind=kubernetes",
            "--set",
            "executor.kubernetes.image=vsgd-repro:test",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 78, result.stderr[-2000:]
    assert "configmap vsgd/vsgd-endpoints does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert kube.jobs() == []


@pytest.mark.parametrize("fault", ["503", "429", "reset", "refused"])
def test_an_api_outage_within_the_budget_fails_no_run(kube, store, fault):
    """A ~7 s outage of `list pods` used to fail every run."""
    params, specs = grid("executor.kubernetes.outage_budget=60", optimizers="[sgd, vsgd]")
    params["executor"]["max_parallel"] = 2

    def cluster(job):
        name = job["metadata"]["name"]
        kube.start_pod(name, log=["step 1/3"])
        kube.clock.sleep(0.3)
        if spec_of(job, specs) is specs[0]:
            kube.outage(fault, seconds=2, **({"retry_after": 1} if fault == "429" else {}))
        kube.clock.sleep(3)
        store(spec_of(job, specs))
        kube.complete(name)

    kube.on_create = cluster
    out = io.StringIO()
    outcomes = executor(params, store, out, kube.clock).run(specs)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    # A refused connection never reaches the server; the others are counted there.
    assert kube.faulted or fault == "refused", "the outage did not happen"
    assert "Kubernetes API unreachable" in out.getvalue()
    assert "reachable again" in out.getvalue()


def test_an_eight_second_outage_of_list_pods_fails_no_run(kube, store):
    """What used to fail every run: `list pods` answering 503 for a few seconds while the
    Jobs run on, with the default outage budget."""
    params, specs = grid(optimizers="[vsgd]")

    def cluster(job):
        name = job["metadata"]["name"]
        kube.start_pod(name, log=["step 1/3"])
        kube.outage("503", seconds=8, match=lambda method, path: path.endswith("/pods"))
        kube.clock.sleep(9)
        store(spec_of(job, specs))
        kube.complete(name)

    kube.on_create = cluster
    [outcome] = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert outcome.ok, outcome.error
    assert any(path.endswith("/pods") for _, path, _ in kube.faulted)


def test_an_outage_beyond_the_budget_leaves_the_jobs_running_for_the_next_start(kube, store):
    params, specs = grid("executor.kubernetes.outage_budget=2", optimizers="[vsgd]")
    name = job_name(specs[0], params)

    def cluster(job):
        kube.start_pod(name, log=["step 1/3"])
        kube.clock.sleep(0.3)
        kube.outage("503", seconds=4)

    kube.on_create = cluster
    out = io.StringIO()
    with pytest.raises(Detached):
        executor(params, store, out, kube.clock).run(specs)
    assert kube.job(name) is not None and kube.deletions == []  # nothing marked or stopped
    assert "keep running" in out.getvalue() and "adopt" in out.getvalue()
    while not kube.outage_over():
        kube.clock.sleep(0.2)
    # The next start adopts the Job instead of submitting it again.
    kube.on_create = None
    kube.clock.timer(1.0, lambda: (store(specs[0]), kube.complete(name)))
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert outcome.ok and f"adopting existing Job {name}" in out.getvalue()
    assert len(created(kube)) == 1


# -- no step lost, nothing crossed -----------------------------------------------------------


def test_a_job_of_another_pipeline_on_the_same_run_is_never_adopted(kube, store):
    params, specs = grid(optimizers="[vsgd]")
    other, _ = grid("storage.remote=s3://other/store", optimizers="[vsgd]")
    theirs = render_job(specs[0], other)  # same run hash, another pipeline's store
    kube.create_job(theirs)
    kube.start_pod(theirs["metadata"]["name"])
    owned, _ = grid("executor.kubernetes.owner=alice", optimizers="[vsgd]")
    kube.create_job(render_job(specs[0], owned))  # same store, an owned pipeline
    kube.on_create = finish_ok(kube, store, specs)
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert outcome.ok and "adopting" not in out.getvalue()
    assert len(created(kube)) == 1
    names = {j["metadata"]["name"] for j in kube.jobs()}
    assert len(names) == 3 and job_name(specs[0], params) in names
    mine = kube.job(job_name(specs[0], params))["metadata"]["labels"]
    assert mine[STORE_LABEL] != theirs["metadata"]["labels"][STORE_LABEL]
    assert OWNER_LABEL not in mine


def test_the_log_of_a_failed_run_comes_from_its_own_job_not_an_older_one(kube, store):
    params, specs = grid(optimizers="[vsgd]")
    name = job_name(specs[0], params)
    # An older Job of the same run, deleted with its pods orphaned (the API's default).
    kube.create_job(render_job(specs[0], params))
    old = kube.start_pod(name, log=["old pod: an unrelated old failure"])
    api_delete(name)
    assert kube.pods_of(name)  # the orphan still carries the run-hash label

    def cluster(job):
        pod = kube.start_pod(name, log=["new pod: RuntimeError: CUDA error"])
        kube.pod_failed(name, pod, exit_code=1)
        kube.fail(name, "BackoffLimitExceeded", "Job has reached the specified backoff limit")

    kube.on_create = cluster
    [outcome] = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert not outcome.ok and "new pod: RuntimeError" in outcome.log_tail
    assert old not in outcome.log_tail and "old pod" not in outcome.log_tail


def test_a_failure_target_is_not_final_while_the_pods_still_terminate(kube, store):
    params, specs = grid(optimizers="[vsgd]")
    seen = {}

    def cluster(job):
        name = job["metadata"]["name"]
        pod = kube.start_pod(name)
        kube.fail(name, "PodFailurePolicy", "exit code 78", terminal=False)
        kube.clock.sleep(2.5)  # more than one watch window
        seen["finished early"] = "FAILED" in out.getvalue()
        kube.pod_failed(name, pod, exit_code=78)
        kube.finalize(name)

    kube.on_create = cluster
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert seen == {"finished early": False}
    assert not outcome.ok and "PodFailurePolicy" in outcome.error


def test_the_watch_survives_bookmarks_and_a_410_in_mid_stream(kube, store):
    params, specs = grid(optimizers="[vsgd]")

    def cluster(job):
        name = job["metadata"]["name"]
        kube.start_pod(name)
        kube.clock.sleep(0.3)
        kube.bookmark()
        kube.clock.sleep(0.3)
        kube.expire_watches()
        kube.clock.sleep(0.5)
        store(spec_of(job, specs))
        kube.complete(name)

    kube.on_create = cluster
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert outcome.ok, outcome.error
    assert "410 Gone" in out.getvalue()


def test_a_replaced_failed_job_takes_its_pods_with_it(kube, store):
    params, specs = grid(optimizers="[vsgd]")
    name = job_name(specs[0], params)
    kube.create_job(render_job(specs[0], params))
    kube.fail(name, "BackoffLimitExceeded", "old failure")
    kube.on_create = finish_ok(kube, store, specs)
    [outcome] = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert outcome.ok and kube.deletions == [(name, "Background")]


def stale_setup(kube, store, tmp_path):
    """A grid of one run, a running Job of it, and a running Job of an earlier grid."""
    params, specs = grid(optimizers="[vsgd]")
    _, earlier = grid("seeds=[7]", optimizers="[vsgd]")
    for spec in (specs[0], earlier[0]):
        kube.create_job(render_job(spec, params))
        kube.start_pod(job_name(spec, params))
    return params, specs, earlier


def test_jobs_of_an_earlier_grid_are_reported_by_the_stage_and_left_alone(
    kube, store, tmp_path, capsys
):
    params, specs, earlier = stale_setup(kube, store, tmp_path)
    report_stale(params, "train")
    err = capsys.readouterr().err
    assert "1 Jobs of an earlier grid are still running" in err
    assert job_name(earlier[0], params) in err and job_name(specs[0], params) not in err
    assert "jobs cancel --stale" in err
    assert kube.deletions == []


@pytest.mark.real_time  # the jobs command runs in a subprocess, on the real clock
def test_jobs_cancel_stale_stops_only_the_earlier_grid(kube, store, tmp_path):
    params, specs, earlier = stale_setup(kube, store, tmp_path)
    args = ["--params", str(PARAMS)] + [
        a
        for kv in (
            "preset=ci",
            "datasets=[cifar100]",
            "archs=[vgg]",
            "optimizers=[vsgd]",
            "tune.enabled=false",
            "storage.remote=s3://vsgd/grid",
            "executor.kind=kubernetes",
        )
        for a in ("--set", kv)
    ]
    env = {**os.environ}

    def jobs(*argv):
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "jobs", *argv, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    listing = jobs("list")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:-1]}
    assert lines[job_name(earlier[0], params)][1:3] == ["running", "stale"]
    assert lines[job_name(specs[0], params)][1:3] == ["running", "current"]
    assert jobs("cancel").returncode == 78  # which ones? never a guess
    result = jobs("cancel", "--stale")
    assert result.returncode == 0, result.stderr
    assert kube.deletions == [(job_name(earlier[0], params), "Background")]
    assert kube.job(job_name(specs[0], params)) is not None


# -- queues and scale ------------------------------------------------------------------------


def test_kueue_queued_jobs_are_all_submitted_and_shown_as_queued(kube, store):
    params, specs = grid(
        f"executor.kubernetes.labels={{{QUEUE_LABEL}: gpu-queue}}",
        "executor.kubernetes.suspend=true",
        "executor.max_parallel=null",
        optimizers="[sgd, adam, vsgd]",
    )
    finish = finish_ok(kube, store, specs)

    def admit_later():
        while len(kube.jobs()) < 3:
            kube.clock.sleep(0.1)
        kube.clock.sleep(1.5)  # a progress window while queued
        for job in kube.jobs():
            kube.admit(job["metadata"]["name"])
            finish(kube.job(job["metadata"]["name"]))

    threading.Thread(target=admit_later, daemon=True).start()
    out = io.StringIO()
    outcomes = executor(params, store, out, kube.clock).run(specs)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert len(created(kube)) == 3
    text = out.getvalue()
    assert "queued (suspended until Kueue queue gpu-queue admits it)" in text
    assert "waiting for a pod" not in text
    job = render_job(specs[0], params)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_LABEL] == "gpu-queue"


def test_labels_annotations_and_scratch_request_reach_the_job():
    params, specs = grid(
        "executor.kubernetes.labels={team: vision}",
        "executor.kubernetes.annotations={example.com/note: 'a b'}",
        "executor.kubernetes.scratch_size=50Gi",
        optimizers="[vsgd]",
    )
    job = render_job(specs[0], params)
    assert job["metadata"]["labels"]["team"] == "vision"
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "vision"
    assert job["metadata"]["annotations"]["example.com/note"] == "a b"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["ephemeral-storage"] == "50Gi"
    scratch = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "scratch")
    assert scratch["emptyDir"]["sizeLimit"] == "50Gi"
    assert "suspend" not in job["spec"]
    with pytest.raises(ConfigError) as err:
        grid("executor.kubernetes.labels={vsgd-repro/store: mine}")
    assert "executor.kubernetes.labels" in str(err.value)


def test_the_default_image_is_tagged_with_the_code_it_runs():
    from pipeline.image import image_tag

    image = lambda params, specs: (  # noqa: E731
        render_job(specs[0], params)["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert image(*grid(optimizers="[vsgd]")) == f"vsgd-repro:{image_tag()}"
    assert (
        image(
            *grid(
                "executor.kubernetes.image_repository=registry.example.com/team/vsgd",
                optimizers="[vsgd]",
            )
        )
        == f"registry.example.com/team/vsgd:{image_tag()}"
    )
    pinned = "registry.example.com/vsgd-repro@sha256:" + "0" * 64
    assert image(*grid(f"executor.kubernetes.image={pinned}", optimizers="[vsgd]")) == pinned
