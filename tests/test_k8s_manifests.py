"""Every Kubernetes object we ship or submit validates strictly against the API schemas of
Kubernetes 1.29-1.33 (kubernetes-validate), plus what the schemas cannot see: name and label
syntax, restartPolicy, whole GPU counts, /dev/shm within the memory limit, the security
context, and the settings of params.yaml's `executor.kubernetes` reaching the Job.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline import k8s_config
from pipeline.config import load_params
from pipeline.grid import expand
from pipeline.k8s_config import parse_quantity
from pipeline.k8s_jobs import MAX_NAME, RUN_HASH_LABEL, job_name, render_job

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
PARAMS = ROOT / "params.yaml"
VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33")
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def params_with(*overrides):
    return load_params(PARAMS, ["storage.remote=s3://vsgd/grid", "tune.enabled=false",
                                *overrides])


@pytest.fixture(scope="module")
def jobs():
    """The rendered Job of every run of the full grid and of VSGD's tuning runs (an lr grid,
    so that names carry dots), with the longest dataset and architecture names."""
    from pipeline.grid import tuning_specs
    params = params_with("tune.enabled=true", "optimizer.vsgd.grid={lr: [0.001, 0.05]}",
                         "optimizer.sgd.grid=null", "optimizer.adam.grid=null",
                         "optimizer.adamw.grid=null", "seeds=[0, 1]")
    selection = {(s["dataset"], s["arch_key"], "vsgd"): {"lr": 0.05}
                 for s in tuning_specs(params)}
    specs = tuning_specs(params) + expand(params, selection)
    return [render_job(spec, params) for spec in specs]


def kustomize(overlay):
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def validate_strictly(obj):
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for {version} at "
                        f"{where}: {exc.message}")


def pod_specs(obj):
    if obj["kind"] in ("Deployment", "Job"):
        yield obj["spec"]["template"]["spec"]


# -- kustomize overlays --------------------------------------------------------------------

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl (with kustomize) not installed")


def test_there_are_overlays():
    assert {"local", "cloud"} <= set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates(overlay):
    objects = kustomize(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
            "Service"} <= kinds
    for obj in objects:
        validate_strictly(obj)
        meta = obj["metadata"]
        assert DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= MAX_NAME
        if obj["kind"] != "Namespace":
            assert meta["namespace"] == "vsgd", f"{obj['kind']}/{meta['name']}"
        for value in meta.get("labels", {}).values():
            assert LABEL_VALUE.match(value) and len(value) <= 63
        for pod in pod_specs(obj):
            assert pod["automountServiceAccountToken"] is False
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            for container in pod["containers"]:
                assert ":" in container["image"] and not container["image"].endswith(":latest")
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
                assert "memory" in container["resources"]["limits"]


@needs_kubectl
def test_launcher_role_is_least_privilege():
    [role] = [o for o in kustomize("local") if o["kind"] == "Role"]
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
                     ("", "pods"): {"get", "list", "watch"},
                     ("", "pods/log"): {"get"}}


@needs_kubectl
def test_local_overlay_wires_the_in_cluster_services():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in kustomize("local")}
    endpoints = objects[("ConfigMap", "vsgd-endpoints")]["data"]
    assert endpoints["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert endpoints["AWS_ENDPOINT_URL"] == "http://s3:8333"
    assert ("Service", "mlflow") in objects and ("Service", "s3") in objects
    mlflow = objects[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    assert "--serve-artifacts" in mlflow["args"]
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("sqlite:////mlflow/")
    # Example credentials only: placeholders, nothing that looks like a real key.
    secret = objects[("Secret", "vsgd-credentials")]["stringData"]
    assert all(v.startswith("REPLACE_ME") for v in secret.values())


@needs_kubectl
def test_cloud_overlay_never_ships_credentials():
    objects = kustomize("cloud")
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    [mlflow] = [o for o in objects if o["kind"] == "Deployment"]
    env = {e["name"]: e for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == \
        "vsgd-mlflow-db"


def test_job_template_is_not_a_kustomize_resource():
    """Applying the base must not start a run without a spec: the Job template is package
    data of `pipeline`, and no manifest under k8s/ that kustomize applies is a training Job."""
    assert k8s_config.DEFAULT_TEMPLATE == ROOT / "pipeline" / "templates" / "job-template.yaml"
    assert k8s_config.load_template(k8s_config.DEFAULT_TEMPLATE)["kind"] == "Job"
    assert not list(K8S.rglob("job-template.yaml"))
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = kustomization.parent / resource
            for doc in (yaml.safe_load_all(path.read_text()) if path.is_file() else []):
                assert not (doc and doc.get("kind") == "Job"
                            and "pipeline.train" in json.dumps(doc)), path


# -- rendered Jobs ---------------------------------------------------------------------------

def test_rendered_jobs_validate_strictly(jobs):
    for job in jobs[:: max(1, len(jobs) // 6)] + [jobs[-1]]:   # every shape, not 60 copies
        validate_strictly(job)


def test_job_names_are_unique_dns_labels_with_the_run_hash(jobs):
    names = [j["metadata"]["name"] for j in jobs]
    assert len(set(names)) == len(names)
    for job in jobs:
        name = job["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= MAX_NAME, name
        assert name.endswith(job["metadata"]["labels"][RUN_HASH_LABEL][:12])


def test_long_names_are_shortened_and_stay_unique():
    spec = {"name": "tinyimagenet-convmixer_256_8-adamw-lr0.000123456-s12345-deadbeef",
            "run_hash": "deadbeef00112233"}
    other = {**spec, "run_hash": "deadbeef99887766"}
    a, b = job_name(spec), job_name(other)
    assert len(a) <= MAX_NAME and DNS_LABEL.match(a) and a != b
    assert a.startswith("tinyimagenet-convmixer-256-8-adamw-lr0-000123")
    assert job_name({"name": "___", "run_hash": "0123456789abcdef"}) == "run-0123456789ab"


def test_labels_are_valid_and_on_job_and_pods(jobs):
    for job in jobs:
        labels = job["metadata"]["labels"]
        assert job["spec"]["template"]["metadata"]["labels"] == labels
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/component", "app.kubernetes.io/part-of",
                    "app.kubernetes.io/managed-by", RUN_HASH_LABEL, "vsgd-repro/dataset",
                    "vsgd-repro/arch", "vsgd-repro/optimizer"):
            assert key in labels
        for key, value in labels.items():
            assert isinstance(value, str) and len(value) <= 63 and LABEL_VALUE.match(value), \
                (key, value)
            assert k8s_config._label_key(key)


def test_production_job_spec(jobs):
    for job in jobs:
        spec = job["spec"]
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        assert pod["restartPolicy"] == "Never"
        assert 0 <= spec["backoffLimit"] <= 6
        assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] >= 0
        rules = spec["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [
            {"type": "DisruptionTarget", "status": "True"}]} in rules
        assert {"action": "FailJob", "onExitCodes": {"containerName": container["name"],
                                                     "operator": "In", "values": [78]}} in rules
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        # Credentials come from a Secret, endpoints from a ConfigMap: never literal values.
        assert {"secretRef": {"name": "vsgd-credentials"}} in container["envFrom"]
        assert {"configMapRef": {"name": "vsgd-endpoints"}} in container["envFrom"]
        assert not [e for e in container["env"] if "SECRET" in e["name"] or "KEY" in e["name"]]
        # The run: the single-run CLI with the spec, checkpointing to the store.
        assert container["command"] == ["python", "-m", "pipeline.train"]
        run = json.loads(container["args"][1])
        assert container["args"][0] == "--spec-json"
        assert run["checkpoint"].startswith("s3://vsgd/grid/checkpoints/")
        assert job["metadata"]["labels"][RUN_HASH_LABEL] == run["run_hash"]


def test_resources_gpu_count_and_shm_within_memory(jobs):
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        gpus = resources["limits"]["nvidia.com/gpu"]
        assert re.fullmatch(r"[1-9][0-9]*", str(gpus)), "GPUs are whole devices"
        assert "nvidia.com/gpu" not in resources["requests"] or \
            resources["requests"]["nvidia.com/gpu"] == gpus
        assert {"cpu", "memory"} <= set(resources["requests"])
        memory = parse_quantity(resources["limits"]["memory"])
        assert parse_quantity(resources["requests"]["memory"]) <= memory
        [shm] = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert parse_quantity(shm["emptyDir"]["sizeLimit"]) <= memory
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert "/dev/shm" in mounts


def test_params_settings_reach_the_job():
    params = params_with(
        "executor.kubernetes.namespace=ml", "executor.kubernetes.image=reg.example.com/v:1",
        "executor.kubernetes.gpus=2", "executor.kubernetes.cpu=8",
        "executor.kubernetes.memory=32Gi", "executor.kubernetes.shm_size=8Gi",
        "executor.kubernetes.node_selector={gpu.example.com/type: a100}",
        "executor.kubernetes.tolerations=[{key: nvidia.com/gpu, operator: Exists, "
        "effect: NoSchedule}]",
        "executor.kubernetes.priority_class=batch-low", "executor.kubernetes.backoff_limit=1",
        "executor.kubernetes.active_deadline_seconds=3600",
        "executor.kubernetes.ttl_seconds_after_finished=null",
        "executor.kubernetes.credentials_secret=my-creds",
        "executor.kubernetes.image_pull_secrets=[regcred]",
        "executor.kubernetes.env={TORCH_LOGS: recompiles}")
    job = render_job(expand(params)[0], params)
    validate_strictly(job)
    pod = job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert job["metadata"]["namespace"] == "ml" and c["image"] == "reg.example.com/v:1"
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "32Gi"},
                              "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"}}
    assert pod["nodeSelector"] == {"gpu.example.com/type": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "batch-low" and pod["imagePullSecrets"] == [
        {"name": "regcred"}]
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert "ttlSecondsAfterFinished" not in job["spec"]
    assert {"secretRef": {"name": "my-creds"}} in c["envFrom"]
    assert {"name": "TORCH_LOGS", "value": "recompiles"} in c["env"]
    [shm] = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["sizeLimit"] == "8Gi"


def test_cpu_only_jobs_request_no_gpu():
    params = params_with("executor.kubernetes.gpus=0")
    job = render_job(expand(params)[0], params)
    validate_strictly(job)
    assert not [k for k in job["spec"]["template"]["spec"]["containers"][0]["resources"]
                ["limits"] if k.endswith("/gpu")]


@pytest.mark.parametrize("override, problem", [
    ("executor.kubernetes.gpus=1.5", "executor.kubernetes.gpus"),
    ("executor.kubernetes.memory=lots", "executor.kubernetes.memory"),
    ("executor.kubernetes.shm_size=64Gi", "larger than the memory limit"),
    ("executor.kubernetes.namespace=Not_A_Label", "executor.kubernetes.namespace"),
    ("executor.kubernetes.image_pull_policy=Sometimes", "IfNotPresent"),
    ("executor.kubernetes.tolerations=[{key: a, effect: Sometimes}]", "effect"),
    ("executor.kubernetes.node_selector={a: [b]}", "node_selector"),
    ("executor.kubernetes.backoff_limit=-1", "backoff_limit"),
    ("executor.kubernetes.gpu=1", "unknown key"),
    ("executor.kubernetes.progress_interval=0", "progress_interval"),
])
def test_validation_reports_each_bad_setting(override, problem):
    raw = yaml.safe_load(PARAMS.read_text())
    key, value = override.split("=", 1)
    section = raw.setdefault("executor", {}).get("kubernetes") or {}
    section[key.rsplit(".", 1)[1]] = yaml.safe_load(value)
    raw["executor"]["kubernetes"] = section
    problems = k8s_config.validate(raw)
    assert any(problem in p for p in problems), problems


def test_validation_of_the_defaults_and_the_remote():
    raw = yaml.safe_load(PARAMS.read_text())
    assert k8s_config.validate(raw) == []
    raw["executor"] = {**raw["executor"], "kind": "kubernetes"}
    raw["storage"] = {**raw["storage"], "remote": None}
    assert any(p.startswith("storage.remote") for p in k8s_config.validate(raw))
    raw["executor"]["kubernetes"] = "big"
    assert k8s_config.validate(raw) == ["executor.kubernetes: expected a mapping, got str"]
