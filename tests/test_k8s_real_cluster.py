"""Opt-in: the path of docs/kubernetes.md on a real cluster (kind is enough).

    VSGD_E2E_CLUSTER=1 KUBECONFIG=~/.kube/config \\
      VSGD_E2E_SET="executor.kubernetes.image_repository=registry.example.com/vsgd-repro;storage.endpoint_url=http://localhost:8333" \\
      [VSGD_E2E_QUEUE=<a Kueue LocalQueue>] [VSGD_E2E_LAUNCHER=1] \\
      .venv/bin/python -m pytest -m cluster tests/test_k8s_real_cluster.py

Needs what the docs' sections 2-4 set up: the image of this checkout pushed (`make push`, or
`kind load docker-image $(make -s image-ref)`), the local overlay applied, the store reachable
from this machine with its keys in the environment. Runs on CPU unless VSGD_E2E_SET sets
`executor.kubernetes.gpus=1`. Never part of the default suite: nothing here can run without a
cluster, so these tests have not been run where the project is developed.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.grid import expand

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not (os.environ.get("VSGD_E2E_CLUSTER") and os.environ.get("KUBECONFIG")),
        reason="opt-in: VSGD_E2E_CLUSTER=1 and KUBECONFIG of a real cluster",
    ),
]


def cluster_params(*overrides, iterations=3):
    return load_params(
        PARAMS,
        [
            "preset=ci",
            "datasets=[cifar100]",
            "archs=[vgg]",
            "optimizers=[vsgd]",
            "tune.enabled=false",
            "executor.kind=kubernetes",
            "executor.kubernetes.gpus=0",
            "executor.kubernetes.progress_interval=5",
            "executor.kubernetes.start_grace=120",
            f"protocol.cifar100.schedule.iterations={iterations}",
            f"storage.remote={os.environ.get('VSGD_E2E_REMOTE', 's3://vsgd/e2e')}",
            "data.root=data",
            *filter(None, os.environ.get("VSGD_E2E_SET", "").split(";")),
            *overrides,
        ],
    )


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "prepare",
            "cifar100",
            "--params",
            str(PARAMS),
            "--set",
            "preset=ci",
            "--set",
            "data.root=data",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return tmp_path


def run_stage(params, specs):
    from pipeline.execute import run_stage as stage

    return stage(params, specs, "train")


def test_preflight_grid_preemption_and_jobs_list_on_a_real_cluster(workdir):
    from kubernetes import client

    from pipeline.executors.kubernetes import KubernetesExecutor
    from pipeline.k8s.client import connect
    from pipeline.k8s.render import job_name

    # Long enough to delete its pod mid-run; only the SIGTERM checkpoint exists.
    params = cluster_params("training.checkpoint_every=100000", iterations=400)
    [spec] = expand(params)
    KubernetesExecutor(params).preflight(spec)  # passes on a cluster set up as documented

    core = client.CoreV1Api(connect())
    namespace = "vsgd"
    deleted = {}

    def preempt():
        selector = f"vsgd-repro/run-hash={spec['run_hash']}"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            pods = core.list_namespaced_pod(namespace, label_selector=selector).items
            running = [p for p in pods if p.status.phase == "Running"]
            if running:
                log = core.read_namespaced_pod_log(
                    running[0].metadata.name, namespace, container="train", tail_lines=5
                )
                if "step " in log:
                    core.delete_namespaced_pod(running[0].metadata.name, namespace)
                    deleted["pod"] = running[0].metadata.name
                    return
            time.sleep(2)

    threading.Thread(target=preempt, daemon=True).start()
    report = run_stage(params, [spec])
    assert report.failed == [], report
    assert deleted, "the pod was never seen running"
    out = Path(spec["output_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_done"] == 400
    log = (out / "train.log").read_text()
    assert "checkpoint saved" in log and "resuming" in log  # the full log came back

    listing = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "jobs",
            "list",
            "--params",
            str(PARAMS),
            *sum((["--set", s] for s in _sets(params)), []),
        ],
        capture_output=True,
        text=True,
    )
    assert listing.returncode == 0 and job_name(spec, params) in listing.stdout


def test_a_result_damaged_in_the_store_is_trained_again(workdir):
    """A result damaged in the store after its Job completed (metrics.json edited, its
    digest no longer matching): the stage sets the fetched copy aside, the completed Job is
    replaced (or, gone by its TTL, submitted anew), and its pod trains the run again
    (resuming from its checkpoints) and publishes a whole result over the damage."""
    from pipeline import results
    from pipeline.k8s.render import results_uri
    from pipeline.storage import open_store

    params = cluster_params("seeds=[21]")
    [spec] = expand(params)
    assert run_stage(params, [spec]).failed == []
    store = open_store(results_uri(params, spec).rstrip("/"), params["storage"]["endpoint_url"])
    metrics = json.loads(store.get_bytes("metrics.json"))
    store.put_bytes("metrics.json", json.dumps({**metrics, "seconds_per_iter": 1.0}).encode())
    shutil.rmtree(spec["output_dir"])  # the store's damaged copy is the only one left

    report = run_stage(params, [spec])
    assert report.failed == [], report
    assert results.is_done(spec)
    assert json.loads(store.get_bytes("metrics.json"))["seconds_per_iter"] != 1.0
    assert any(Path("results/damaged").iterdir())  # the damaged copy, kept


def _sets(params):
    """The --set arguments that give a subprocess this test's params."""
    return [
        "preset=ci",
        "datasets=[cifar100]",
        "archs=[vgg]",
        "optimizers=[vsgd]",
        "tune.enabled=false",
        "executor.kind=kubernetes",
        f"storage.remote={params['storage']['remote']}",
        *filter(None, os.environ.get("VSGD_E2E_SET", "").split(";")),
    ]


@pytest.mark.skipif(
    not os.environ.get("VSGD_E2E_QUEUE"),
    reason="VSGD_E2E_QUEUE names a Kueue LocalQueue in namespace vsgd",
)
def test_runs_through_a_kueue_queue(workdir):
    queue = os.environ["VSGD_E2E_QUEUE"]
    params = cluster_params(
        f"executor.kubernetes.labels={{kueue.x-k8s.io/queue-name: {queue}}}",
        "executor.max_parallel=null",
        "seeds=[11, 12]",
    )
    specs = expand(params)
    report = run_stage(params, specs)
    assert report.failed == [] and all(
        (Path(s["output_dir"]) / "metrics.json").exists() for s in specs
    )


@pytest.mark.skipif(
    not os.environ.get("VSGD_E2E_LAUNCHER"),
    reason="VSGD_E2E_LAUNCHER=1 runs the in-cluster launcher component",
)
def test_the_in_cluster_launcher_trains_the_grid(workdir):
    from pipeline.image import image_tag
    from pipeline.storage import find_result

    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed"
    params = cluster_params("seeds=[21]", "storage.endpoint_url=null")
    repository = params["executor"]["kubernetes"].get("image_repository", "vsgd-repro")
    # params.yaml as the launcher sees it: the cluster's own store endpoint.
    in_cluster = yaml.safe_load(PARAMS.read_text())
    for key in _sets(params) + ["storage.endpoint_url=null", "seeds=[21]"]:
        path, value = key.split("=", 1)
        node = in_cluster
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    (workdir / "params.yaml").write_text(yaml.safe_dump(in_cluster))
    overlay = workdir / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "vsgd",
                "components": [os.path.relpath(ROOT / "k8s/components/launcher", overlay)],
                "images": [{"name": "vsgd-repro", "newName": repository, "newTag": image_tag()}],
            }
        )
    )

    def k(*argv, check=True):
        result = subprocess.run([kubectl, "-n", "vsgd", *argv], capture_output=True, text=True)
        assert not check or result.returncode == 0, result.stderr
        return result

    k("delete", "job", "vsgd-launcher", "--ignore-not-found")
    k("delete", "configmap", "vsgd-params", "--ignore-not-found")
    k("create", "configmap", "vsgd-params", f"--from-file=params.yaml={workdir / 'params.yaml'}")
    k("apply", "-k", str(overlay))
    done = k(
        "wait", "--for=condition=complete", "job/vsgd-launcher", "--timeout=1800s", check=False
    )
    assert done.returncode == 0, k("logs", "job/vsgd-launcher", "--tail=50").stdout
    [spec] = expand(load_params(PARAMS, _sets(params) + ["seeds=[21]", "data.root=data"]))
    assert find_result(params, spec) is not None  # the launcher's run is in the store
