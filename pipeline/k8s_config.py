"""params.yaml's `executor.kubernetes` section: its keys, their defaults, their validation.

Every key is optional. Job settings left out keep the value of the Job template
(`pipeline/templates/job-template.yaml`), so the template is the one place defaults live;
the keys below only say what may be overridden. `pipeline.config.validate` calls
`validate(params)`. Light on purpose (no kubernetes client import): validation must stay
instant.
"""

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import yaml

# Package data next to this module: an installed package (the image) has it too.
DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "job-template.yaml"
TRAIN_CONTAINER = "train"   # the template's container that runs the trainer
SHM_VOLUME = "dshm"
SCRATCH_VOLUME = "scratch"

# How the executor behaves (not part of the Job): key -> default.
BEHAVIOUR = {
    "context": None,              # kubeconfig context; null = current (or in-cluster config)
    "template": None,             # Job template path; null = DEFAULT_TEMPLATE
    "log_tail_lines": 30,         # pod log lines shown when a run fails
    "progress_interval": 60,      # seconds between progress lines per run
    # An unreachable API server (refused, reset, 5xx, 429) is retried with backoff this many
    # seconds; then the launcher leaves, the Jobs go on, and the next start adopts them.
    "outage_budget": 900,
    # A pod that cannot start (image pull, missing Secret/ConfigMap, refused by quota or
    # admission) fails its run after this many seconds of the same reason.
    "start_grace": 300,
    # A pod the scheduler cannot place (no free GPU) fails its run after this many seconds;
    # null waits as long as the Job's activeDeadlineSeconds (a cluster autoscaler, a queue).
    "unschedulable_limit": 3600,
    # Jobs carry this label (`vsgd-repro/owner`): only Jobs with it are adopted or listed.
    "owner": None,
    # Repository of the default image `<image_repository>:<code version tag>` (`make image`);
    # `image` replaces the whole reference (a registry tag, or pinned by digest).
    "image_repository": "vsgd-repro",
}

# Job settings: key -> what is allowed (the checks are in _check_job_keys).
JOB_KEYS = ("namespace", "image", "image_pull_policy", "image_pull_secrets", "service_account",
            "gpus", "gpu_resource", "cpu", "memory", "shm_size", "scratch_size",
            "node_selector", "tolerations", "priority_class", "backoff_limit",
            "active_deadline_seconds", "ttl_seconds_after_finished", "endpoints_config_map",
            "credentials_secret", "env", "labels", "annotations", "suspend")
KEYS = tuple(BEHAVIOUR) + JOB_KEYS

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# The label that puts a Job in a Kueue LocalQueue; with it Kueue admits Jobs (un-suspends
# them) as quota frees up, so the launcher submits every run (https://kueue.sigs.k8s.io/docs/
# tasks/run/jobs/).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MAX_GPUS = 1    # the trainer drives one device
TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_SUFFIX = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
           "Pi": 2**50, "Ei": 2**60}


def section(params: dict) -> dict:
    """The `executor.kubernetes` mapping ({} when absent or null)."""
    return (params.get("executor") or {}).get("kubernetes") or {}


def settings(params: dict) -> dict:
    """Behaviour settings with their defaults, plus the Job keys that are set (for those,
    null means "remove from the template", e.g. `priority_class: null`)."""
    given = section(params)
    return {**BEHAVIOUR, **{k: v for k, v in given.items() if v is not None or k in JOB_KEYS}}


def queue_name(params: dict) -> str | None:
    """The Kueue queue the Jobs are submitted to (their QUEUE_LABEL), if any."""
    return (section(params).get("labels") or {}).get(QUEUE_LABEL)


def max_parallel(params: dict) -> int | None:
    """Jobs active at once: `executor.max_parallel`; unset, every run with a Kueue queue
    (admission is the queue's job) and one at a time without."""
    value = (params.get("executor") or {}).get("max_parallel")
    if value is not None:
        return int(value)
    return None if queue_name(params) else 1


def template_path(params: dict) -> Path:
    path = section(params).get("template")
    return Path(path) if path else DEFAULT_TEMPLATE


def load_template(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def parse_quantity(text) -> Decimal:
    """A Kubernetes resource quantity ("16Gi", "500m", 4) as a number; ValueError if not one."""
    match = QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    try:
        return Decimal(match["num"]) * _SUFFIX[match["suffix"] or ""]
    except InvalidOperation as exc:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc


def validate(params: dict) -> list[str]:
    """Problems of `executor.kubernetes` (and what the kubernetes executor needs elsewhere)."""
    executor = params.get("executor") or {}
    raw = executor.get("kubernetes")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return [f"executor.kubernetes: expected a mapping, got {type(raw).__name__}"]
    problems = []
    base = "executor.kubernetes"
    for key in raw:
        if key not in KEYS:
            problems.append(f"{base}.{key}: unknown key; allowed: {', '.join(KEYS)}")
    _check_behaviour(raw, base, problems)
    _check_job_keys(raw, base, problems)
    template = None
    try:
        template = load_template(template_path(params))
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{base}.template: cannot read the Job template: {exc}")
    if isinstance(template, dict):
        _check_memory(raw, template, base, problems)
    if executor.get("kind") == "kubernetes":
        remote = (params.get("storage") or {}).get("remote")
        if not remote:
            problems.append("storage.remote: the kubernetes executor needs an s3:// remote "
                            "(pods share no disk with this machine: data, checkpoints and "
                            "results go through the store)")
    return problems


def _check_behaviour(raw, base, problems):
    for key in ("context", "template"):
        value = raw.get(key)
        if value is not None and not (isinstance(value, str) and value):
            problems.append(f"{base}.{key}: expected a non-empty string or null, got {value!r}")
    if "log_tail_lines" in raw and not _int(raw["log_tail_lines"], 1):
        problems.append(f"{base}.log_tail_lines: expected an integer >= 1, got "
                        f"{raw['log_tail_lines']!r}")
    for key in ("progress_interval", "outage_budget", "start_grace", "unschedulable_limit"):
        if key not in raw or (key == "unschedulable_limit" and raw[key] is None):
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{base}.{key}: expected seconds > 0"
                            + (" or null" if key == "unschedulable_limit" else "")
                            + f", got {value!r}")
    if raw.get("owner") is not None and not _label_value_ok(raw["owner"]):
        problems.append(f"{base}.owner: {raw['owner']!r}; allowed: null or a label value "
                        "(letters, digits, '-', '_', '.', at most 63, alphanumeric at both ends)")
    if "image_repository" in raw and not (isinstance(raw["image_repository"], str) and
                                          re.match(r"^[a-z0-9][a-z0-9._/:-]*$",
                                                   raw["image_repository"] or "")):
        problems.append(f"{base}.image_repository: {raw['image_repository']!r}; allowed: an "
                        "image repository such as registry.example.com/vsgd-repro")


def _check_job_keys(raw, base, problems):
    def bad(key, allowed):
        problems.append(f"{base}.{key}: {raw[key]!r}; allowed: {allowed}")

    for key in ("namespace",):
        if key in raw and not _name(raw[key], DNS_LABEL, 63):
            bad(key, "a DNS label (lowercase letters, digits, '-', at most 63)")
    for key in ("service_account", "priority_class", "endpoints_config_map",
                "credentials_secret"):
        value = raw.get(key)
        nullable = key != "service_account"
        if key in raw and not ((nullable and value is None) or _name(value, DNS_SUBDOMAIN, 253)):
            bad(key, "a Kubernetes object name" + (" or null" if nullable else ""))
    if "image" in raw and not (isinstance(raw["image"], str) and raw["image"].strip()
                               and raw["image"] == raw["image"].strip()):
        bad("image", "an image reference such as registry.example.com/vsgd-repro:0.1.0")
    if "image_pull_policy" in raw and raw["image_pull_policy"] not in PULL_POLICIES:
        bad("image_pull_policy", ", ".join(PULL_POLICIES))
    if "image_pull_secrets" in raw:
        value = raw["image_pull_secrets"]
        if not (isinstance(value, list) and all(_name(v, DNS_SUBDOMAIN, 253) for v in value)):
            bad("image_pull_secrets", "a list of Secret names")
    if "gpus" in raw and not _int(raw["gpus"], 0):
        bad("gpus", "an integer >= 0 (GPUs are whole devices)")
    elif "gpus" in raw and raw["gpus"] > MAX_GPUS:
        bad("gpus", f"0 or {MAX_GPUS}: a run trains on one device (no multi-GPU runs yet), so "
                    "more GPUs per Job would sit idle; run more Jobs at once instead "
                    "(executor.max_parallel)")
    if "gpu_resource" in raw and not (isinstance(raw["gpu_resource"], str) and re.match(
            r"^[a-z0-9.-]+/[a-z0-9][-a-z0-9_.]*$", raw["gpu_resource"])):
        bad("gpu_resource", "an extended resource name such as nvidia.com/gpu")
    for key in ("cpu", "memory", "shm_size", "scratch_size"):
        if key in raw and not _quantity(raw[key]):
            bad(key, "a positive Kubernetes quantity such as 4, 500m, 16Gi")
    if "node_selector" in raw:
        value = raw["node_selector"]
        if not (isinstance(value, dict) and all(
                _label_key(k) and isinstance(v, str) and LABEL_VALUE.match(v) and len(v) <= 63
                for k, v in value.items())):
            bad("node_selector", "a mapping of node label keys to label values (strings)")
    if "tolerations" in raw:
        _check_tolerations(raw["tolerations"], f"{base}.tolerations", problems)
    for key, minimum in (("backoff_limit", 0), ("active_deadline_seconds", 1)):
        if key in raw and not _int(raw[key], minimum):
            bad(key, f"an integer >= {minimum}")
    if "ttl_seconds_after_finished" in raw and not (
            raw["ttl_seconds_after_finished"] is None or _int(raw["ttl_seconds_after_finished"], 0)):
        bad("ttl_seconds_after_finished", "an integer >= 0, or null to keep finished Jobs")
    for key in ("labels", "annotations"):
        if key not in raw:
            continue
        value = raw[key]
        if not (isinstance(value, dict) and all(
                _label_key(k) and isinstance(v, str)
                and (key == "annotations" or _label_value_ok(v)) for k, v in value.items())):
            bad(key, "a mapping of label keys (prefix/name) to "
                     + ("label values (strings of at most 63 characters)" if key == "labels"
                        else "strings"))
        elif key == "labels" and any(k.startswith("vsgd-repro/") or
                                     k == "app.kubernetes.io/managed-by" for k in value):
            bad(key, "labels of your own: vsgd-repro/* and app.kubernetes.io/managed-by are "
                     "the pipeline's (use `owner` to tell pipelines apart)")
    if "suspend" in raw and not isinstance(raw["suspend"], bool):
        bad("suspend", "true (Jobs start suspended: a queue such as Kueue starts them) or false")
    if "env" in raw:
        value = raw["env"]
        if not (isinstance(value, dict) and all(
                isinstance(k, str) and ENV_NAME.match(k) and isinstance(v, (str, int, float))
                and not isinstance(v, bool) for k, v in value.items())):
            bad("env", "a mapping of variable names to string values (no secrets: use the "
                       "credentials Secret)")


def _check_tolerations(value, path, problems):
    if not isinstance(value, list):
        problems.append(f"{path}: expected a list of tolerations, got {value!r}")
        return
    for i, tol in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(tol, dict) or any(k not in TOLERATION_KEYS for k in tol):
            problems.append(f"{where}: {tol!r}; allowed keys: {', '.join(TOLERATION_KEYS)}")
            continue
        if tol.get("operator", "Equal") not in TOLERATION_OPERATORS:
            problems.append(f"{where}.operator: {tol['operator']!r}; allowed: "
                            f"{', '.join(TOLERATION_OPERATORS)}")
        if "effect" in tol and tol["effect"] not in TOLERATION_EFFECTS:
            problems.append(f"{where}.effect: {tol['effect']!r}; allowed: "
                            f"{', '.join(TOLERATION_EFFECTS)}")
        if "key" in tol and not _label_key(tol["key"]):
            problems.append(f"{where}.key: {tol['key']!r} is not a label key")
        if "tolerationSeconds" in tol and not _int(tol["tolerationSeconds"], 0):
            problems.append(f"{where}.tolerationSeconds: expected an integer >= 0")
        for key in ("key", "value"):
            if key in tol and not isinstance(tol[key], str):
                problems.append(f"{where}.{key}: expected a string, got {tol[key]!r}")


def _check_memory(raw, template, base, problems):
    """/dev/shm is memory-backed: its size limit must fit in the container's memory limit."""
    try:
        memory = raw.get("memory") or _template_memory_limit(template)
        shm = raw.get("shm_size") or _template_shm(template)
        if memory is not None and shm is not None and \
                parse_quantity(shm) > parse_quantity(memory):
            problems.append(f"{base}.shm_size: {shm} is larger than the memory limit {memory} "
                            "(/dev/shm is memory-backed and counts against it)")
    except (ValueError, KeyError, TypeError):
        return   # reported by the key checks, or the template's own tests


def _template_memory_limit(template):
    return train_container(template)["resources"]["limits"]["memory"]


def _template_shm(template):
    for volume in template["spec"]["template"]["spec"].get("volumes", []):
        if volume["name"] == SHM_VOLUME:
            return volume["emptyDir"].get("sizeLimit")
    return None


def train_container(job: dict) -> dict:
    for container in job["spec"]["template"]["spec"]["containers"]:
        if container["name"] == TRAIN_CONTAINER:
            return container
    raise KeyError(f"the Job template has no container named {TRAIN_CONTAINER!r}")


def _int(value, minimum):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _quantity(value):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return False
    try:
        return parse_quantity(value) > 0
    except ValueError:
        return False


def _label_value_ok(value):
    return isinstance(value, str) and len(value) <= 63 and bool(LABEL_VALUE.match(value))


def _name(value, pattern, limit):
    return isinstance(value, str) and len(value) <= limit and bool(pattern.match(value))


def _label_key(key):
    if not isinstance(key, str):
        return False
    prefix, _, name = key.rpartition("/")
    return (not prefix or _name(prefix, DNS_SUBDOMAIN, 253)) and \
        len(name) <= 63 and bool(LABEL_NAME.match(name))
