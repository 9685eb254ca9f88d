"""What discovery answers (/version, /api, /apis, the groups' resources) and enough OpenAPI v3
for `kubectl apply`."""


def _resources(group_version, resources):
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def _core(name, kind, verbs, short=None):
    return {
        "name": name,
        "singularName": kind.lower(),
        "namespaced": True,
        "kind": kind,
        "verbs": verbs,
        **({"shortNames": short} if short else {}),
    }


DISCOVERY = {
    "/version": {
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-fake",
        "platform": "linux/amd64",
    },
    "/api": {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    },
    "/apis": {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": "batch",
                "versions": [{"groupVersion": "batch/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "batch/v1", "version": "v1"},
            },
            {
                "name": "authorization.k8s.io",
                "versions": [{"groupVersion": "authorization.k8s.io/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "authorization.k8s.io/v1", "version": "v1"},
            },
        ],
    },
    "/api/v1": _resources(
        "v1",
        [
            _core("pods", "Pod", ["get", "list", "watch"], ["po"]),
            {
                "name": "pods/log",
                "singularName": "",
                "namespaced": True,
                "kind": "Pod",
                "verbs": ["get"],
            },
            _core("events", "Event", ["get", "list"], ["ev"]),
            _core("serviceaccounts", "ServiceAccount", ["get", "list"], ["sa"]),
            _core("secrets", "Secret", ["get", "list"]),
            _core("configmaps", "ConfigMap", ["get", "list"], ["cm"]),
            _core("resourcequotas", "ResourceQuota", ["get", "list"], ["quota"]),
            {
                "name": "namespaces",
                "singularName": "namespace",
                "namespaced": False,
                "kind": "Namespace",
                "verbs": ["get", "list"],
                "shortNames": ["ns"],
            },
        ],
    ),
    "/apis/batch/v1": _resources(
        "batch/v1",
        [
            {
                "name": "jobs",
                "singularName": "job",
                "namespaced": True,
                "kind": "Job",
                "verbs": ["create", "delete", "get", "list", "patch", "watch"],
                "categories": ["all"],
            }
        ],
    ),
    "/apis/authorization.k8s.io/v1": _resources(
        "authorization.k8s.io/v1",
        [
            {
                "name": "selfsubjectaccessreviews",
                "singularName": "selfsubjectaccessreview",
                "namespaced": False,
                "kind": "SelfSubjectAccessReview",
                "verbs": ["create"],
            }
        ],
    ),
    "/openapi/v3": {
        "paths": {"apis/batch/v1": {"serverRelativeURL": "/openapi/v3/apis/batch/v1?hash=fake"}}
    },
}

# Enough OpenAPI v3 for kubectl: it looks up the Job's group/version/kind, and whether the
# server validates fields itself (the fieldValidation parameter of the create operation).
OPENAPI_BATCH_V1 = {
    "openapi": "3.0.0",
    "info": {"title": "Kubernetes", "version": "v1.32.0"},
    "paths": {
        "/apis/batch/v1/namespaces/{namespace}/jobs": {
            "post": {
                "operationId": "createBatchV1NamespacedJob",
                "parameters": [
                    {
                        "name": "fieldValidation",
                        "in": "query",
                        "schema": {"type": "string", "uniqueItems": True},
                    }
                ],
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/io.k8s.api.batch.v1.Job"}
                        }
                    }
                },
                "responses": {"201": {"description": "Created"}},
                "x-kubernetes-action": "post",
                "x-kubernetes-group-version-kind": {
                    "group": "batch",
                    "kind": "Job",
                    "version": "v1",
                },
            },
            "patch": {
                "operationId": "patchBatchV1NamespacedJob",
                "parameters": [
                    {
                        "name": "fieldValidation",
                        "in": "query",
                        "schema": {"type": "string", "uniqueItems": True},
                    }
                ],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {
                    "group": "batch",
                    "kind": "Job",
                    "version": "v1",
                },
            },
        }
    },
    "components": {
        "schemas": {
            "io.k8s.api.batch.v1.Job": {
                "type": "object",
                "x-kubernetes-group-version-kind": [
                    {"group": "batch", "kind": "Job", "version": "v1"}
                ],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": {"type": "object"},
                    "status": {"type": "object"},
                },
            }
        }
    },
}
