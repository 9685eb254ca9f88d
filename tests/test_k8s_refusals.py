"""The paths that destroy or refuse, against the test API server (tests/fake_k8s/, driven by
the official client, on its faster clock `kube.clock`): cancelling Jobs, a Job name already
taken, a full or too small ResourceQuota, the launcher leaving after an outage, an image pull
secret the launcher may not read, and the log of a pod that has not started. Each test is
named after the failure it prevents.
"""

import copy
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import fake_prepared
from test_k8s_cluster import JOBS, created, finish_ok, stale_setup
from test_k8s_executor import PARAMS, executor, grid

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.k8s.render import OWNER_LABEL, STORE_LABEL, job_name, render_job

ROOT = Path(__file__).resolve().parent.parent
GRID = (
    "preset=ci",
    "datasets=[cifar100]",
    "archs=[vgg]",
    "optimizers=[vsgd]",
    "tune.enabled=false",
    "storage.remote=s3://vsgd/grid",
    "executor.kind=kubernetes",
)


def pipeline_cli(tmp_path, *argv, sets=GRID, timeout=120):
    """`python -m pipeline <argv>` on params.yaml with `sets`, as a user runs it."""
    args = [a for kv in sets for a in ("--set", kv)]
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *argv, "--params", str(PARAMS), *args],
        cwd=tmp_path,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def others(kube, specs):
    """Jobs of the same runs by two other pipelines in the namespace: one on another store,
    one on the same store with an owner. Returns their names."""
    names = []
    for override in ("storage.remote=s3://other/store", "executor.kubernetes.owner=alice"):
        params, _ = grid(override, optimizers="[vsgd]")
        job = render_job(specs[0], params)
        kube.create_job(job)
        kube.start_pod(job["metadata"]["name"])
        names.append(job["metadata"]["name"])
    return names


# -- jobs cancel --------------------------------------------------------------------------


@pytest.mark.real_time  # the jobs command runs in a subprocess, on the real clock
def test_cancel_refuses_a_job_of_another_pipeline(kube, store, tmp_path):
    params, specs, _ = stale_setup(kube, store, tmp_path)
    ours = job_name(specs[0], params)
    theirs, owned = others(kube, specs)
    result = pipeline_cli(tmp_path, "jobs", "cancel", ours, theirs, owned, "no-such-job")
    assert result.returncode == 78, result.stderr
    err = result.stderr
    assert (
        f"{theirs}: not a Job of this pipeline: it reports to another store "
        f"(s3://other/store; this pipeline's: s3://vsgd/grid)" in err
    )
    assert (
        f"{owned}: not a Job of this pipeline: it has another owner ({OWNER_LABEL}: "
        f"alice; this pipeline's: none)" in err
    )
    assert "no-such-job: no Job of that name in namespace vsgd" in err
    assert "nothing was cancelled" in err and "Traceback" not in err
    # All or nothing: the name that is ours is not cancelled either.
    assert kube.deletions == []
    assert all(kube.job(n) for n in (ours, theirs, owned))


@pytest.mark.real_time  # the jobs command runs in a subprocess, on the real clock
def test_cancel_all_leaves_another_pipelines_jobs(kube, store, tmp_path):
    params, specs, earlier = stale_setup(kube, store, tmp_path)
    theirs = others(kube, specs)
    pods = {n: kube.pods_of(n)[0]["metadata"]["name"] for n in theirs}
    result = pipeline_cli(tmp_path, "jobs", "cancel", "--all")
    assert result.returncode == 0, result.stderr
    mine = sorted(job_name(s, params) for s in (specs[0], earlier[0]))
    assert sorted(kube.deletions) == [(n, "Background") for n in mine]
    assert "2 Jobs cancelled in namespace vsgd" in result.stdout
    for name in theirs:
        assert kube.job(name) is not None and kube.pod(pods[name]) is not None
    kube.clock.sleep(kube.gc_delay * 4)  # the garbage collector took our Jobs' pods
    assert all(kube.pods_of(n) == [] for n in mine)


# -- a Job name already taken --------------------------------------------------------------


def test_a_job_created_by_another_launcher_is_adopted_not_duplicated(kube, store):
    params, specs = grid(optimizers="[vsgd]")
    name = job_name(specs[0], params)
    other = {}

    def another_launcher(job, dry_run):
        # It creates the same Job between this launcher's list and its create.
        if not dry_run and not other:
            other.update(kube.create_job(copy.deepcopy(job)))
            kube.clock.timer(
                0.5, lambda: (kube.start_pod(name), store(specs[0]), kube.complete(name))
            )

    kube.webhook = another_launcher
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert outcome.ok, outcome.error
    assert f"adopting existing Job {name}" in out.getvalue()
    assert "submitted Job" not in out.getvalue()
    assert len(created(kube)) == 1  # the one answered 409; no second try, no duplicate
    [job] = kube.jobs()
    assert job["metadata"]["uid"] == other["metadata"]["uid"] and kube.deletions == []
    assert (Path(specs[0]["output_dir"]) / "metrics.json").exists()  # its result fetched


def test_another_pipelines_job_of_the_same_name_is_left_alone(kube, store):
    params, specs = grid(optimizers="[sgd, vsgd]")
    name = job_name(specs[1], params)
    other, _ = grid("storage.remote=s3://other/store", optimizers="[sgd, vsgd]")
    theirs = render_job(specs[1], other)
    theirs["metadata"]["name"] = name  # names are hashes of the ownership: forced to collide
    kube.create_job(theirs)
    kube.start_pod(name)
    before = kube.job(name)
    kube.on_create = finish_ok(kube, store, specs)
    ok, refused = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert ok.ok, ok.error  # the other runs go on
    assert not refused.ok
    assert (
        f"a Job named {name} exists in namespace vsgd but is not this pipeline's: it "
        f"reports to another store (s3://other/store" in refused.error
    )
    assert "left alone" in refused.error and "executor.kubernetes.owner" in refused.error
    # Never deleted, patched or adopted: exactly as it was.
    assert kube.job(name) == before and kube.deletions == []
    assert not [r for r in kube.requests if r[0] in ("PATCH", "DELETE")]
    assert (
        kube.job(name)["metadata"]["labels"][STORE_LABEL]
        == theirs["metadata"]["labels"][STORE_LABEL]
    )


# -- ResourceQuota ------------------------------------------------------------------------


def test_a_full_quota_at_stage_start_waits_instead_of_failing_the_grid(kube, store):
    params, specs = grid(optimizers="[vsgd]")
    kube.add_quota("gpu-jobs", {"count/jobs.batch": 1})
    other, _ = grid("storage.remote=s3://other/store", optimizers="[vsgd]")
    busy = render_job(specs[0], other)["metadata"]["name"]
    kube.create_job(render_job(specs[0], other))  # another pipeline's Job holds the quota
    ends = []

    def busy_ends_later(job, dry_run):  # ... until it ends, after the stage's first create
        if not dry_run and not ends:
            ends.append(kube.clock.timer(1.5, kube.delete_job, busy))

    kube.webhook = busy_ends_later
    kube.on_create = finish_ok(kube, store, specs)
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert outcome.ok, outcome.error
    text = out.getvalue()
    assert (
        "ResourceQuota gpu-jobs of namespace vsgd is full now (used "
        "count/jobs.batch=1 of count/jobs.batch=1): the runs wait for room" in text
    )
    assert "cannot start: API error creating Job" in text and "exceeded quota" in text
    assert len(created(kube)) >= 2  # refused, then admitted once the room was there


# A quota one Job or one run's pod alone exceeds. A quota on pods (GPUs here) is charged when
# the Job controller creates a pod, after the Job's dry run passed: without the preflight's
# own look at the quotas, every run would fail only start_grace later, with FailedCreate.
BEYOND = {
    "jobs": (
        {"count/jobs.batch": 0},
        "kubernetes: one Job alone exceeds ResourceQuota q of namespace vsgd (requested "
        "count/jobs.batch=1, the quota's hard limit count/jobs.batch=0): no Job can ever be "
        "admitted; raise the quota (kubectl -n vsgd describe resourcequota q)",
    ),
    "pods": (
        {"requests.nvidia.com/gpu": 0, "requests.memory": "64Gi"},
        "kubernetes: one run's pod alone exceeds ResourceQuota q: requests.nvidia.com/gpu 1 "
        "asked, hard limit 0 in namespace vsgd: no run can ever start; lower the pod's "
        "resources (executor.kubernetes.cpu, memory, gpus, scratch_size) or raise the quota "
        "(kubectl -n vsgd describe resourcequota q)",
    ),
}


@pytest.mark.parametrize("on", BEYOND)
def test_a_request_beyond_a_quota_hard_limit_is_a_configuration_error(kube, store, on):
    hard, expected = BEYOND[on]
    params, specs = grid(optimizers="[vsgd]")
    kube.add_quota("q", hard)
    with pytest.raises(ConfigError) as err:
        executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert [p for p in err.value.problems if "ResourceQuota" in p] == [expected]
    assert kube.jobs() == [] and kube.requests.count(("POST", JOBS)) == 1  # the dry run


def test_a_quota_that_stays_full_fails_the_run_after_start_grace(kube, store):
    """Waiting for room is bounded like any start: the run fails naming the quota, and
    nothing is deleted (no Job of it exists; the one holding the quota is not ours)."""
    params, specs = grid("executor.kubernetes.start_grace=1", optimizers="[vsgd]")
    kube.add_quota("gpu-jobs", {"count/jobs.batch": 1})
    other, _ = grid("storage.remote=s3://other/store", optimizers="[vsgd]")
    kube.create_job(render_job(specs[0], other))
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert not outcome.ok and "could not start" in outcome.error
    assert "exceeded quota: gpu-jobs" in outcome.error and kube.deletions == []


def test_a_pod_quota_in_use_now_is_said_and_passes(kube, store):
    params, specs = grid(optimizers="[vsgd]")
    kube.add_quota("gpus", {"requests.nvidia.com/gpu": 1, "requests.memory": "64Gi"})
    other, _ = grid("storage.remote=s3://other/store", optimizers="[vsgd]")
    busy = render_job(specs[0], other)
    kube.create_job(busy)
    kube.start_pod(busy["metadata"]["name"])  # another pipeline's pod holds the one GPU
    out = io.StringIO()
    executor(params, store, out, kube.clock).preflight(specs[0])
    assert (
        "a run's pod does not fit the ResourceQuotas of namespace vsgd now (gpus: "
        "requests.nvidia.com/gpu 1 asked, 1 of 1 in use): the runs wait for room"
    ) in out.getvalue()
    assert "preflight ok" in out.getvalue()


# -- the launcher leaves after an outage ---------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with the bucket of GRID's remote; yields its URL."""
    from moto.server import ThreadedMotoServer  # heavy: only for the test that needs it

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage.s3_client.cache_clear()
    storage.s3_client().create_bucket(Bucket="vsgd")
    yield url
    server.stop()
    storage.s3_client.cache_clear()


@pytest.mark.real_time  # the stage runs in a subprocess: its outage budget is real time
def test_the_stage_exits_75_after_an_outage_beyond_its_budget(kube, s3, tmp_path):
    fake_prepared(tmp_path / "data")
    _, specs = grid(optimizers="[vsgd]")

    def cluster(job):  # the Job runs; then the API server goes away for longer than 2 s
        kube.start_pod(job["metadata"]["name"], log=["step 1/3"])
        kube.outage("503", seconds=8)

    kube.on_create = cluster
    started = time.monotonic()
    result = pipeline_cli(
        tmp_path,
        "train",
        sets=GRID
        + (
            f"data.root={tmp_path / 'data'}",
            f"storage.endpoint_url={s3}",
            "tracking.uri=null",
            "executor.kubernetes.image=vsgd-repro:test",
            "executor.kubernetes.outage_budget=2",
            "executor.kubernetes.progress_interval=1",
        ),
    )
    assert result.returncode == 75, result.stderr[-3000:]
    err = result.stderr + result.stdout
    assert "Traceback" not in err
    assert "the Kubernetes API has been unreachable for" in err
    assert "1 Jobs keep running in vsgd: run the stage again (`dvc repro`) to adopt them" in err
    assert (
        "the others keep running in the cluster, and running the stage again (`dvc "
        "repro`) adopts them" in err
    )
    [job] = kube.jobs()  # left running, not deleted
    assert kube.deletions == [] and kube.pods_of(job["metadata"]["name"])
    assert time.monotonic() - started < 60


# -- what the preflight cannot see, and logs that do not exist yet --------------------------


def test_a_forbidden_pull_secret_is_reported(kube, store):
    """The launcher's Role names the Secrets it may read: a pull secret outside it used to
    pass the preflight unverified (its 403 was taken for "the access review will say"), and
    a missing one then surfaced only as pods that never start."""
    params, specs = grid("executor.kubernetes.image_pull_secrets=[regcred]", optimizers="[vsgd]")
    docs = yaml.safe_load_all((ROOT / "k8s" / "base" / "launcher-rbac.yaml").read_text())
    [role] = [d for d in docs if d["kind"] == "Role"]
    kube.bind_role(role["rules"], "vsgd")
    with pytest.raises(ConfigError) as err:
        executor(params, store, io.StringIO(), kube.clock).run(specs)
    [problem, last] = err.value.problems
    assert problem.startswith(
        "executor.kubernetes.image_pull_secrets: cannot verify that "
        "secret vsgd/regcred exists: the launcher may not read it "
        '(secrets "regcred" is forbidden: User "fake" cannot get '
        'resource "secrets" in API group "" in the namespace "vsgd")'
    )
    assert "resourceNames" in problem and "kubectl -n vsgd get secret regcred" in problem
    assert "nothing was submitted" in last and kube.jobs() == []


def test_a_run_failing_while_its_pod_waits_shows_why_there_is_no_log(kube, store):
    params, specs = grid(optimizers="[vsgd]")

    def cluster(job):
        name = job["metadata"]["name"]
        kube.start_pod(name, waiting=("ImagePullBackOff", 'Back-off pulling image "x"'))
        kube.fail(name, "DeadlineExceeded", "Job was active longer than specified deadline")

    kube.on_create = cluster
    [outcome] = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert not outcome.ok and "DeadlineExceeded" in outcome.error
    assert "Pending: ImagePullBackOff" in outcome.log_tail
    assert "is waiting to start: trying and failing to pull image" in outcome.log_tail
    assert "API error" not in outcome.log_tail
