"""Every Kubernetes object we ship or submit validates strictly against the API schemas of
Kubernetes 1.29-1.33 (kubernetes-validate), plus what the schemas cannot see: name and label
syntax, restartPolicy, whole GPU counts, /dev/shm within the memory limit, every pod within
the "restricted" Pod Security profile its namespace enforces, the launcher's Role exactly
what it needs, the in-cluster launcher, and the settings of params.yaml's
`executor.kubernetes` reaching the Job.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline import image
from pipeline.config import load_params
from pipeline.contract import COMPILE_THREADS_ENV, RUN_MODULE
from pipeline.grid import expand
from pipeline.k8s import access as k8s_access
from pipeline.k8s import names as k8s_names
from pipeline.k8s import schema as k8s_schema
from pipeline.k8s.names import parse_quantity
from pipeline.k8s.render import (
    MAX_NAME,
    RUN_HASH_LABEL,
    job_name,
    load_template,
    render_job,
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
PARAMS = ROOT / "params.yaml"
VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33")
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def params_with(*overrides):
    return load_params(PARAMS, ["storage.remote=s3://vsgd/grid", "tune.enabled=false", *overrides])


@pytest.fixture(scope="module")
def jobs():
    """The rendered Job of every run of the full grid and of VSGD's tuning runs (an lr grid,
    so that names carry dots), with the longest dataset and architecture names."""
    from pipeline.grid import tuning_specs

    params = params_with(
        "tune.enabled=true",
        "optimizer.vsgd.grid={lr: [0.001, 0.05]}",
        "optimizer.sgd.grid=null",
        "optimizer.adam.grid=null",
        "optimizer.adamw.grid=null",
        "seeds=[0, 1]",
    )
    selection = {(s["dataset"], s["arch_key"], "vsgd"): {"lr": 0.05} for s in tuning_specs(params)}
    specs = tuning_specs(params) + expand(params, selection)
    return [render_job(spec, params) for spec in specs]


def kustomize(overlay):
    return kustomize_dir(K8S / "overlays" / overlay)


def kustomize_dir(path):
    result = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def validate_strictly(obj):
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} invalid for {version} at "
                f"{where}: {exc.message}"
            )


def pod_specs(obj):
    if obj["kind"] in ("Deployment", "Job"):
        yield obj["spec"]["template"]["spec"]


def pod_templates(obj):
    """(where, pod metadata, pod spec) of every pod a workload object creates."""
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = obj["spec"]["template"]
        yield (
            f"{obj['kind']}/{obj['metadata']['name']}",
            template.get("metadata") or {},
            template["spec"],
        )
    elif obj["kind"] == "CronJob":
        template = obj["spec"]["jobTemplate"]["spec"]["template"]
        yield f"CronJob/{obj['metadata']['name']}", template.get("metadata") or {}, template["spec"]
    elif obj["kind"] == "Pod":
        yield f"Pod/{obj['metadata']['name']}", obj["metadata"], obj["spec"]


# -- the "restricted" Pod Security Standard ----------------------------------------------------
# k8s/base/namespace.yaml has Pod Security Admission enforce it: a pod that breaks a rule is
# rejected when its Job or Deployment creates it, which no schema shows. The controls of
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (Baseline, which
# Restricted includes, then Restricted's own), for Linux pods:
#   Baseline   HostProcess                windowsOptions.hostProcess unset or false
#              Host Namespaces            hostNetwork, hostPID, hostIPC unset or false
#              Privileged Containers      securityContext.privileged unset or false
#              Capabilities               capabilities.add only from the baseline set
#              HostPath Volumes           no hostPath volume
#              Host Ports                 hostPort unset or 0
#              AppArmor                   profile unset, RuntimeDefault or Localhost
#              SELinux                    type unset or a container type; user, role unset
#              /proc Mount Type           procMount unset or Default
#              Seccomp                    seccompProfile.type never Unconfined
#              Sysctls                    only the safe set
#   Restricted Volume Types               configMap, csi, downwardAPI, emptyDir, ephemeral,
#                                         persistentVolumeClaim, projected, secret only
#              Privilege Escalation       allowPrivilegeEscalation false, explicitly
#              Running as Non-root        runAsNonRoot true (pod, or every container)
#              Running as Non-root user   runAsUser unset or not 0
#              Seccomp                    RuntimeDefault or Localhost (pod, or every
#                                         container)
#              Capabilities               drop ALL; add NET_BIND_SERVICE at most

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
PROFILES = {"RuntimeDefault", "Localhost"}


def restricted_violations(pod, metadata=None):
    """Every control of the restricted profile that `pod` (a pod spec) breaks, as
    "<control>: <where>" lines; [] when it passes admission in a restricted namespace."""
    problems = []
    psc = pod.get("securityContext") or {}
    containers = [
        (f"{kind}[{c['name']}]", c, c.get("securityContext") or {})
        for kind in ("containers", "initContainers", "ephemeralContainers")
        for c in pod.get(kind) or []
    ]
    contexts = [("pod", psc)] + [(where, sc) for where, _, sc in containers]

    def bad(control, where):
        problems.append(f"{control}: {where}")

    for where, sc in contexts:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad("HostProcess", where)
        if ((sc.get("appArmorProfile") or {}).get("type") or "RuntimeDefault") not in PROFILES:
            bad("AppArmor", where)
        selinux = sc.get("seLinuxOptions") or {}
        if (
            selinux.get("type", "") not in SELINUX_TYPES
            or selinux.get("user")
            or selinux.get("role")
        ):
            bad("SELinux", where)
        if sc.get("runAsUser") == 0:
            bad("Running as Non-root user", where)
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            bad("Seccomp", where)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad("Host Namespaces", key)
    for name, value in (metadata or {}).get("annotations", {}).items():
        if name.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            bad("AppArmor", name)
    for sysctl in psc.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad("Sysctls", sysctl["name"])
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            bad("HostPath Volumes", volume["name"])
        if not kinds <= RESTRICTED_VOLUMES:
            bad("Volume Types", f"{volume['name']} ({', '.join(sorted(kinds))})")
    pod_non_root = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in PROFILES
    for where, container, sc in containers:
        if sc.get("privileged"):
            bad("Privileged Containers", where)
        if sc.get("procMount", "Default") != "Default":
            bad("/proc Mount Type", where)
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                bad("Host Ports", f"{where} {port['hostPort']}")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad("Privilege Escalation", where)
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot")):
            bad("Running as Non-root", where)
        if not (pod_seccomp or (sc.get("seccompProfile") or {}).get("type") in PROFILES):
            bad("Seccomp", where)
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            bad("Capabilities", f"{where} does not drop ALL")
        added = set(capabilities.get("add") or [])
        if added - {"NET_BIND_SERVICE"} or added - BASELINE_CAPABILITIES:
            bad("Capabilities", f"{where} adds {sorted(added)}")
    return problems


# -- kustomize overlays --------------------------------------------------------------------

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)


def test_there_are_overlays():
    assert {"local", "cloud"} <= set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates(overlay):
    objects = kustomize(overlay)
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
    } <= kinds
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


def test_launcher_role_grants_exactly_what_the_launcher_does():
    """The Role is pipeline.k8s.access.ACCESS, nothing missing (a 403 mid-grid) and nothing
    unused (rights nobody needs); the named objects' gets are limited to their defaults."""
    docs = list(yaml.safe_load_all((K8S / "base" / "launcher-rbac.yaml").read_text()))
    [role] = [d for d in docs if d["kind"] == "Role"]
    granted = {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [None]
    }
    needed = {
        (group, resource, verb, k8s_access.NAMED.get(resource, (None, None))[1])
        for group, resource, verbs, _ in k8s_access.ACCESS
        for verb in verbs
    }
    assert not needed - granted, f"missing from the Role: {sorted(needed - granted, key=str)}"
    assert not granted - needed, f"granted but unused: {sorted(granted - needed, key=str)}"
    assert not [r for r in role["rules"] if "*" in json.dumps(r)]
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "vsgd-launcher"}]


def test_namespace_enforces_the_restricted_pod_security_profile():
    [namespace] = yaml.safe_load_all((K8S / "base" / "namespace.yaml").read_text())
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"


COMPLIANT = {
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "containers": [
        {
            "name": "c",
            "image": "x:1",
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
        }
    ],
    "volumes": [{"name": "v", "emptyDir": {}}],
}


@pytest.mark.parametrize(
    "control, path, value",
    [
        ("HostProcess", "securityContext.windowsOptions", {"hostProcess": True}),
        ("Host Namespaces", "hostNetwork", True),
        ("Host Namespaces", "hostPID", True),
        ("Privileged Containers", "containers.0.securityContext.privileged", True),
        ("Capabilities", "containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]),
        ("Capabilities", "containers.0.securityContext.capabilities.add", ["CHOWN"]),
        ("Capabilities", "containers.0.securityContext.capabilities.drop", ["NET_RAW"]),
        ("HostPath Volumes", "volumes.0", {"name": "v", "hostPath": {"path": "/"}}),
        ("Volume Types", "volumes.0", {"name": "v", "nfs": {"server": "n", "path": "/"}}),
        ("Host Ports", "containers.0.ports", [{"containerPort": 80, "hostPort": 80}]),
        ("AppArmor", "securityContext.appArmorProfile", {"type": "Unconfined"}),
        ("SELinux", "securityContext.seLinuxOptions", {"type": "spc_t"}),
        ("/proc Mount Type", "containers.0.securityContext.procMount", "Unmasked"),
        ("Seccomp", "securityContext.seccompProfile", {"type": "Unconfined"}),
        ("Seccomp", "securityContext.seccompProfile", None),
        ("Sysctls", "securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
        ("Privilege Escalation", "containers.0.securityContext.allowPrivilegeEscalation", None),
        ("Running as Non-root", "securityContext.runAsNonRoot", None),
        ("Running as Non-root", "containers.0.securityContext.runAsNonRoot", False),
        ("Running as Non-root user", "containers.0.securityContext.runAsUser", 0),
    ],
)
def test_restricted_check_catches_each_violation(control, path, value):
    """The check below is only as good as its rules: each one fires on its violation."""
    import copy

    pod = copy.deepcopy(COMPLIANT)
    assert restricted_violations(pod) == []
    *parents, last = path.split(".")
    node = pod
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[int(last) if last.isdigit() else last] = value
    assert any(v.startswith(control + ":") for v in restricted_violations(pod)), (
        restricted_violations(pod)
    )


def test_job_template_and_rendered_jobs_meet_the_restricted_profile(jobs):
    template = load_template(k8s_schema.DEFAULT_TEMPLATE)
    for job in [template, jobs[0], jobs[-1]]:
        [(where, meta, pod)] = pod_templates(job)
        assert restricted_violations(pod, meta) == [], where


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_of_the_overlays_meets_the_restricted_profile(overlay, tmp_path):
    """With and without the launcher: a pod the namespace rejects never starts."""
    for objects in (kustomize(overlay), kustomize_dir(with_launcher(tmp_path, overlay))):
        pods = [t for obj in objects for t in pod_templates(obj)]
        assert pods
        for where, meta, pod in pods:
            assert restricted_violations(pod, meta) == [], where


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
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "vsgd-mlflow-db"


def test_job_template_is_not_a_kustomize_resource():
    """Applying the base must not start a run without a spec: the Job template is package
    data of `pipeline`, and no manifest under k8s/ that kustomize applies is a training Job."""
    assert k8s_schema.DEFAULT_TEMPLATE == ROOT / "pipeline" / "templates" / "job-template.yaml"
    assert load_template(k8s_schema.DEFAULT_TEMPLATE)["kind"] == "Job"
    assert not list(K8S.rglob("job-template.yaml"))
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = kustomization.parent / resource
            for doc in yaml.safe_load_all(path.read_text()) if path.is_file() else []:
                assert not (
                    doc and doc.get("kind") == "Job" and "pipeline.train" in json.dumps(doc)
                ), path


# -- the in-cluster launcher (components/launcher) ---------------------------------------------

LAUNCHER = K8S / "components" / "launcher"
LAUNCHER_IMAGE = "registry.example.com/vsgd-repro"


def with_launcher(tmp_path, overlay):
    """An overlay with the launcher added, as its kustomization.yaml's comment says to."""
    root = tmp_path / f"{overlay}-with-launcher"
    root.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "vsgd",
        "labels": [{"pairs": {"app.kubernetes.io/part-of": "vsgd-repro"}}],
        # kustomize takes relative paths only
        "resources": [os.path.relpath(K8S / "overlays" / overlay, root)],
        "components": [os.path.relpath(LAUNCHER, root)],
        "images": [{"name": "vsgd-repro", "newName": LAUNCHER_IMAGE, "newTag": image.image_tag()}],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return root


def test_launcher_is_not_in_any_overlay_by_default():
    """Opt-in: applying an overlay must not start a grid."""
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load(
            (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        )
        assert not [c for c in kustomization.get("components", []) if "launcher" in c]
    assert yaml.safe_load((LAUNCHER / "kustomization.yaml").read_text())["kind"] == "Component"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_with_the_launcher_builds_and_validates(overlay, tmp_path):
    objects = kustomize_dir(with_launcher(tmp_path, overlay))
    for obj in objects:
        validate_strictly(obj)
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "vsgd"
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    job = by_name[("Job", "vsgd-launcher")]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # Its own identity, with the token: the one pod that talks to the API server.
    assert pod["serviceAccountName"] == "vsgd-launcher"
    assert ("ServiceAccount", "vsgd-launcher") in by_name and ("Role", "vsgd-launcher") in by_name
    assert pod["automountServiceAccountToken"] is True
    assert container["image"] == f"{LAUNCHER_IMAGE}:{image.image_tag()}"
    assert {"configMapRef": {"name": "vsgd-endpoints"}} in container["envFrom"]
    assert {"secretRef": {"name": "vsgd-credentials"}} in container["envFrom"]
    assert ("ConfigMap", "vsgd-endpoints") in by_name
    # Restarts continue: the workspace is a claim that outlives the pod.
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["workspace"]["persistentVolumeClaim"]["claimName"]
    assert claim == "vsgd-launcher-workspace" and ("PersistentVolumeClaim", claim) in by_name
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["workingDir"] == mounts["workspace"]
    # The script is the one in the repository, run from its ConfigMap.
    script = by_name[("ConfigMap", volumes["script"]["configMap"]["name"])]
    assert script["data"]["launch.sh"] == (LAUNCHER / "launch.sh").read_text()
    assert container["command"] == ["sh", f"{mounts['script']}/launch.sh"]
    # The user's params.yaml: optional, so a missing one is launch.sh's message.
    assert volumes["params"]["configMap"] == {"name": "vsgd-params", "optional": True}
    assert mounts["params"] == "/etc/vsgd-params"
    spec = job["spec"]
    assert 1 <= spec["backoffLimit"] <= 6 and pod["restartPolicy"] == "Never"
    assert {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    } in spec["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "launcher", "operator": "In", "values": [78]},
    } in spec["podFailurePolicy"]["rules"]
    assert not [e for e in container.get("env", []) if "SECRET" in e["name"] or "KEY" in e["name"]]


def launcher_env():
    """The launcher container's plain environment variables, from its manifest."""
    [job] = [
        d
        for d in yaml.safe_load_all((LAUNCHER / "launcher.yaml").read_text())
        if d["kind"] == "Job"
    ]
    [container] = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


@pytest.fixture
def launch(tmp_path):
    """Run launch.sh as the pod would (its manifest's environment), outside the image: the
    image's /app/project, the ConfigMap's params.yaml and the workspace are directories here,
    `dvc` a stand-in that logs its calls, and `python` this one with the checkout's code."""
    project, workspace, bin_dir = tmp_path / "project", tmp_path / "workspace", tmp_path / "bin"
    for d in (project, workspace, bin_dir):
        d.mkdir()
    shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    for package in ("vsgd", "pipeline"):
        (project / package).mkdir()
        # The image's copies are DVC's dependencies; running them would be a bug.
        (project / package / "__init__.py").write_text("raise SystemExit('workspace copy')\n")
    (bin_dir / "dvc").write_text(
        '#!/bin/sh\necho "$*" >> "$DVC_LOG"\n[ "$1" != init ] || mkdir .dvc\n'
    )
    (bin_dir / "dvc").chmod(0o755)
    # A wrapper, not a symlink: Python finds its venv from the path it was started by, and
    # a symlink outside the venv would start the base interpreter without the packages.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    params = tmp_path / "params.yaml"

    def run():
        env = {
            **launcher_env(),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "VSGD_WORKSPACE": str(workspace),
            "VSGD_PROJECT": str(project),
            "VSGD_PARAMS": str(params),
            "DVC_LOG": str(tmp_path / "dvc.log"),
            "HOME": str(tmp_path),
        }
        proc = subprocess.run(
            ["sh", str(LAUNCHER / "launch.sh")],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        calls = (
            (tmp_path / "dvc.log").read_text().splitlines()
            if (tmp_path / "dvc.log").exists()
            else []
        )
        (tmp_path / "dvc.log").unlink(missing_ok=True)
        return proc, calls

    run.params, run.workspace, run.project = params, workspace, project
    return run


def launcher_params(**changes):
    raw = yaml.safe_load(PARAMS.read_text())
    raw["executor"]["kind"] = "kubernetes"
    raw["storage"]["remote"] = "s3://vsgd/grid"
    for key, value in changes.items():
        section, name = key.split("__")
        raw[section][name] = value
    return yaml.safe_dump(raw)


def test_launcher_without_its_params_configmap_says_how_to_create_it(launch):
    proc, calls = launch()
    assert proc.returncode == 78 and calls == []
    assert "kubectl -n vsgd create configmap vsgd-params --from-file=params.yaml" in proc.stderr


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"executor__kind": "local"}, "executor.kind must be kubernetes"),
        ({"storage__endpoint_url": "http://localhost:8333"}, "storage.endpoint_url"),
        ({"storage__remote": None}, "storage.remote"),
    ],
)
def test_launcher_refuses_params_it_cannot_run_in_the_cluster(launch, changes, problem):
    launch.params.write_text(launcher_params(**changes))
    proc, calls = launch()
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert problem in proc.stderr and calls == []


def test_launcher_restart_continues_in_its_workspace_with_the_current_params(launch):
    launch.params.write_text(launcher_params())
    proc, calls = launch()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls == ["init --no-scm", "repro train"]
    workspace = launch.workspace
    assert (workspace / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    assert (workspace / "params.yaml").read_text() == launch.params.read_text()
    assert (workspace / "pipeline" / "__init__.py").is_file()
    (workspace / "results").mkdir()
    (workspace / "results" / "kept").write_text("a finished run\n")
    (workspace / "pipeline" / "stale.py").write_text("")
    # The user replaced the ConfigMap; the pod restarts (crash, eviction, new node).
    launch.params.write_text(launcher_params(executor__max_parallel=4))
    proc, calls = launch()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls == ["repro train"]  # DVC's state is kept
    assert "max_parallel: 4" in (workspace / "params.yaml").read_text()
    assert (workspace / "results" / "kept").is_file()
    assert not (workspace / "pipeline" / "stale.py").exists()  # the image's code, anew


# -- rendered Jobs ---------------------------------------------------------------------------


def test_rendered_jobs_validate_strictly(jobs):
    for job in jobs[:: max(1, len(jobs) // 6)] + [jobs[-1]]:  # every shape, not 60 copies
        validate_strictly(job)


def test_job_names_are_unique_dns_labels(jobs):
    names = [j["metadata"]["name"] for j in jobs]
    assert len(set(names)) == len(names)
    for job in jobs:
        name = job["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= MAX_NAME, name
        assert re.search(r"-[0-9a-f]{12}$", name) and job["metadata"]["labels"][RUN_HASH_LABEL]


def test_two_pipelines_sharing_a_namespace_never_share_a_job_name():
    spec = {"name": "cifar100-vgg16-vsgd-s0-0123abcd", "run_hash": "0123abcd45678901"}
    names = [
        job_name(spec, params_with(*extra))
        for extra in ((), ("storage.remote=s3://other/grid",), ("executor.kubernetes.owner=alice",))
    ]
    assert len(set(names)) == 3
    assert job_name(spec, params_with()) == names[0]  # and the same pipeline finds its own


def test_long_names_are_shortened_and_stay_unique():
    spec = {
        "name": "tinyimagenet-convmixer_256_8-adamw-lr0.000123456-s12345-deadbeef",
        "run_hash": "deadbeef00112233",
    }
    other = {**spec, "run_hash": "deadbeef99887766"}
    a, b = job_name(spec), job_name(other)
    assert len(a) <= MAX_NAME and DNS_LABEL.match(a) and a != b
    assert a.startswith("tinyimagenet-convmixer-256-8-adamw-lr0-000123")
    assert job_name({"name": "___", "run_hash": "0123456789abcdef"}) == "run-0123456789ab"


def test_labels_are_valid_and_on_job_and_pods(jobs):
    for job in jobs:
        labels = job["metadata"]["labels"]
        assert job["spec"]["template"]["metadata"]["labels"] == labels
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
            "app.kubernetes.io/part-of",
            "app.kubernetes.io/managed-by",
            RUN_HASH_LABEL,
            "vsgd-repro/dataset",
            "vsgd-repro/arch",
            "vsgd-repro/optimizer",
        ):
            assert key in labels
        for key, value in labels.items():
            assert isinstance(value, str) and len(value) <= 63 and LABEL_VALUE.match(value), (
                key,
                value,
            )
            assert k8s_names.is_label_key(key)


def test_production_job_spec(jobs):
    for job in jobs:
        spec = job["spec"]
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        assert pod["restartPolicy"] == "Never"
        assert 0 <= spec["backoffLimit"] <= 6
        assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] >= 0
        rules = spec["podFailurePolicy"]["rules"]
        assert {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        } in rules
        assert {
            "action": "FailJob",
            "onExitCodes": {"containerName": container["name"], "operator": "In", "values": [78]},
        } in rules
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
        assert container["command"] == ["python", "-m", RUN_MODULE]
        run = json.loads(container["args"][1])
        assert container["args"][0] == "--spec-json"
        assert run["checkpoint"].startswith("s3://vsgd/grid/checkpoints/")
        assert job["metadata"]["labels"][RUN_HASH_LABEL] == run["run_hash"]


def test_job_template_gives_the_trainer_time_and_a_place_to_report(jobs):
    """On SIGTERM the trainer checkpoints and uploads before SIGKILL; a failure's reason is
    in the termination message (the trainer's, or the log's tail); the full log is kept."""
    for job in [load_template(k8s_schema.DEFAULT_TEMPLATE), jobs[0]]:
        pod = job["spec"]["template"]["spec"]
        container = k8s_schema.train_container(job)
        assert pod["terminationGracePeriodSeconds"] == 120
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VSGD_TERMINATION_LOG"] == "/dev/termination-log"
        assert env["VSGD_TEE_LOG"] == "1"


@pytest.mark.parametrize("override", [None, "executor.kubernetes.scratch_size=50Gi"])
def test_scratch_volume_is_requested_from_the_node(override):
    """The scratch emptyDir lives on the node's disk: without an equal ephemeral-storage
    request the scheduler may place the pod where it does not fit (and it is evicted)."""
    params = params_with(*([override] if override else []))
    job = render_job(expand(params)[0], params)
    validate_strictly(job)
    pod = job["spec"]["template"]["spec"]
    [scratch] = [v for v in pod["volumes"] if v["name"] == k8s_schema.SCRATCH_VOLUME]
    requests = k8s_schema.train_container(job)["resources"]["requests"]
    assert requests["ephemeral-storage"] == scratch["emptyDir"]["sizeLimit"]
    assert scratch["emptyDir"]["sizeLimit"] == ("50Gi" if override else "20Gi")


def test_resources_gpu_count_and_shm_within_memory(jobs):
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        gpus = resources["limits"]["nvidia.com/gpu"]
        assert re.fullmatch(r"[1-9][0-9]*", str(gpus)), "GPUs are whole devices"
        assert (
            "nvidia.com/gpu" not in resources["requests"]
            or resources["requests"]["nvidia.com/gpu"] == gpus
        )
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
        "executor.kubernetes.namespace=ml",
        "executor.kubernetes.image=reg.example.com/v:1",
        "executor.kubernetes.gpus=1",
        "executor.kubernetes.gpu_resource=amd.com/gpu",
        "executor.kubernetes.cpu=8",
        "executor.kubernetes.memory=32Gi",
        "executor.kubernetes.shm_size=8Gi",
        "executor.kubernetes.node_selector={gpu.example.com/type: a100}",
        "executor.kubernetes.tolerations=[{key: nvidia.com/gpu, operator: Exists, "
        "effect: NoSchedule}]",
        "executor.kubernetes.priority_class=batch-low",
        "executor.kubernetes.backoff_limit=1",
        "executor.kubernetes.active_deadline_seconds=3600",
        "executor.kubernetes.ttl_seconds_after_finished=null",
        "executor.kubernetes.credentials_secret=my-creds",
        "executor.kubernetes.image_pull_secrets=[regcred]",
        "executor.kubernetes.env={TORCH_LOGS: recompiles}",
    )
    job = render_job(expand(params)[0], params)
    validate_strictly(job)
    pod = job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert job["metadata"]["namespace"] == "ml" and c["image"] == "reg.example.com/v:1"
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "20Gi"},
        "limits": {"memory": "32Gi", "amd.com/gpu": "1"},
    }
    assert pod["nodeSelector"] == {"gpu.example.com/type": "a100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["priorityClassName"] == "batch-low" and pod["imagePullSecrets"] == [
        {"name": "regcred"}
    ]
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert "ttlSecondsAfterFinished" not in job["spec"]
    assert {"secretRef": {"name": "my-creds"}} in c["envFrom"]
    assert {"name": "TORCH_LOGS", "value": "recompiles"} in c["env"]
    [shm] = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["sizeLimit"] == "8Gi"


def container_env(job) -> dict:
    return {e["name"]: e.get("value") for e in k8s_schema.train_container(job)["env"]}


@pytest.mark.parametrize(
    "cpu, threads",
    [
        (None, "4"),  # the template's request
        ("3500m", "3"),
        ("500m", "1"),
        ("1.5", "1"),
        ("12", "12"),
        ("96", "32"),  # inductor's own ceiling
    ],
)
def test_compile_threads_follow_the_cpu_request(cpu, threads):
    """Inductor would start a compile worker per CPU of the node (up to 32), whatever the
    pod's share: the Job caps them at the CPUs it requests."""
    params = params_with(*([f"executor.kubernetes.cpu={cpu}"] if cpu else []))
    job = render_job(expand(params)[0], params)
    validate_strictly(job)
    assert container_env(job)[COMPILE_THREADS_ENV] == threads


def test_compile_threads_without_a_cpu_request():
    """A template without a CPU request: the limit, which Kubernetes makes the request;
    with neither, nothing to size the workers by, so inductor's own count stays."""
    params = params_with()
    template = load_template(k8s_schema.DEFAULT_TEMPLATE)
    resources = k8s_schema.train_container(template)["resources"]
    del resources["requests"]["cpu"]
    job = render_job(expand(params)[0], params, template)
    validate_strictly(job)
    assert COMPILE_THREADS_ENV not in container_env(job)
    resources["limits"]["cpu"] = "6"
    job = render_job(expand(params)[0], params, template)
    validate_strictly(job)
    assert container_env(job)[COMPILE_THREADS_ENV] == "6"


def test_compile_threads_set_in_the_params_env_win():
    params = params_with(
        "executor.kubernetes.cpu=8", f"executor.kubernetes.env={{{COMPILE_THREADS_ENV}: 2}}"
    )
    job = render_job(expand(params)[0], params)
    validate_strictly(job)
    env = k8s_schema.train_container(job)["env"]
    assert [e for e in env if e["name"] == COMPILE_THREADS_ENV] == [
        {"name": COMPILE_THREADS_ENV, "value": "2"}
    ]


def test_cpu_only_jobs_request_no_gpu():
    params = params_with("executor.kubernetes.gpus=0")
    job = render_job(expand(params)[0], params)
    validate_strictly(job)
    assert not [
        k
        for k in job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        if k.endswith("/gpu")
    ]


@pytest.mark.parametrize(
    "override, problem",
    [
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
    ],
)
def test_validation_reports_each_bad_setting(override, problem):
    raw = yaml.safe_load(PARAMS.read_text())
    key, value = override.split("=", 1)
    section = raw.setdefault("executor", {}).get("kubernetes") or {}
    section[key.rsplit(".", 1)[1]] = yaml.safe_load(value)
    raw["executor"]["kubernetes"] = section
    problems = k8s_schema.validate(raw)
    assert any(problem in p for p in problems), problems


def test_validation_of_the_defaults_and_the_remote():
    raw = yaml.safe_load(PARAMS.read_text())
    assert k8s_schema.validate(raw) == []
    raw["executor"] = {**raw["executor"], "kind": "kubernetes"}
    raw["storage"] = {**raw["storage"], "remote": None}
    assert any(p.startswith("storage.remote") for p in k8s_schema.validate(raw))
    raw["executor"]["kubernetes"] = "big"
    assert k8s_schema.validate(raw) == ["executor.kubernetes: expected a mapping, got str"]
