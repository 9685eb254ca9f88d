"""What the launcher does through the Kubernetes API, as RBAC rules: the one list that the
Role in k8s/base/launcher-rbac.yaml grants (tests/test_k8s_manifests.py compares them) and
that the preflight (`pipeline.k8s.preflight`) asks the API server about
(SelfSubjectAccessReview) before anything is submitted.

Each entry: (API group, resource, verbs, what for). Names of the ServiceAccount, Secret and
ConfigMap come from params.yaml; the Role limits them to the defaults with resourceNames. The
preflight checks those gets by reading each object the Job refers to, image pull secrets
included: a name the Role does not list is a 403 there, reported with that name.
"""

ACCESS = (
    (
        "batch",
        "jobs",
        ("create", "get", "list", "watch", "delete"),
        "submit, adopt, follow and replace the runs' Jobs",
    ),
    (
        "batch",
        "jobs",
        ("patch",),
        "`kubectl apply -f` of a rendered Job (docs/kubernetes.md) on an existing one",
    ),
    ("", "pods", ("list",), "find a Job's pods (by its controller-uid) for progress and state"),
    ("", "pods/log", ("get",), "the last log lines of a failed or running run"),
    ("", "events", ("list",), "why a Job cannot create its pod, or a pod cannot start"),
    ("", "resourcequotas", ("list",), "preflight: a run's pod fits the ResourceQuotas"),
    ("", "serviceaccounts", ("get",), "preflight: the pods' ServiceAccount exists"),
    ("", "secrets", ("get",), "preflight: the credentials Secret (and pull secrets) exist"),
    ("", "configmaps", ("get",), "preflight: the endpoints ConfigMap exists"),
)

# The objects of the get rules above, by the params key that names them
# (`executor.kubernetes.<key>`) and its default, which the Role's resourceNames list.
NAMED = {
    "serviceaccounts": ("service_account", "vsgd-train"),
    "secrets": ("credentials_secret", "vsgd-credentials"),
    "configmaps": ("endpoints_config_map", "vsgd-endpoints"),
}


def verbs(resource: str, group: str = "") -> set[str]:
    """Every verb the launcher needs on `group`/`resource`."""
    return {v for g, r, vs, _ in ACCESS if (g, r) == (group, resource) for v in vs}
