"""The kubernetes executor against a fake API server over real HTTP (tests/fake_k8s/), with
the official client configured from a kubeconfig the test writes, as a user's would be. The
executor, the server and the tests' hooks keep one clock, `kube.clock`, faster than real time
(tests/conftest.py) except in tests marked `real_time`.

A real cluster: tests/test_k8s_real_cluster.py (opt-in).
"""

import io
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.executors import get_executor
from pipeline.executors.kubernetes import KubernetesExecutor
from pipeline.grid import expand
from pipeline.k8s.render import RUN_HASH_LABEL, job_name, render_job, write_jobs

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
OPT_LABEL = "vsgd-repro/optimizer"


def grid(*overrides, optimizers="[sgd, adam, adamw, vsgd]"):
    params = load_params(
        PARAMS,
        [
            "preset=ci",
            "datasets=[cifar100]",
            "archs=[vgg]",
            f"optimizers={optimizers}",
            "tune.enabled=false",
            "storage.remote=s3://vsgd/grid",
            "executor.kind=kubernetes",
            "executor.kubernetes.progress_interval=1",
            "executor.kubernetes.log_tail_lines=5",
            *overrides,
        ],
    )
    return params, expand(params)


def spec_of(job, specs):
    return next(s for s in specs if s["run_hash"] == job["metadata"]["labels"][RUN_HASH_LABEL])


def api_delete(name, namespace="vsgd"):
    """Delete a Job through the API as `kubectl`-less clients do: no propagationPolicy (the
    API's default for a Job orphans its pods)."""
    from kubernetes import client

    from pipeline.k8s.client import connect

    client.BatchV1Api(connect()).delete_namespaced_job(name, namespace)


def executor(params, store, out, clock):
    """The executor under test, on the test API server's clock (`kube.clock`)."""
    return KubernetesExecutor(params, out=out, fetch=store.fetch, clock=clock)


def test_grid_runs_to_complete_and_each_failure_reason(kube, store):
    params, specs = grid("executor.max_parallel=2")
    active, most = set(), [0]
    lock = threading.Lock()

    def cluster(job):
        name, spec = job["metadata"]["name"], spec_of(job, specs)
        with lock:
            active.add(name)
            most[0] = max(most[0], len(active))
        kube.clock.sleep(0.2)
        pod = kube.start_pod(name, log=[f"{spec['name']} step 1/3 loss 4.6"])
        kube.clock.sleep(0.3)
        optimizer = job["metadata"]["labels"][OPT_LABEL]
        if optimizer == "sgd":
            store(spec, test_acc=0.61)
            kube.log(pod, "step 3/3 test_acc 0.61")
            kube.complete(name)
        elif optimizer == "adam":
            kube.log(pod, "Traceback (most recent call last):", "RuntimeError: CUDA error")
            kube.pod_failed(name, pod, exit_code=1)
            kube.fail(name, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        elif optimizer == "adamw":
            kube.fail(name, "DeadlineExceeded", "Job was active longer than specified deadline")
        else:
            kube.log(pod, "invalid configuration: optimizer.lr must be > 0")
            kube.pod_failed(name, pod, exit_code=78)
            kube.fail(
                name,
                "PodFailurePolicy",
                f"Container train for pod vsgd/{pod} failed "
                "with exit code 78 matching FailJob rule at index 1",
            )
        with lock:
            active.discard(name)

    kube.on_create = cluster
    out = io.StringIO()
    outcomes = executor(params, store, out, kube.clock).run(specs)

    by_opt = {o.name.split("-")[2]: o for o in outcomes}
    assert [o.name for o in outcomes] == [s["name"] for s in specs]  # input order
    assert by_opt["sgd"].ok and by_opt["sgd"].error is None
    sgd = next(s for s in specs if s["optimizer"]["name"] == "sgd")
    metrics = json.loads((Path(sgd["output_dir"]) / "metrics.json").read_text())
    # Exactly what the pod published (the store fixture writes a whole result).
    published = Path("store") / "results" / sgd["run_hash"] / "metrics.json"
    assert metrics == json.loads(published.read_text())
    assert (metrics["name"], metrics["run_hash"], metrics["test_acc"]) == (
        sgd["name"],
        sgd["run_hash"],
        0.61,
    )
    assert "BackoffLimitExceeded" in by_opt["adam"].error
    assert "RuntimeError: CUDA error" in by_opt["adam"].log_tail
    assert "Failed: Error (exit 1)" in by_opt["adam"].log_tail
    assert "DeadlineExceeded" in by_opt["adamw"].error
    assert "activeDeadlineSeconds" in by_opt["adamw"].error
    assert "PodFailurePolicy" in by_opt["vsgd"].error and "exit code 78" in by_opt["vsgd"].error
    assert "invalid configuration" in by_opt["vsgd"].log_tail
    assert not any(o.ok for o in outcomes if o is not by_opt["sgd"])
    # Bounded by max_parallel, one Job per run, and nothing polled: one list, then watches.
    assert most[0] <= 2
    posts = [r for r in kube.requests if r == ("POST", "/apis/batch/v1/namespaces/vsgd/jobs")]
    assert len(posts) == 4 + len(kube.dry_runs) and len(kube.dry_runs) == 1  # the preflight
    text = out.getvalue()
    assert "FAILED" in text and "| RuntimeError: CUDA error" in text
    assert "done" in text and "submitted Job" in text


def test_jobs_carry_the_run_and_match_rendered_yaml(kube, store, tmp_path):
    params, specs = grid(optimizers="[vsgd]")
    kube.on_create = lambda job: (
        store(spec_of(job, specs)),
        kube.complete(job["metadata"]["name"]),
    )
    [outcome] = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert outcome.ok
    [job] = kube.jobs()
    [path] = write_jobs(specs, params, tmp_path / "rendered")
    rendered = yaml.safe_load(path.read_text())
    # What the API received is exactly the rendered file (server-set fields aside).
    for key in ("uid", "creationTimestamp", "generation", "resourceVersion"):
        job["metadata"].pop(key)
    job.pop("status")
    assert job == rendered
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "--spec-json" and json.loads(args[1]) == specs[0]
    assert json.loads(args[1])["checkpoint"] == f"s3://vsgd/grid/checkpoints/{specs[0]['run_hash']}"


def test_resubmission_adopts_running_and_finished_jobs_and_replaces_failed_ones(kube, store):
    params, specs = grid("executor.max_parallel=4", optimizers="[sgd, adam, adamw]")
    running, finished, failed = specs
    for spec in specs:
        kube.create_job(render_job(spec, params))
    kube.start_pod(job_name(running, params))
    store(finished)
    kube.complete(job_name(finished, params))
    kube.fail(job_name(failed, params), "BackoffLimitExceeded", "old failure")
    old_failed_uid = kube.job(job_name(failed, params))["metadata"]["uid"]

    def cluster(job):  # only the replaced Job is created anew
        spec = spec_of(job, specs)
        kube.start_pod(job["metadata"]["name"])
        store(spec)
        kube.complete(job["metadata"]["name"])

    kube.on_create = cluster

    def finish_running():
        kube.clock.sleep(1.0)
        store(running)
        kube.complete(job_name(running, params))

    threading.Thread(target=finish_running, daemon=True).start()
    out = io.StringIO()
    outcomes = executor(params, store, out, kube.clock).run(specs)

    assert [o.ok for o in outcomes] == [True, True, True], [o.error for o in outcomes]
    posts = [r for r in kube.requests if r[0] == "POST" and "jobs" in r[1]][len(kube.dry_runs) :]
    deletes = [r for r in kube.requests if r[0] == "DELETE"]
    assert len(posts) == 1 and deletes == [
        ("DELETE", f"/apis/batch/v1/namespaces/vsgd/jobs/{job_name(failed, params)}")
    ]
    assert kube.job(job_name(failed, params))["metadata"]["uid"] != old_failed_uid
    assert {j["metadata"]["name"] for j in kube.jobs()} == {job_name(s, params) for s in specs}
    text = out.getvalue()
    assert f"adopting existing Job {job_name(running, params)}" in text
    assert "replacing Job" in text and "BackoffLimitExceeded" in text


def test_watch_survives_410_gone_and_a_cut_connection(kube, store):
    # Watch windows longer than the test: each watch ends by what the scenario does to it.
    params, specs = grid(
        "executor.max_parallel=1",
        "executor.kubernetes.progress_interval=60",
        optimizers="[sgd, adam]",
    )
    first, second = specs

    def cluster(job):
        spec = spec_of(job, specs)
        name = job["metadata"]["name"]
        kube.start_pod(name)
        if spec is first:
            kube.await_watch(1)
            kube.compact()  # history gone: resuming the watch must fail with 410
            kube.cut_watches()
            kube.await_watch(3)  # the resumed watch got 410; after a new list, a third
        else:
            kube.await_watch(4)
            kube.cut_watches()  # network blip: resume from the last resourceVersion
            kube.await_watch(5)
        store(spec)
        kube.complete(name)

    kube.on_create = cluster
    out = io.StringIO()
    outcomes = executor(params, store, out, kube.clock).run(specs)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    text = out.getvalue()
    assert "410 Gone" in text and "listing the Jobs again" in text
    assert "watch connection lost" in text
    jobs = "/apis/batch/v1/namespaces/vsgd/jobs"
    gets = [r for r in kube.requests if r == ("GET", jobs)]  # lists and watches
    watches = [path for path in kube.watches if path == jobs]
    # Nothing polled: the first list and the re-list after 410; for the first Job a watch
    # cut, its resumption (410) and one after the re-list, for the second a watch cut and
    # its resumption.
    assert len(watches) == 5 and len(gets) - len(watches) == 2
    assert all(rv > 0 for rv in kube.watch_starts)  # every watch resumed from a version


def test_quota_refusal_is_reported_and_other_runs_go_on(kube, store):
    # A quota full of other work is waited for, up to start_grace: kept short here.
    params, specs = grid("executor.kubernetes.start_grace=1", optimizers="[sgd, adam]")
    refused = job_name(specs[1], params)
    message = (
        f'jobs.batch "{refused}" is forbidden: exceeded quota: gpu-jobs, requested: '
        f"count/jobs.batch=1, used: count/jobs.batch=4, limited: count/jobs.batch=4"
    )
    kube.reject_create = lambda job: (
        (403, "Forbidden", message) if job["metadata"]["name"] == refused else None
    )
    kube.on_create = lambda job: (
        store(spec_of(job, specs)),
        kube.complete(job["metadata"]["name"]),
    )
    out = io.StringIO()
    ok, quota = executor(params, store, out, kube.clock).run(specs)
    assert ok.ok
    assert not quota.ok
    assert "403 Forbidden" in quota.error and "exceeded quota: gpu-jobs" in quota.error
    assert "ResourceQuota" in quota.error
    assert "exceeded quota" in out.getvalue()


def test_a_job_deleted_midway_fails_its_run_with_the_log(kube, store):
    params, specs = grid(optimizers="[sgd]")

    def cluster(job):
        name = job["metadata"]["name"]
        kube.start_pod(name, log=["step 1/3 loss 4.6"])
        kube.clock.sleep(0.3)
        api_delete(name)  # its pod is left behind, with the log

    kube.on_create = cluster
    [outcome] = executor(params, store, io.StringIO(), kube.clock).run(specs)
    assert not outcome.ok and "deleted before it finished" in outcome.error
    assert "step 1/3 loss 4.6" in outcome.log_tail


def spoil(directory):
    """Damage a published result the way a bad copy would: a number out of its range."""
    metrics = directory / "metrics.json"
    metrics.write_text(json.dumps(dict(json.loads(metrics.read_text()), test_acc=7.5)))


@pytest.mark.parametrize("twice", [False, True], ids=["then whole", "damaged again"])
def test_a_damaged_result_is_set_aside_and_its_job_replaced_once(kube, store, twice):
    params, specs = grid(optimizers="[sgd]")
    [spec] = specs
    created = []

    def cluster(job):  # the first pod publishes a damaged result; the second a whole one
        created.append(job["metadata"]["uid"])
        kube.start_pod(job["metadata"]["name"])
        store(spec, damage=spoil if twice or len(created) == 1 else None)
        kube.complete(job["metadata"]["name"])

    kube.on_create = cluster
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)

    name = job_name(spec, params)
    problem = "test_acc 7.5 is not null or a number in [0, 1]"
    deletes = [r for r in kube.requests if r[0] == "DELETE"]
    assert len(created) == 2 and len(set(created)) == 2  # replaced once, never more
    assert deletes == [("DELETE", f"/apis/batch/v1/namespaces/vsgd/jobs/{name}")]
    said = out.getvalue()
    assert "is damaged (" in said and f"metrics.json: {problem}" in said
    assert f"replacing Job {name}" in said
    aside = sorted(Path("results/damaged").iterdir())
    assert len(aside) == (2 if twice else 1)  # every damaged copy kept, none in the store
    assert all(json.loads((d / "metrics.json").read_text())["test_acc"] == 7.5 for d in aside)
    metrics = Path(spec["output_dir"]) / "metrics.json"
    if twice:
        assert not outcome.ok and "trained again" in outcome.error and problem in outcome.error
        assert not metrics.exists()
    else:
        assert outcome.ok, outcome.error
        assert json.loads(metrics.read_text())["test_acc"] == 0.5


@pytest.mark.real_time  # the watch windows end by the server's timeoutSeconds, in real time
def test_progress_shows_pod_state_and_last_log_line(kube, store):
    params, specs = grid(optimizers="[sgd]")

    def cluster(job):
        name = job["metadata"]["name"]
        pod = kube.start_pod(name, log=["step 2/3 loss 3.9 test_acc 0.12"])
        kube.clock.sleep(2.5)  # more than one progress interval
        kube.log(pod, "done")
        store(spec_of(job, specs))
        kube.complete(name)

    kube.on_create = cluster
    out = io.StringIO()
    [outcome] = executor(params, store, out, kube.clock).run(specs)
    assert outcome.ok
    assert "Running, 0 min | step 2/3 loss 3.9 test_acc 0.12" in out.getvalue()


def test_get_executor_picks_kubernetes_and_reports_an_unreachable_config(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.chdir(tmp_path)
    params, specs = grid(optimizers="[sgd]")
    ex = get_executor(params)
    assert isinstance(ex, KubernetesExecutor)
    ex.out = io.StringIO()
    [outcome] = ex.run(specs)
    assert not outcome.ok and "no Kubernetes configuration" in outcome.error


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_apply_of_a_rendered_job(kube, tmp_path):
    params, specs = grid(optimizers="[vsgd]")
    [path] = write_jobs(specs, params, tmp_path / "jobs")
    env = {**os.environ, "HOME": str(tmp_path)}  # kubectl's discovery cache stays here
    for expected in ("created", "unchanged"):
        result = subprocess.run(
            ["kubectl", "apply", "-f", str(path)],
            env=env,
            text=True,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert f"job.batch/{job_name(specs[0], params)} {expected}" in result.stdout
    [job] = kube.jobs()
    assert job["spec"]["template"]["metadata"]["labels"][RUN_HASH_LABEL] == specs[0]["run_hash"]
