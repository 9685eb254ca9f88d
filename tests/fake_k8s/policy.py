"""Who may do what, and what admission lets in: RBAC Roles (with their namespace and
`resourceNames`), Pod Security admission levels, ResourceQuotas and their usage."""

import copy
import uuid

from test_k8s_manifests import restricted_violations

from pipeline.k8s.names import parse_quantity

from .objects import timestamp

# Pod Security admission: the namespace labels of each mode, and the levels modelled.
# https://kubernetes.io/docs/concepts/security/pod-security-admission/#pod-security-admission-labels-for-namespaces
PSA_LABEL = "pod-security.kubernetes.io/"
PSA_LEVELS = ("privileged", "restricted")  # baseline alone is not modelled

# The pod resources a ResourceQuota can track, by the quota's name for them: requests of the
# compute resources under their bare name too; extended resources (GPUs) by requests only.
# https://kubernetes.io/docs/concepts/policy/resource-quotas/#compute-resource-quota
BARE_REQUESTS = ("cpu", "memory", "ephemeral-storage")


def resources_text(resources):
    """A resource list as the API server prints it in a quota error: `k=v` sorted by name,
    comma-separated, each quantity in the form of its unit (binary suffixes for bytes)."""

    def quantity(name, value):
        if value == value.to_integral_value():
            number = int(value)
            if "memory" in name or "storage" in name:
                for suffix, power in (("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
                    if number and number % (1 << power) == 0:
                        return f"{number >> power}{suffix}"
            return str(number)
        return f"{int(value * 1000)}m"

    return ",".join(f"{k}={quantity(k, v)}" for k, v in sorted(resources.items()))


def grants(values, value):
    return "*" in (values or ()) or value in (values or ())


def pod_requests(spec):
    """What one pod counts against a ResourceQuota (quota name -> amount). A limit without a
    request is also the request, as the API's defaulting makes it.
    https://kubernetes.io/docs/concepts/configuration/manage-resources-containers/#requests-and-limits
    """
    usage = {"pods": parse_quantity(1), "count/pods": parse_quantity(1)}
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = {**limits, **(resources.get("requests") or {})}
        for name, value in requests.items():
            keys = [f"requests.{name}"] + ([name] if name in BARE_REQUESTS else [])
            for key in keys:
                usage[key] = usage.get(key, 0) + parse_quantity(value)
        for name, value in limits.items():
            usage[f"limits.{name}"] = usage.get(f"limits.{name}", 0) + parse_quantity(value)
    return usage


class Policy:
    """RBAC, Pod Security and ResourceQuota admission of the test API server."""

    # -- authorization ------------------------------------------------------------------

    def bind_role(self, rules, ns="vsgd"):
        """Bind the kubeconfig's user to a Role with `rules` (RBAC PolicyRules, e.g. those of
        k8s/base/launcher-rbac.yaml) in namespace `ns`; `ns=None`: a ClusterRole through a
        ClusterRoleBinding. Before the first binding the user may do anything (a cluster
        admin); after it, only what a bound role grants.
        https://kubernetes.io/docs/reference/access-authn-authz/rbac/#role-and-clusterrole
        """
        if self.roles is None:
            self.roles = []
        self.roles.append((ns, copy.deepcopy(rules)))

    def authorized(self, verb, group, resource, ns, name=None) -> bool:
        """RBAC's answer: some rule of a role bound in the request's namespace (or cluster
        wide) grants the verb on the resource (`pods/log` for a subresource). A rule with
        `resourceNames` grants only requests that name one of them: never a create (the
        name is not known when it is authorized), a list or watch only with a
        metadata.name field selector for that name.
        https://kubernetes.io/docs/reference/access-authn-authz/rbac/#referring-to-resources
        RBAC denies nothing itself; `denied` takes single rights away from whatever is
        bound (a user whose roles lack them)."""
        if (verb, group, resource) in self.denied:
            return False
        if self.roles is None:
            return True
        for role_ns, rules in self.roles:
            if role_ns is not None and role_ns != ns:
                continue  # a Role grants rights in its own namespace only
            for rule in rules:
                if not (
                    grants(rule.get("apiGroups"), group)
                    and grants(rule.get("resources"), resource)
                    and grants(rule.get("verbs"), verb)
                ):
                    continue
                if rule.get("resourceNames") and name not in rule["resourceNames"]:
                    continue
                return True
        return False

    # -- admission ----------------------------------------------------------------------

    def label_namespace(self, ns, labels):
        """Set namespace labels, e.g. the Pod Security levels of k8s/base/namespace.yaml."""
        for key, level in labels.items():
            if (
                key.startswith(PSA_LABEL)
                and not key.endswith("-version")
                and level not in PSA_LEVELS
            ):
                raise ValueError(f"Pod Security level {level!r} is not modelled")
        self.namespace_labels.setdefault(ns, {}).update(labels)

    def _pod_security(self, ns, mode, spec, metadata, name=None):
        """The Pod Security violation of a pod template in `mode` (enforce, warn, audit),
        as the admission plugin words it, or None.
        https://kubernetes.io/docs/concepts/security/pod-security-admission/ (the detail
        lists the fake's names of the controls, not the plugin's own sentences)."""
        labels = self.namespace_labels.get(ns, {})
        level = labels.get(PSA_LABEL + mode, "privileged")
        if level == "privileged":
            return None
        violations = restricted_violations(spec, metadata)
        if not violations:
            return None
        version = labels.get(PSA_LABEL + mode + "-version", "latest")
        verb = "violates" if mode == "enforce" else "would violate"
        return f'{verb} PodSecurity "{level}:{version}": {", ".join(violations)}'

    def add_quota(self, name, hard, ns="vsgd"):
        """A ResourceQuota with `hard` limits ({"count/jobs.batch": 4, "requests.nvidia.com/gpu":
        2, "pods": 10, ...}). Its usage is counted from the objects stored now (the quota
        controller's status.used, without its delay): every Job for `count/jobs.batch`,
        finished or not; every pod not Succeeded or Failed for the pod resources.
        https://kubernetes.io/docs/concepts/policy/resource-quotas/"""
        obj = {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": timestamp(),
            },
            "spec": {"hard": {k: str(v) for k, v in hard.items()}},
        }
        return self._put("resourcequotas", obj, "ADDED")

    def _quota_used(self, ns):
        with self.cond:
            used = {
                "count/jobs.batch": parse_quantity(
                    sum(1 for (n, _) in self.objects["jobs"] if n == ns)
                )
            }
            for (n, _), pod in self.objects["pods"].items():
                if n != ns or pod["status"].get("phase") in ("Succeeded", "Failed"):
                    continue
                for key, value in pod_requests(pod["spec"]).items():
                    used[key] = used.get(key, 0) + value
        return used

    def _quota_status(self, quota):
        hard = quota["spec"]["hard"]
        used = self._quota_used(quota["metadata"]["namespace"])
        return {
            "hard": dict(hard),
            "used": {
                k: resources_text({k: used.get(k, parse_quantity(0))}).split("=", 1)[1]
                for k in hard
            },
        }

    def _quota_refusal(self, ns, requested):
        """The ResourceQuota admission plugin: the first quota of the namespace (by name) that
        `requested` would take over a hard limit, in the plugin's words
        ("exceeded quota: <name>, requested: ..., used: ..., limited: ..."); None when every
        quota admits it. Dry runs are checked the same way and reserve nothing.
        https://kubernetes.io/docs/concepts/policy/resource-quotas/ ("the control plane
        rejects that request with HTTP status code 403 Forbidden")"""
        with self.cond:
            quotas = sorted(
                (o for (n, _), o in self.objects["resourcequotas"].items() if n == ns),
                key=lambda q: q["metadata"]["name"],
            )
        used = self._quota_used(ns)
        for quota in quotas:
            hard = {k: parse_quantity(v) for k, v in quota["spec"]["hard"].items()}
            tracked = {k: v for k, v in requested.items() if k in hard and v}
            exceeded = [k for k, v in tracked.items() if used.get(k, 0) + v > hard[k]]
            if exceeded:
                zero = parse_quantity(0)
                return (
                    f"exceeded quota: {quota['metadata']['name']}, "
                    f"requested: {resources_text({k: tracked[k] for k in exceeded})}, "
                    f"used: {resources_text({k: used.get(k, zero) for k in exceeded})}, "
                    f"limited: {resources_text({k: hard[k] for k in exceeded})}"
                )
        return None
