"""Run spec -> the `batch/v1` Job that trains it: the Job template plus the run plus
params.yaml's `executor.kubernetes` settings. The executor submits exactly what `render_job`
returns, and `python -m pipeline render-jobs --out DIR` writes the same objects as YAML, one
file per run of the grid, for `kubectl apply -f`.

A Job's name and labels say whose it is: the run (its hash) and the pipeline (its store and
`executor.kubernetes.owner`); `is_ours` is the one test of that.
"""

import copy
import hashlib
import json
import re
from pathlib import Path

import yaml

from vsgd.spec import ConfigError

from .. import storage
from ..config import load_params
from ..contract import COMPILE_THREADS_ENV, REQUIRE_CUDA_ENV, RESULTS_ENV, compile_threads
from ..image import image_ref
from ..params_file import read_yaml
from ..plan import LEAVE_OUT, plan
from .names import parse_quantity
from .schema import SCRATCH_VOLUME, SHM_VOLUME, settings, template_path, train_container

MAX_NAME = 63  # Job names become pod label values: DNS label length
HASH_SUFFIX = 12  # run-hash characters in the name: unique across any real grid
LABEL_PREFIX = "vsgd-repro"
RUN_HASH_LABEL = f"{LABEL_PREFIX}/run-hash"
RUN_NAME_ANNOTATION = f"{LABEL_PREFIX}/run-name"
RESULTS_ANNOTATION = f"{LABEL_PREFIX}/results"
STORE_LABEL = f"{LABEL_PREFIX}/store"  # which pipeline's store the Job reports to
OWNER_LABEL = f"{LABEL_PREFIX}/owner"  # executor.kubernetes.owner, when set
STORE_ANNOTATION = f"{LABEL_PREFIX}/store-uri"
MANAGED_BY = "vsgd-pipeline"
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"


def store_id(params: dict) -> str:
    """A label value naming the store the Jobs of this pipeline report to (a hash: label
    values cannot hold a URI)."""
    remote = (params["storage"]["remote"] or "").rstrip("/")
    return hashlib.sha256(remote.encode()).hexdigest()[:16]


def ownership(params: dict) -> dict:
    """The labels that make a Job this pipeline's: its store and, when set, its owner.
    Only Jobs carrying exactly these are adopted, listed or cancelled."""
    labels = {STORE_LABEL: store_id(params)}
    owner = settings(params).get("owner")
    if owner:
        labels[OWNER_LABEL] = owner
    return labels


def managed_selector(params: dict) -> str:
    """Label selector of this pipeline's Jobs (an owner is checked by `is_ours` as well:
    without one, Jobs of an owned pipeline on the same store are not ours)."""
    return ",".join([MANAGED_SELECTOR, f"{STORE_LABEL}={store_id(params)}"])


def why_not_ours(job: dict, params: dict) -> str | None:
    """Why `job` is not this pipeline's, naming the label that differs; None when it is
    (its managed-by label, and exactly this pipeline's ownership labels: store and owner)."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY:
        return f"not submitted by this project's launcher (no label {MANAGED_SELECTOR})"
    if labels.get(STORE_LABEL) != store_id(params):
        store = (meta.get("annotations") or {}).get(
            STORE_ANNOTATION
        ) or f"{STORE_LABEL}={labels.get(STORE_LABEL)}"
        return (
            f"it reports to another store ({store}; this pipeline's: {params['storage']['remote']})"
        )
    owner = settings(params).get("owner")
    if labels.get(OWNER_LABEL) != owner:
        return (
            f"it has another owner ({OWNER_LABEL}: {labels.get(OWNER_LABEL) or 'none'}; "
            f"this pipeline's: {owner or 'none'})"
        )
    return None


def is_ours(job: dict, params: dict) -> bool:
    return why_not_ours(job, params) is None


def name_taken(job: dict, params: dict) -> str:
    """Why a run fails whose Job name another pipeline's `job` holds. That Job is never
    adopted (its results go to another store) nor deleted (it is someone's work), and waiting
    could last as long as its TTL: the run fails, naming it, and the others go on."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    return (
        f"a Job named {name} exists in namespace {namespace} but is not this "
        f"pipeline's: {why_not_ours(job, params)}; it was left alone. Delete it if nobody "
        f"needs it (kubectl -n {namespace} delete job {name}), or give this pipeline its "
        f"own executor.kubernetes.owner (its Jobs then get other names)"
    )


def job_name(spec: dict, params: dict | None = None) -> str:
    """`<readable run name>-<12 hex>`, a DNS label of at most 63 characters.

    Deterministic in the run and, with `params`, in the pipeline's ownership (store, owner),
    so a resubmission finds the Job it made before and two pipelines sharing a namespace
    never claim each other's Jobs. Without `params`, the hex is the run hash's prefix.
    """
    suffix = spec["run_hash"][:HASH_SUFFIX]
    if params is not None:
        scope = json.dumps([spec["run_hash"], ownership(params)], sort_keys=True)
        suffix = hashlib.sha256(scope.encode()).hexdigest()[:HASH_SUFFIX]
    readable = spec["name"].lower()
    # The grid's names already end in a short run-hash prefix; the suffix replaces it.
    readable = re.sub(
        r"-[0-9a-f]{4,16}$",
        lambda m: "" if spec["run_hash"].startswith(m[0][1:]) else m[0],
        readable,
    )
    readable = re.sub(r"[^a-z0-9-]+", "-", readable)
    readable = re.sub(r"-{2,}", "-", readable).strip("-")
    readable = readable[: MAX_NAME - len(suffix) - 1].rstrip("-")
    return f"{readable}-{suffix}" if readable else f"run-{suffix}"


def results_uri(params: dict, spec: dict) -> str:
    """Where the pod uploads its results (metrics.json, curve.csv, config.json)."""
    return storage.results_uri(params["storage"]["remote"], spec["run_hash"])


def run_labels(spec: dict) -> dict:
    """Labels that identify a run; on the Job and its pods (selectors and `kubectl get -l`)."""
    return {
        RUN_HASH_LABEL: spec["run_hash"],
        f"{LABEL_PREFIX}/dataset": _label_value(spec["dataset"]),
        f"{LABEL_PREFIX}/arch": _label_value(spec["arch"]),
        f"{LABEL_PREFIX}/optimizer": _label_value(spec["optimizer"]["name"]),
        f"{LABEL_PREFIX}/seed": str(spec["seed"]),
    }


def load_template(path: Path) -> dict:
    """The Job template, read as the params file is (bounded; a ConfigError naming the file
    for anything in the way): its path is a params value."""
    return read_yaml(path)


def job_namespace(params: dict, template: dict | None = None) -> str:
    """Where the Jobs go: `executor.kubernetes.namespace`, else the template's."""
    if template is None:
        template = load_template(template_path(params))
    return settings(params).get("namespace") or template["metadata"].get("namespace") or "default"


def render_job(spec: dict, params: dict, template: dict | None = None) -> dict:
    """The Job for one run spec (a plain dict, ready for the API or YAML)."""
    if template is None:
        template = load_template(template_path(params))
    job = copy.deepcopy(template)
    cfg = settings(params)
    name = job_name(spec, params)
    labels = {
        **job["metadata"].get("labels", {}),
        **(cfg.get("labels") or {}),
        "app.kubernetes.io/instance": name,
        **run_labels(spec),
        **ownership(params),
    }
    job["metadata"] = {
        "name": name,
        "namespace": job_namespace(params, template),
        "labels": labels,
        "annotations": {
            **job["metadata"].get("annotations", {}),
            **(cfg.get("annotations") or {}),
            RUN_NAME_ANNOTATION: spec["name"],
            RESULTS_ANNOTATION: results_uri(params, spec),
            STORE_ANNOTATION: params["storage"]["remote"],
        },
    }
    pod_meta = job["spec"]["template"].setdefault("metadata", {})
    pod_meta["labels"] = {**pod_meta.get("labels", {}), **labels}
    pod_meta["annotations"] = {**pod_meta.get("annotations", {}), RUN_NAME_ANNOTATION: spec["name"]}
    _apply_job_settings(job["spec"], cfg)
    pod = job["spec"]["template"]["spec"]
    _apply_pod_settings(pod, cfg)
    container = train_container(job)
    # Compact JSON: the argument is what `kubectl describe` shows.
    container["args"] = ["--spec-json", json.dumps(spec, separators=(",", ":"))]
    _apply_container_settings(container, cfg, results_uri(params, spec))
    return job


def _apply_job_settings(spec, cfg):
    if "suspend" in cfg:
        # Kueue also suspends a Job with a queue label itself (its webhook); this is for
        # other queue controllers, or to start runs by hand (`kubectl patch`).
        _set_or_drop(spec, "suspend", True if cfg["suspend"] else None)
    for key, field in (
        ("backoff_limit", "backoffLimit"),
        ("active_deadline_seconds", "activeDeadlineSeconds"),
        ("ttl_seconds_after_finished", "ttlSecondsAfterFinished"),
    ):
        if key in cfg:
            _set_or_drop(spec, field, cfg[key])


def _apply_pod_settings(pod, cfg):
    if "service_account" in cfg:
        pod["serviceAccountName"] = cfg["service_account"]
    if "priority_class" in cfg:
        _set_or_drop(pod, "priorityClassName", cfg["priority_class"])
    if "node_selector" in cfg:
        _set_or_drop(pod, "nodeSelector", dict(cfg["node_selector"]) or None)
    if "tolerations" in cfg:
        _set_or_drop(pod, "tolerations", [dict(t) for t in cfg["tolerations"]] or None)
    if "image_pull_secrets" in cfg:
        _set_or_drop(
            pod, "imagePullSecrets", [{"name": n} for n in cfg["image_pull_secrets"]] or None
        )
    for volume in pod.get("volumes", []):
        if volume["name"] == SHM_VOLUME and "shm_size" in cfg:
            volume["emptyDir"]["sizeLimit"] = str(cfg["shm_size"])
        if volume["name"] == SCRATCH_VOLUME and "scratch_size" in cfg:
            volume["emptyDir"]["sizeLimit"] = str(cfg["scratch_size"])


def _apply_container_settings(container, cfg, results):
    # The image is the code: by default tagged with the version of the code it holds
    # (`make image` builds that tag), so a code change is a new tag, never a stale one.
    if cfg.get("image"):
        container["image"] = cfg["image"]
    else:
        container["image"] = image_ref(cfg["image_repository"])
    if "image_pull_policy" in cfg:
        container["imagePullPolicy"] = cfg["image_pull_policy"]
    resources = container.setdefault("resources", {})
    requests = resources.setdefault("requests", {})
    limits = resources.setdefault("limits", {})
    if "cpu" in cfg:
        requests["cpu"] = str(cfg["cpu"])
    if "memory" in cfg:
        # Request = limit: a training run's memory is flat, and eviction under pressure
        # would only cost a restart from the last checkpoint.
        requests["memory"] = limits["memory"] = str(cfg["memory"])
    gpu = cfg.get("gpu_resource", "nvidia.com/gpu")
    template_gpus = next((limits.pop(k) for k in list(limits) if k.endswith("/gpu")), 0)
    gpus = cfg.get("gpus", template_gpus)
    if gpus:
        # Whole devices, in limits only (requests default to them); a string like every
        # quantity, which the client's models insist on.
        limits[gpu] = str(int(gpus))
    if "scratch_size" in cfg:
        # The scratch volume lives on the node's disk: the scheduler places the pod where it
        # fits only if the request says so.
        requests["ephemeral-storage"] = str(cfg["scratch_size"])
    env_from = [
        e
        for e in container.get("envFrom", [])
        if not ("configMapRef" in e and "endpoints_config_map" in cfg)
        and not ("secretRef" in e and "credentials_secret" in cfg)
    ]
    if cfg.get("endpoints_config_map"):
        env_from.append({"configMapRef": {"name": cfg["endpoints_config_map"]}})
    if cfg.get("credentials_secret"):
        env_from.append({"secretRef": {"name": cfg["credentials_secret"]}})
    _set_or_drop(container, "envFrom", env_from or None)
    # The CPU request, else the limit (Kubernetes defaults the request to it). With neither
    # there is nothing to size the workers by: inductor's own count stays.
    threads = pod_compile_threads(requests.get("cpu", limits.get("cpu")))
    extra = {
        **({COMPILE_THREADS_ENV: str(threads)} if threads else {}),
        # executor.kubernetes.env may set the compile threads itself: it wins.
        **{k: str(v) for k, v in (cfg.get("env") or {}).items()},
        RESULTS_ENV: results,
    }
    if gpus:
        extra[REQUIRE_CUDA_ENV] = "1"  # the pod fails at once without CUDA
    env = [e for e in container.get("env", []) if e["name"] not in extra]
    container["env"] = env + [{"name": k, "value": v} for k, v in extra.items()]


def pod_compile_threads(cpu) -> int | None:
    """`pipeline.contract.compile_threads` for a container whose CPU request is `cpu` (a
    Kubernetes quantity: "3500m" -> 3); None without one."""
    return compile_threads(None if cpu is None else parse_quantity(cpu))


def _set_or_drop(obj, key, value):
    if value is None:
        obj.pop(key, None)
    else:
        obj[key] = value


def _label_value(text) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text))[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def to_yaml(job: dict) -> str:
    return yaml.safe_dump(job, sort_keys=False, default_flow_style=False, width=100)


def write_jobs(specs: list[dict], params: dict, out_dir) -> list[Path]:
    """One `<job name>.yaml` per run in `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = load_template(template_path(params))
    paths = []
    for spec in specs:
        job = render_job(spec, params, template)
        path = out / f"{job['metadata']['name']}.yaml"
        path.write_text(to_yaml(job))
        paths.append(path)
    return paths


# -- `python -m pipeline render-jobs` -------------------------------------------------------


def grid_specs(params: dict) -> tuple[list[dict], bool]:
    """The runs of the current grid: the tune stage's and, once the tune stage has chosen
    for every tuned cell (results/tuning/selected.yaml), the final runs; `complete` is False
    without them."""
    planned = plan(params, LEAVE_OUT)
    if planned.undecided:  # the final runs' values come from the tune stage
        return planned.tuning, False
    return planned.tuning + planned.final, True


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for the Job YAML files")
    parser.add_argument("--params", default="params.yaml", help="params file (params.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. executor.kubernetes.image=... (repeatable)",
    )


def run(args) -> int:
    params = load_params(args.params, args.set)
    if not params["storage"]["remote"]:
        raise ConfigError(
            [
                "storage.remote: rendering Jobs needs an s3:// remote (pods reach "
                "their data, checkpoints and results through it)"
            ]
        )
    specs, complete = grid_specs(params)
    if not complete:
        print(
            f"the grid's final runs need the tune stage's choice "
            f"(results/tuning/selected.yaml): rendering its {len(specs)} tuning runs only"
        )
    paths = write_jobs(specs, params, args.out)
    for spec, path in zip(specs, paths):
        print(f"{path}  ({spec['name']})")
    print(f"{len(paths)} Jobs in {args.out}; submit one with `kubectl apply -f <file>`")
    return 0
