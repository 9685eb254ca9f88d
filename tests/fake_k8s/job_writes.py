"""Writes of Jobs through the API: a create in the API server's order (validation,
admission, dry run, storage), a delete with its propagation policy and preconditions, and
patches."""

import copy
import re
import threading

from pipeline.k8s.names import parse_quantity

from .objects import error_status
from .selectors import json_patch, merge_patch

# The API server's warning when a batch/v1 Job is deleted without a propagation policy
# (its pods are orphaned; see _delete_job).
ORPHAN_WARNING = (
    "child pods are preserved by default when jobs are deleted; set "
    "propagationPolicy=Background to remove them or set "
    "propagationPolicy=Orphan to suppress this warning"
)

# metadata.name of most objects: a DNS subdomain.
# https://kubernetes.io/docs/concepts/overview/working-with-objects/names/#dns-subdomain-names
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _job_errors(job):
    """What the API server's validation of a Job refuses among what a client can get wrong
    here, in its words: the name, the pod template's containers and restartPolicy ("Only a
    RestartPolicy equal to Never or OnFailure is allowed").
    https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-template"""
    errors = []
    name = job["metadata"].get("name")
    if not name:
        errors.append("metadata.name: Required value: name or generateName is required")
    elif len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        errors.append(
            f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain '
            f"must consist of lower case alphanumeric characters, '-' or '.', and "
            f"must start and end with an alphanumeric character (e.g. "
            f"'example.com', regex used for validation is "
            f"'{DNS_SUBDOMAIN.pattern}')"
        )
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    if not pod.get("containers"):
        errors.append("spec.template.spec.containers: Required value")
    policy = pod.get("restartPolicy") or "Always"  # the pod template's default
    if policy not in ("OnFailure", "Never"):
        errors.append(
            f'spec.template.spec.restartPolicy: Unsupported value: "{policy}": '
            f'supported values: "OnFailure", "Never"'
        )
    return errors


def warning_header(texts):
    """The `Warning` response header of admission warnings: code 299, agent `-`, the text
    quoted. https://kubernetes.io/blog/2020/09/03/warnings/"""
    return ", ".join('299 - "' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in texts)


class JobWrites:
    """The Job writes of the HTTP handler."""

    def _create_job(self, ns, job, dry_run):
        """A Job create in the API server's order: validation (422), then the validating
        admission plugins (NamespaceLifecycle 404, PodSecurity warnings, webhooks,
        ResourceQuota 403), then storage (409 for a name that exists). A dry run takes the
        same path and stores nothing.
        https://kubernetes.io/docs/reference/access-authn-authz/admission-controllers/"""
        kube = self.kube
        job.setdefault("metadata", {})["namespace"] = ns
        job_name = job["metadata"].get("name") or ""
        if errors := _job_errors(job):
            message = errors[0] if len(errors) == 1 else f"[{', '.join(errors)}]"
            return self._send(
                422,
                error_status(
                    422,
                    "Invalid",
                    f'Job.batch "{job_name}" is invalid: {message}',
                    {"name": job_name, "group": "batch", "kind": "Job"},
                ),
            )
        if ns not in kube.namespaces:
            # https://kubernetes.io/docs/reference/access-authn-authz/admission-controllers/#namespacelifecycle
            return self._send(
                404,
                error_status(
                    404,
                    "NotFound",
                    f'namespaces "{ns}" not found',
                    {"name": ns, "kind": "namespaces"},
                ),
            )
        # Pod Security admission only warns and audits on a workload's pod template; its
        # enforce level refuses the pods the controller creates (_new_pod).
        # https://kubernetes.io/docs/concepts/security/pod-security-admission/#workload-resources-and-pod-templates
        template = job.get("spec", {}).get("template", {})
        warning = kube._pod_security(
            ns, "warn", template.get("spec") or {}, template.get("metadata")
        )
        headers = {"Warning": warning_header([warning])} if warning else {}
        # Validating admission webhooks see whether the request is a dry run.
        # https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#side-effects
        for webhook in (
            lambda j, _: kube.reject_create and kube.reject_create(j),
            lambda j, d: kube.webhook and kube.webhook(j, d),
        ):
            if refusal := webhook(copy.deepcopy(job), dry_run):
                return self._send(refusal[0], error_status(*refusal), headers)
        if refusal := kube._quota_refusal(ns, {"count/jobs.batch": parse_quantity(1)}):
            return self._send(
                403,
                error_status(
                    403,
                    "Forbidden",
                    f'jobs.batch "{job_name}" is forbidden: {refusal}',
                    {"name": job_name, "group": "batch", "kind": "jobs"},
                ),
                headers,
            )
        if kube.job(job_name, ns) is not None:
            return self._send(
                409,
                error_status(
                    409,
                    "AlreadyExists",
                    f'jobs.batch "{job_name}" already exists',
                    {"name": job_name, "group": "batch", "kind": "jobs"},
                ),
                headers,
            )
        if dry_run:
            kube.dry_runs.append(job_name)
            return self._send(201, kube._prepare_job(job), headers)
        created = kube.create_job(job)
        if kube.on_create:
            threading.Thread(
                target=kube.on_create, args=(copy.deepcopy(created),), daemon=True
            ).start()
        return self._send(201, created, headers)

    def _delete(self, job, query, dry_run):
        """DeleteOptions in the body or as query parameters.
        https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/delete-options/
        """
        kube, name = self.kube, job["metadata"]["name"]
        options = self._body() or {}
        policy = query.get("propagationPolicy") or options.get("propagationPolicy")
        orphan = query.get("orphanDependents", options.get("orphanDependents"))
        if policy is None and orphan is not None:  # the deprecated form
            policy = "Orphan" if str(orphan).lower() == "true" else "Background"
        if policy not in (None, "Orphan", "Background", "Foreground"):
            return self._send(
                422,
                error_status(
                    422,
                    "Invalid",
                    f'DeleteOptions.meta.k8s.io "" is '
                    f'invalid: propagationPolicy: Unsupported value: "{policy}": '
                    f'supported values: "Foreground", "Background", "Orphan"',
                ),
            )
        # Preconditions: delete only the object the client means (this uid, this version),
        # else 409 Conflict with the storage layer's message.
        preconditions = options.get("preconditions") or {}
        meta = job["metadata"]
        for field, key in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if preconditions.get(field) is not None and preconditions[field] != meta[field]:
                return self._send(
                    409,
                    error_status(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on jobs.batch "{name}": '
                        f"StorageError: invalid object, Code: 4, Key: /registry/jobs/"
                        f"{meta['namespace']}/{name}, ResourceVersion: 0, AdditionalErrorMsg: "
                        f"Precondition failed: {key} in precondition: {preconditions[field]}, "
                        f"{key} in object meta: {meta[field]}",
                        {"name": name, "group": "batch", "kind": "jobs"},
                    ),
                )
        headers = {"Warning": f'299 - "{ORPHAN_WARNING}"'} if policy is None else {}
        answer = job
        if not dry_run:
            kube.deletions.append((name, policy))
            answer = kube._delete_job(job, policy)
        if answer is not None and policy != "Background":
            return self._send(200, answer, headers)  # still there, being deleted
        return self._send(
            200,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": name,
                    "group": "batch",
                    "kind": "jobs",
                    "uid": job["metadata"]["uid"],
                },
            },
            headers,
        )

    def _patch(self, job, dry_run):
        """Merge and strategic-merge patches (what kubectl apply and the python client
        send; list merging by key is not modelled) and JSON patches, of metadata and spec;
        status is not written through the main resource. A spec.suspend change then gets
        the Job controller's answer.
        https://kubernetes.io/docs/reference/using-api/api-concepts/#patch-and-apply
        """
        kube = self.kube
        content_type = self.headers.get("Content-Type", "")
        patch = self._body()
        if "apply-patch" in content_type:
            return self._send(
                415,
                error_status(
                    415,
                    "UnsupportedMediaType",
                    "the fake API server does not model server-side apply",
                ),
            )
        new = copy.deepcopy(job)
        editable = {"metadata": new["metadata"], "spec": new.get("spec", {})}
        if "json-patch" in content_type or isinstance(patch, list):
            try:
                json_patch(editable, patch)
            except (KeyError, IndexError, ValueError, TypeError) as exc:
                return self._send(
                    422, error_status(422, "Invalid", f"the JSON patch cannot be applied: {exc!r}")
                )
        else:
            for part in ("metadata", "spec"):
                if isinstance(patch.get(part), dict):
                    merge_patch(editable[part], patch[part])
        for key in (
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "namespace",
            "name",
        ):  # set by the server
            if key in job["metadata"]:
                editable["metadata"][key] = job["metadata"][key]
        new["metadata"], new["spec"] = editable["metadata"], editable["spec"]
        if new["spec"] != job.get("spec"):
            new["metadata"]["generation"] = job["metadata"].get("generation", 1) + 1
        if dry_run:
            return self._send(200, new)
        stored = kube._put("jobs", new, "MODIFIED")
        was, now = bool(job.get("spec", {}).get("suspend")), bool(new["spec"].get("suspend"))
        if was != now:
            kube._suspend_changed(job["metadata"]["name"], job["metadata"]["namespace"], now)
        return self._send(200, stored)
