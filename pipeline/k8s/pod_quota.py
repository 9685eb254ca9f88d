"""What one run's pod counts against a namespace's ResourceQuotas, and whether it fits: the
preflight's check of what a Job's dry run cannot see. A quota on pods is charged when the Job
controller creates a pod, after the Job was admitted: a pod no quota lets in shows only as
FailedCreate events, `start_grace` later, run after run.

Usage is counted as the ResourceQuota admission counts it
(https://kubernetes.io/docs/concepts/policy/resource-quotas/): `pods` and `count/pods` one
each; the pod's requests under `requests.<name>` (and cpu, memory, ephemeral-storage and
hugepages also under their bare name), its limits under `limits.<name>`; a limit without a
request is also the request (the API's defaulting). A pod's amount of a resource is its
containers' sum (sidecars, init containers that keep running, included) or its largest
init container's, whichever is larger, plus its overhead
(https://kubernetes.io/docs/concepts/workloads/pods/init-containers/#resource-sharing-within-containers).
A quota with scopes counts only the pods they all match
(https://kubernetes.io/docs/concepts/policy/resource-quotas/#quota-scopes). A LimitRange's
defaults are not added: the Job template sets its container's requests and limits.
"""

from decimal import Decimal

from .names import parse_quantity

BARE_NAMES = ("cpu", "memory", "ephemeral-storage")  # quota keys meaning the request
BINARY = (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10))


def _amounts(container: dict) -> tuple[dict, dict]:
    resources = container.get("resources") or {}
    limits = {k: parse_quantity(v) for k, v in (resources.get("limits") or {}).items()}
    requests = {k: parse_quantity(v) for k, v in (resources.get("requests") or {}).items()}
    return {**limits, **requests}, limits


def _pod_total(pod: dict, which: int) -> dict:
    """The pod's requests (`which` 0) or limits (1), as the scheduler and the quota see them."""
    running = list(pod.get("containers") or [])
    init = []
    for container in pod.get("initContainers") or []:
        (running if container.get("restartPolicy") == "Always" else init).append(container)
    total: dict = {}
    for container in running:
        for name, value in _amounts(container)[which].items():
            total[name] = total.get(name, 0) + value
    for container in init:
        for name, value in _amounts(container)[which].items():
            total[name] = max(total.get(name, 0), value)
    for name, value in (pod.get("overhead") or {}).items():
        total[name] = total.get(name, 0) + parse_quantity(value)
    return total


def pod_usage(pod: dict) -> dict[str, Decimal]:
    """What one pod of `pod` (a pod spec) counts against a ResourceQuota, by quota key."""
    usage = {"pods": Decimal(1), "count/pods": Decimal(1)}
    for name, value in _pod_total(pod, 0).items():
        usage[f"requests.{name}"] = value
        if name in BARE_NAMES or name.startswith("hugepages-"):
            usage[name] = value
    for name, value in _pod_total(pod, 1).items():
        usage[f"limits.{name}"] = value
    return usage


def _scope_matches(scope: str, operator: str, values: list, pod: dict) -> bool:
    if scope == "PriorityClass":
        name = pod.get("priorityClassName")
        return {
            "In": name in values,
            "NotIn": name not in values,
            "Exists": bool(name),
            "DoesNotExist": not name,
        }.get(operator, False)
    if scope in ("BestEffort", "NotBestEffort"):
        # The BestEffort QoS class: no cpu or memory request or limit in any container.
        amounts = {**_pod_total(pod, 0), **_pod_total(pod, 1)}
        best_effort = not any(k in ("cpu", "memory") for k in amounts)
        matched = best_effort == (scope == "BestEffort")
    elif scope in ("Terminating", "NotTerminating"):
        matched = (pod.get("activeDeadlineSeconds") is not None) == (scope == "Terminating")
    elif scope == "CrossNamespacePodAffinity":
        matched = _cross_namespace_affinity(pod)
    else:
        return False  # a scope of other objects (persistent volume claims)
    return matched if operator != "DoesNotExist" else not matched


def _cross_namespace_affinity(pod: dict) -> bool:
    affinity = pod.get("affinity") or {}
    for kind in ("podAffinity", "podAntiAffinity"):
        rules = affinity.get(kind) or {}
        terms = list(rules.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
        terms += [
            t.get("podAffinityTerm") or {}
            for t in rules.get("preferredDuringSchedulingIgnoredDuringExecution") or []
        ]
        if any(t.get("namespaces") or t.get("namespaceSelector") is not None for t in terms):
            return True
    return False


def applies(quota: dict, pod: dict) -> bool:
    """Whether `quota` counts pods of `pod`: every one of its scopes matches."""
    spec = quota.get("spec") or {}
    scopes = [(s, "Exists", []) for s in spec.get("scopes") or []]
    scopes += [
        (e["scopeName"], e.get("operator", "Exists"), e.get("values") or [])
        for e in (spec.get("scopeSelector") or {}).get("matchExpressions") or []
    ]
    return all(_scope_matches(scope, op, values, pod) for scope, op, values in scopes)


def quantity_text(key: str, value: Decimal) -> str:
    """`value` as a quantity: bytes with the largest binary suffix that divides them, a
    fraction in thousandths (m), anything else as an integer."""
    if value != value.to_integral_value():
        return f"{int(value * 1000)}m"
    number = int(value)
    if "memory" in key or "storage" in key or "hugepages" in key:
        suffix = next((s for s, power in BINARY if number and number % (1 << power) == 0), "")
        power = dict(BINARY).get(suffix, 0)
        return f"{number >> power}{suffix}"
    return str(number)


def check(quotas: list[dict], pod: dict) -> tuple[list[str], list[str]]:
    """(beyond, full) for one pod of `pod` against `quotas` (ResourceQuota objects with their
    status): the quota keys where the pod alone exceeds a hard limit (no run can ever start),
    and those where what is in use now leaves no room for it (the runs wait), each as
    "<quota>: <key> ..." text."""
    usage = pod_usage(pod)
    beyond, full = [], []
    for quota in sorted(quotas, key=lambda q: q["metadata"]["name"]):
        if not applies(quota, pod):
            continue
        name = quota["metadata"]["name"]
        used = ((quota.get("status") or {}).get("used")) or {}
        for key, hard in sorted(((quota.get("spec") or {}).get("hard") or {}).items()):
            need = usage.get(key)
            if not need:
                continue
            limit, asks = parse_quantity(hard), quantity_text(key, need)
            if need > limit:
                beyond.append(f"{name}: {key} {asks} asked, hard limit {hard}")
            elif parse_quantity(used.get(key, 0)) + need > limit:
                full.append(f"{name}: {key} {asks} asked, {used.get(key, 0)} of {hard} in use")
    return beyond, full
