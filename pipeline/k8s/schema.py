"""params.yaml's `executor.kubernetes` section: its keys, their defaults, their validation.

Every key is optional. Job settings left out keep the value of the Job template
(`pipeline/templates/job-template.yaml`), so the template is the one place defaults live;
the keys below only say what may be overridden. `pipeline.params_check.validate` calls
`validate(params)`. Light on purpose (no kubernetes client import): validation must stay
instant.
"""

import re
from pathlib import Path

from vsgd.checker import Checker, Range, View
from vsgd.spec import ConfigError

from ..params_file import read_yaml
from .names import (
    ANNOTATIONS_MAX_BYTES,
    DNS_LABEL_RULE,
    DNS_SUBDOMAIN_RULE,
    LABEL_KEY_RULE,
    LABEL_VALUE_RULE,
    is_dns_label,
    is_dns_subdomain,
    is_label_key,
    is_label_value,
    parse_quantity,
)

# Package data of `pipeline`: an installed package (the image) has it too.
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "job-template.yaml"
TRAIN_CONTAINER = "train"  # the template's container that runs the trainer
SHM_VOLUME = "dshm"
SCRATCH_VOLUME = "scratch"

# How the executor behaves (not part of the Job): key -> default.
BEHAVIOUR = {
    "context": None,  # kubeconfig context; null = current (or in-cluster config)
    "template": None,  # Job template path; null = DEFAULT_TEMPLATE
    "log_tail_lines": 30,  # pod log lines shown when a run fails
    "progress_interval": 60,  # seconds between progress lines per run
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
JOB_KEYS = (
    "namespace",
    "image",
    "image_pull_policy",
    "image_pull_secrets",
    "service_account",
    "gpus",
    "gpu_resource",
    "cpu",
    "memory",
    "shm_size",
    "scratch_size",
    "node_selector",
    "tolerations",
    "priority_class",
    "backoff_limit",
    "active_deadline_seconds",
    "ttl_seconds_after_finished",
    "endpoints_config_map",
    "credentials_secret",
    "env",
    "labels",
    "annotations",
    "suspend",
)
KEYS = tuple(BEHAVIOUR) + JOB_KEYS

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# The label that puts a Job in a Kueue LocalQueue; with it Kueue admits Jobs (un-suspends
# them) as quota frees up, so the launcher submits every run (https://kueue.sigs.k8s.io/docs/
# tasks/run/jobs/).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MAX_GPUS = 1  # the trainer drives one device
TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# What pipeline.k8s.render adds to every Job's annotations besides the template's and these:
# the store URI twice (itself, and the results URI under it) and at most this much more
# (the keys, the run name, the results path).
PIPELINE_ANNOTATIONS_BYTES = 1024
# The API's integer fields are int32 (backoffLimit, ttlSecondsAfterFinished) or int64
# (activeDeadlineSeconds, a toleration's tolerationSeconds, a log's tailLines)
# (https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/job-v1/).
INT32_MAX = 2**31 - 1
# The executor's own durations (progress_interval, outage_budget, start_grace,
# unschedulable_limit): seconds, finite, and at most the API's int32 seconds (68 years), so
# each fits every place it goes: a watch's timeoutSeconds, a socket timeout (Python keeps
# those as int64 nanoseconds, 292 years), a sleep, a comparison with the monotonic clock.
EXECUTOR_SECONDS = Range(0, INT32_MAX, low_open=True)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


def validate(params: dict) -> list[str]:
    """Problems of `executor.kubernetes` (and what the kubernetes executor needs elsewhere).
    The Job template is read as the params file is (its path is a params value)."""
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
        template = read_yaml(template_path(params))
    except ConfigError as exc:
        problems += [f"{base}.template: cannot read the Job template: {p}" for p in exc.problems]
    if isinstance(template, dict):
        _check_memory(raw, template, base, problems)
        _check_annotations_size(raw, template, params, base, problems)
    if executor.get("kind") == "kubernetes":
        remote = (params.get("storage") or {}).get("remote")
        if not remote:
            problems.append(
                "storage.remote: the kubernetes executor needs an s3:// remote "
                "(pods share no disk with this machine: data, checkpoints and "
                "results go through the store)"
            )
    return problems


def _check_behaviour(raw, base, problems):
    for key in ("context", "template"):
        value = raw.get(key)
        if value is not None and not (isinstance(value, str) and value):
            problems.append(f"{base}.{key}: expected a non-empty string or null, got {value!r}")
    c, view = Checker(), View(raw)
    if "log_tail_lines" in raw:  # the API's tailLines, an int64
        c.integer(view, "log_tail_lines", f"{base}.log_tail_lines", minimum=1)
    for key in ("progress_interval", "outage_budget", "start_grace", "unschedulable_limit"):
        # unschedulable_limit: null waits as long as the Job's activeDeadlineSeconds.
        if key in raw and not (key == "unschedulable_limit" and raw[key] is None):
            c.number(view, key, f"{base}.{key}", EXECUTOR_SECONDS)  # seconds
    problems += c.problems
    # The owner is a label value on every Job (vsgd-repro/owner) and enters Job names only
    # through a hash (pipeline.k8s.render.job_name), so its label-value rule is all it needs.
    if raw.get("owner") is not None and not is_label_value(raw["owner"]):
        problems.append(f"{base}.owner: {raw['owner']!r}; allowed: null or {LABEL_VALUE_RULE}")
    if "image_repository" in raw and not (
        isinstance(raw["image_repository"], str)
        and re.fullmatch(r"[a-z0-9][a-z0-9._/:-]*", raw["image_repository"])
    ):
        problems.append(
            f"{base}.image_repository: {raw['image_repository']!r}; allowed: an "
            "image repository such as registry.example.com/vsgd-repro"
        )


def _check_job_keys(raw, base, problems):
    def bad(key, allowed):
        problems.append(f"{base}.{key}: {raw[key]!r}; allowed: {allowed}")

    c, view = Checker(), View(raw)
    if "namespace" in raw and not is_dns_label(raw["namespace"]):
        bad("namespace", DNS_LABEL_RULE)
    for key, what in (
        ("service_account", "ServiceAccount"),
        ("priority_class", "PriorityClass"),
        ("endpoints_config_map", "ConfigMap"),
        ("credentials_secret", "Secret"),
    ):
        value = raw.get(key)
        nullable = key != "service_account"
        if key in raw and not ((nullable and value is None) or is_dns_subdomain(value)):
            bad(key, f"a {what} name, {DNS_SUBDOMAIN_RULE}" + (", or null" if nullable else ""))
    if "image" in raw and not (
        isinstance(raw["image"], str)
        and raw["image"].strip()
        and raw["image"] == raw["image"].strip()
    ):
        bad("image", "an image reference such as registry.example.com/vsgd-repro:0.1.0")
    if "image_pull_policy" in raw and raw["image_pull_policy"] not in PULL_POLICIES:
        bad("image_pull_policy", ", ".join(PULL_POLICIES))
    if "image_pull_secrets" in raw:
        value = raw["image_pull_secrets"]
        if not isinstance(value, list):
            bad("image_pull_secrets", f"a list of Secret names, each {DNS_SUBDOMAIN_RULE}")
        for i, name in enumerate(value if isinstance(value, list) else ()):
            if not is_dns_subdomain(name):
                problems.append(
                    f"{base}.image_pull_secrets[{i}]: {name!r}; allowed: a Secret "
                    f"name, {DNS_SUBDOMAIN_RULE}"
                )
    if (
        "gpus" in raw
        and c.integer(view, "gpus", f"{base}.gpus", minimum=0)
        and raw["gpus"] > MAX_GPUS
    ):
        bad(
            "gpus",
            f"0 or {MAX_GPUS}: a run trains on one device (no multi-GPU runs yet), so "
            "more GPUs per Job would sit idle; run more Jobs at once instead "
            "(executor.max_parallel)",
        )
    # An extended resource is named by a label key with its domain prefix (nvidia.com/gpu).
    if "gpu_resource" in raw and not (
        is_label_key(raw["gpu_resource"]) and "/" in raw["gpu_resource"]
    ):
        bad(
            "gpu_resource",
            "an extended resource name such as nvidia.com/gpu (a domain prefix, '/', a name)",
        )
    for key in ("cpu", "memory", "shm_size", "scratch_size"):
        if key in raw and not _quantity(raw[key]):
            bad(key, "a positive Kubernetes quantity such as 4, 500m, 16Gi")
    if "node_selector" in raw:
        _check_string_map(
            raw["node_selector"], f"{base}.node_selector", "a node label", True, problems
        )
    if "tolerations" in raw:
        _check_tolerations(raw["tolerations"], f"{base}.tolerations", problems)
    # The API's integer fields, by their types and its own minimums.
    if "backoff_limit" in raw:
        c.integer(view, "backoff_limit", f"{base}.backoff_limit", 0, INT32_MAX)
    if "active_deadline_seconds" in raw:
        c.integer(view, "active_deadline_seconds", f"{base}.active_deadline_seconds", 1)
    if raw.get("ttl_seconds_after_finished") is not None:  # null keeps finished Jobs
        c.integer(
            view, "ttl_seconds_after_finished", f"{base}.ttl_seconds_after_finished", 0, INT32_MAX
        )
    problems += c.problems
    for key in ("labels", "annotations"):
        if key in raw:
            _check_string_map(
                raw[key],
                f"{base}.{key}",
                "a label" if key == "labels" else "an annotation",
                key == "labels",
                problems,
            )
    if isinstance(raw.get("labels"), dict) and any(
        isinstance(k, str) and (k.startswith("vsgd-repro/") or k == "app.kubernetes.io/managed-by")
        for k in raw["labels"]
    ):
        bad(
            "labels",
            "labels of your own: vsgd-repro/* and app.kubernetes.io/managed-by are "
            "the pipeline's (use `owner` to tell pipelines apart)",
        )
    if "suspend" in raw and not isinstance(raw["suspend"], bool):
        bad("suspend", "true (Jobs start suspended: a queue such as Kueue starts them) or false")
    if "env" in raw:
        value = raw["env"]
        if not (
            isinstance(value, dict)
            and all(
                isinstance(k, str)
                and ENV_NAME.fullmatch(k)
                and (isinstance(v, str) or _finite_number(v))
                for k, v in value.items()
            )
        ):
            bad(
                "env",
                "a mapping of variable names to string values (no secrets: use the "
                "credentials Secret)",
            )


def _check_string_map(value, path, what, values_are_labels, problems):
    """Labels, annotations, a node selector (`what`: "a label"...): label keys to strings
    (label values where `values_are_labels`), each bad entry reported at its key path."""
    if not isinstance(value, dict):
        problems.append(
            f"{path}: expected a mapping of {what.split(' ', 1)[1]} keys to "
            f"{'label values' if values_are_labels else 'strings'}, got {value!r}"
        )
        return
    for key, item in value.items():
        if not is_label_key(key):
            problems.append(f"{path}.{key}: {key!r} is not {what} key; allowed: {LABEL_KEY_RULE}")
        elif values_are_labels and not is_label_value(item):
            problems.append(f"{path}.{key}: {item!r}; allowed: {LABEL_VALUE_RULE}")
        elif not isinstance(item, str):
            problems.append(f"{path}.{key}: {item!r}; allowed: a string (quote it in YAML)")


def _check_annotations_size(raw, template, params, base, problems):
    """The Job's annotations, all keys and values together, within the API's limit: the
    template's, these, and the pipeline's own (PIPELINE_ANNOTATIONS_BYTES)."""
    given = raw.get("annotations")
    if not isinstance(given, dict):
        return
    remote = (params.get("storage") or {}).get("remote")
    theirs = (template.get("metadata") or {}).get("annotations") or {}
    size = (
        _annotations_bytes({**theirs, **given})
        + PIPELINE_ANNOTATIONS_BYTES
        + 2 * len(str(remote or "").encode())
    )
    if size > ANNOTATIONS_MAX_BYTES:
        problems.append(
            f"{base}.annotations: the Job's annotations would total {size} bytes "
            f"(with the template's and the pipeline's own); allowed: at most "
            f"{ANNOTATIONS_MAX_BYTES} ({ANNOTATIONS_MAX_BYTES // 1024} KiB, the "
            "API's limit)"
        )


def _annotations_bytes(annotations: dict) -> int:
    return sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items())


def _check_tolerations(value, path, problems):
    if not isinstance(value, list):
        problems.append(f"{path}: expected a list of tolerations, got {value!r}")
        return
    for i, tol in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(tol, dict) or any(k not in TOLERATION_KEYS for k in tol):
            problems.append(f"{where}: {tol!r}; allowed keys: {', '.join(TOLERATION_KEYS)}")
            continue
        operator = tol.get("operator", "Equal")
        if operator not in TOLERATION_OPERATORS:
            problems.append(
                f"{where}.operator: {tol['operator']!r}; allowed: {', '.join(TOLERATION_OPERATORS)}"
            )
        if "effect" in tol and tol["effect"] not in TOLERATION_EFFECTS:
            problems.append(
                f"{where}.effect: {tol['effect']!r}; allowed: {', '.join(TOLERATION_EFFECTS)}"
            )
        # The API: a label key, empty only with operator Exists (which matches every taint);
        # the value a label value, empty with Exists.
        if "key" in tol and not (
            is_label_key(tol["key"]) or (tol["key"] == "" and operator == "Exists")
        ):
            problems.append(
                f"{where}.key: {tol['key']!r}; allowed: {LABEL_KEY_RULE} (empty "
                "only with operator Exists)"
            )
        if "value" in tol and not is_label_value(tol["value"]):
            problems.append(f"{where}.value: {tol['value']!r}; allowed: {LABEL_VALUE_RULE}")
        elif tol.get("value") and operator == "Exists":
            problems.append(f"{where}.value: {tol['value']!r}; allowed: none with operator Exists")
        if "tolerationSeconds" in tol:  # int64 in the API
            c = Checker()
            c.integer(View(tol), "tolerationSeconds", f"{where}.tolerationSeconds", minimum=0)
            problems += c.problems


def _check_memory(raw, template, base, problems):
    """/dev/shm is memory-backed: its size limit must fit in the container's memory limit."""
    try:
        memory = raw.get("memory") or _template_memory_limit(template)
        shm = raw.get("shm_size") or _template_shm(template)
        if memory is not None and shm is not None and parse_quantity(shm) > parse_quantity(memory):
            problems.append(
                f"{base}.shm_size: {shm} is larger than the memory limit {memory} "
                "(/dev/shm is memory-backed and counts against it)"
            )
    except (ValueError, KeyError, TypeError):
        return  # reported by the key checks, or the template's own tests


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


def _finite_number(value):
    """A number an env value may be (it is written out as a string): never a bool, NaN or
    an infinity."""
    return Checker().number({"value": value}, "value", "value")


def _quantity(value):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return False
    try:
        return parse_quantity(value) > 0
    except ValueError:
        return False
