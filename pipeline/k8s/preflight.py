"""Before the first Job is submitted: everything that would make every Job fail, checked
cheaply and reported at once (a ConfigError with every problem, exit code 78), before any GPU
is used.

- A server-side dry-run of one Job: the namespace, the schema and admission (a dry run goes
  through validation and every admission plugin, ResourceQuota included, and stores nothing:
  https://kubernetes.io/docs/reference/using-api/api-concepts/#dry-run). A ResourceQuota that
  refuses it is a configuration error only when one Job alone exceeds it; one that is full
  because of what runs now is said and waited for (each run for up to `start_grace`).
- One run's pod fits every ResourceQuota of the namespace that counts it (`pod_quota`): the
  dry run of a Job cannot see them, since a quota on pods is charged only when the Job
  controller creates a pod. A pod alone beyond a hard limit is a configuration error; a quota
  without room for it now is said, and waited for as above.
- The ServiceAccount, Secrets (image pull secrets too) and ConfigMap the Job refers to exist,
  each read by its name (which is also the check of the launcher's right to read it).
- The launcher's rights: a SelfSubjectAccessReview of each of `pipeline.k8s.access.ACCESS`.
"""

import re

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vsgd.spec import ConfigError

from . import pod_quota
from .access import ACCESS, NAMED
from .client import Api, api_error, quota_refusal, status_message
from .schema import TRAIN_CONTAINER

# Admission warnings come back in `Warning` headers: `299 - "<text>"`.
# https://kubernetes.io/blog/2020/09/03/warnings/
WARNING = re.compile(r'\d{3} \S+ "((?:[^"\\]|\\.)*)"')


def preflight(api: Api, job: dict, *, start_grace: float, say) -> None:
    """Check the cluster with `job` (one of the runs' Jobs); ConfigError with every problem
    found. `say` prints what passes but is worth knowing (warnings, a quota full now)."""
    problems = []
    ns = job["metadata"]["namespace"]
    try:
        # A dry run goes through validation and admission like a real create (KEP-576):
        # what would refuse every Job refuses this one, and nothing is stored.
        _, _, headers = api.call(
            api.batch.create_namespaced_job_with_http_info,
            ns,
            client.V1Job.from_dict(job),
            dry_run="All",
        )
    except ApiException as exc:
        quota = quota_refusal(exc)
        if exc.status == 404:
            problems.append(
                f"executor.kubernetes.namespace: namespace {ns!r} does not "
                f"exist (create it: kubectl apply -k k8s/overlays/<local|"
                f"cloud>, docs/kubernetes.md)"
            )
        elif quota and quota.beyond:
            problems.append(
                f"kubernetes: one Job alone exceeds ResourceQuota {quota.quota} of "
                f"namespace {ns} (requested {quota.amounts('requested')}, the quota's "
                f"hard limit {quota.amounts('limited')}): no Job can ever be admitted; "
                f"raise the quota (kubectl -n {ns} describe resourcequota {quota.quota})"
            )
        elif quota:
            # Full because of what runs now: that passes. Each run waits for room as a
            # pod refused by a quota does (FailedCreate), up to start_grace.
            say(
                f"ResourceQuota {quota.quota} of namespace {ns} is full now (used "
                f"{quota.amounts('used')} of {quota.amounts('limited')}): the runs "
                f"wait for room, each for up to {start_grace:.0f} s "
                f"(executor.kubernetes.start_grace)"
            )
        elif exc.status != 409:  # 409: the name exists; adoption decides about it
            problems.append(
                f"kubernetes: a dry-run of Job {job['metadata']['name']} was "
                f"refused: {api_error(exc, 'creating a Job (dry run)')}"
            )
    else:
        for warning in admission_warnings(headers):
            say(
                f"the API server warns about the Job: {warning}"
                + (
                    " (Pod Security admission refuses such pods, not the Job, "
                    "where the namespace enforces that level: every run would fail "
                    "with FailedCreate)"
                    if "PodSecurity" in warning
                    else ""
                )
            )
    problems += _pod_quotas(api, job, start_grace=start_grace, say=say)
    problems += _referenced_objects(api, job)
    problems += _missing_rights(api, ns)
    if problems:
        problems.append("kubernetes: nothing was submitted; fix these, then run the stage again")
        raise ConfigError(problems)
    say(
        f"preflight ok: namespace {ns}, {len(referenced(job))} referenced objects, "
        f"{sum(len(a[2]) for a in ACCESS)} rights"
    )


def admission_warnings(headers) -> list[str]:
    """The texts of an answer's `Warning` headers (several arrive joined by commas)."""
    value = (headers or {}).get("Warning") or ""
    return [re.sub(r"\\(.)", r"\1", text) for text in WARNING.findall(value)]


def referenced(job: dict) -> list[tuple[str, str, str]]:
    """(resource, name, params key) of every object the Job's pods need to start: the
    ServiceAccount, the Secrets and ConfigMaps of the train container's envFrom (unless
    optional) and the image pull secrets."""
    pod = job["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == TRAIN_CONTAINER)
    wanted = [
        ("serviceaccounts", pod.get("serviceAccountName") or "default", NAMED["serviceaccounts"][0])
    ]
    for ref in container.get("envFrom") or []:
        if "secretRef" in ref and not ref["secretRef"].get("optional"):
            wanted.append(("secrets", ref["secretRef"]["name"], NAMED["secrets"][0]))
        if "configMapRef" in ref and not ref["configMapRef"].get("optional"):
            wanted.append(("configmaps", ref["configMapRef"]["name"], NAMED["configmaps"][0]))
    for pull in pod.get("imagePullSecrets") or []:
        wanted.append(("secrets", pull["name"], "image_pull_secrets"))
    return wanted


def _pod_quotas(api: Api, job: dict, *, start_grace: float, say) -> list[str]:
    """A run's pod against the namespace's ResourceQuotas (`pod_quota.check`)."""
    ns = job["metadata"]["namespace"]
    try:
        listing = api.call(api.core.list_namespaced_resource_quota, ns)
    except ApiException as exc:
        # 403: the rights check says which right is missing; 404: the dry run said it.
        return [] if exc.status in (403, 404) else [api_error(exc, "listing ResourceQuotas")]
    quotas = [api.to_dict(item) for item in listing.items]
    beyond, full = pod_quota.check(quotas, job["spec"]["template"]["spec"])
    if full:
        say(
            f"a run's pod does not fit the ResourceQuotas of namespace {ns} now "
            f"({'; '.join(full)}): the runs wait for room, each for up to {start_grace:.0f} s "
            "(executor.kubernetes.start_grace)"
        )
    return [
        f"kubernetes: one run's pod alone exceeds ResourceQuota {what} in namespace {ns}: "
        f"no run can ever start; lower the pod's resources (executor.kubernetes.cpu, memory, "
        f"gpus, scratch_size) or raise the quota (kubectl -n {ns} describe resourcequota "
        f"{what.split(':')[0]})"
        for what in beyond
    ]


def _referenced_objects(api: Api, job: dict) -> list[str]:
    """Every ServiceAccount, Secret and ConfigMap the Job refers to exists. Reading each
    by its name is also the check of the launcher's right to: a Role's resourceNames
    grant one name, not another (an image pull secret is not the credentials Secret)."""
    problems, ns = [], job["metadata"]["namespace"]
    reads = {
        "serviceaccounts": api.core.read_namespaced_service_account,
        "secrets": api.core.read_namespaced_secret,
        "configmaps": api.core.read_namespaced_config_map,
    }
    for resource, name, key in referenced(job):
        where = f"executor.kubernetes.{key}"
        what = f"{resource[:-1]} {ns}/{name}"
        try:
            # Not deserialized: the launcher has no use for a Secret's values. Drained
            # before the connection goes back to the pool: the next request on it would
            # read this body as its answer.
            answer = api.call(reads[resource], name, ns, _preload_content=False)
            answer.drain_conn()
            answer.release_conn()
        except ApiException as exc:
            if exc.status == 404:
                problems.append(
                    f"{where}: {what} does not exist (kubectl apply -k "
                    f"k8s/overlays/<local|cloud>, or create it; "
                    f"docs/kubernetes.md)"
                )
            elif exc.status == 403:
                # Not knowing is not "it exists": a missing one would only show as pods
                # that never start, start_grace later, run after run.
                problems.append(
                    f"{where}: cannot verify that {what} exists: the launcher may not "
                    f"read it ({status_message(exc)}); grant get on it (its name in the "
                    f"resourceNames of the {resource} rule of the Role in "
                    f"k8s/base/launcher-rbac.yaml), or check that it exists: kubectl -n "
                    f"{ns} get {resource[:-1]} {name}"
                )
            else:
                problems.append(f"{where}: {api_error(exc, f'reading {what}')}")
    return problems


def _missing_rights(api: Api, namespace: str) -> list[str]:
    problems = []
    for group, resource, verbs, why in ACCESS:
        resource, _, sub = resource.partition("/")
        if resource in NAMED:
            continue  # gets of the referenced objects: _referenced_objects read them
        for verb in verbs:
            review = client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=namespace,
                        verb=verb,
                        group=group,
                        resource=resource,
                        subresource=sub or None,
                    )
                )
            )
            try:
                answer = api.call(api.auth.create_self_subject_access_review, review)
            except ApiException as exc:
                problems.append(
                    "kubernetes: "
                    + api_error(exc, "asking the API server about the launcher's rights")
                )
                return problems
            if not answer.status.allowed:
                what = f"{resource}/{sub}" if sub else resource
                problems.append(
                    f"kubernetes: missing right: {verb} {what} in "
                    f"{group or 'core'} API group, namespace {namespace} (to {why}); "
                    f"grant the Role in k8s/base/launcher-rbac.yaml"
                )
    return problems
