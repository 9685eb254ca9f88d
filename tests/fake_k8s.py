"""A small in-memory Kubernetes API server speaking real HTTP, for the executor tests.

Implements what the kubernetes executor and `kubectl apply -f <job>` use: discovery (/api,
/apis, /version, OpenAPI v3 for batch/v1), Jobs (create, dry-run create, get, list, watch,
patch, delete with a propagationPolicy and preconditions), pods (list, get, pods/log),
events (list with a fieldSelector), namespaces, ServiceAccounts, Secrets, ConfigMaps and
ResourceQuotas (read only), and SelfSubjectAccessReviews. Watches stream chunked JSON events
from a resourceVersion, send BOOKMARKs, answer 410 Gone (an ERROR event, like the real watch
cache) once history is compacted or expired mid-stream, and can be cut off. Any request can
be made to fail (`outage`: 5xx, 429, a connection reset, or the port refusing connections).

As strict as a real API server where the executor depends on it: a Job create, dry run or
not, is validated and goes through admission (NamespaceLifecycle, Pod Security warnings,
webhooks, ResourceQuota) before the name is checked; RBAC (`bind_role`) honours a Role's
namespace and `resourceNames` (`denied` removes single rights); the log of a container that
has not started is a 400; lists come back ordered by namespace and name.

There is no controller: tests drive Jobs and pods with the helper methods (`start_pod`,
`complete`, `fail`, `finalize`, `admit`, `refuse_pods`, `unschedulable_pod`, `delete_job`,
...), or `on_create` hooks. Only API behaviour that tests rely on is modelled, and where it
is, a comment cites the Kubernetes documentation it follows.
"""

import base64
import copy
import json
import re
import socket
import struct
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from pipeline.k8s_config import parse_quantity
from test_k8s_manifests import restricted_violations

JOB_PATH = re.compile(r"^/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs(/(?P<name>[^/]+))?$")
POD_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(/(?P<name>[^/]+)(?P<log>/log)?)?$")
CORE_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<kind>events|serviceaccounts|"
                       r"secrets|configmaps|resourcequotas)(/(?P<name>[^/]+))?$")
NS_PATH = re.compile(r"^/api/v1/namespaces(/(?P<name>[^/]+))?$")
SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"

READ_ONLY_KINDS = {"serviceaccounts": ("ServiceAccount", "ServiceAccountList"),
                   "secrets": ("Secret", "SecretList"),
                   "configmaps": ("ConfigMap", "ConfigMapList"),
                   "events": ("Event", "EventList"),
                   "resourcequotas": ("ResourceQuota", "ResourceQuotaList")}
FAULT_KINDS = ("503", "500", "429", "reset", "refused")
NODE = "node-1"

# The API server's warning when a batch/v1 Job is deleted without a propagation policy
# (its pods are orphaned; see _delete_job).
ORPHAN_WARNING = ("child pods are preserved by default when jobs are deleted; set "
                  "propagationPolicy=Background to remove them or set "
                  "propagationPolicy=Orphan to suppress this warning")

# Fields each list accepts in a fieldSelector; anything else is a 400, as on a real server.
# https://kubernetes.io/docs/concepts/overview/working-with-objects/field-selectors/
FIELDS = {
    "jobs": {"metadata.name", "metadata.namespace", "status.successful"},
    "pods": {"metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy",
             "spec.schedulerName", "spec.serviceAccountName", "status.phase",
             "status.nominatedNodeName"},
    "events": {"metadata.name", "metadata.namespace", "involvedObject.kind",
               "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
               "involvedObject.apiVersion", "involvedObject.resourceVersion",
               "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"},
    "secrets": {"metadata.name", "metadata.namespace", "type"},
    "serviceaccounts": {"metadata.name", "metadata.namespace"},
    "configmaps": {"metadata.name", "metadata.namespace"},
    "resourcequotas": {"metadata.name", "metadata.namespace"},
}

# Pod Security admission: the namespace labels of each mode, and the levels modelled.
# https://kubernetes.io/docs/concepts/security/pod-security-admission/#pod-security-admission-labels-for-namespaces
PSA_LABEL = "pod-security.kubernetes.io/"
PSA_LEVELS = ("privileged", "restricted")   # baseline alone is not modelled

# The pod resources a ResourceQuota can track, by the quota's name for them: requests of the
# compute resources under their bare name too; extended resources (GPUs) by requests only.
# https://kubernetes.io/docs/concepts/policy/resource-quotas/#compute-resource-quota
BARE_REQUESTS = ("cpu", "memory", "ephemeral-storage")


def _now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code, reason, message, details=None):
    # The Status object of every error answer:
    # https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


def _split_terms(selector):
    """Split a selector on the commas that are not inside `in (a,b)` parentheses."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [t.strip() for t in terms if t.strip()]


def _matches(labels, selector):
    """Label selectors: equality-based `a=b,a==b,c!=d`, existence `e` and `!e`, and
    set-based `k in (a,b)`, `k notin (a)`.
    https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors
    """
    for term in _split_terms(selector or ""):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", term):
            key, op = m[1], m[2]
            values = {v.strip() for v in m[3].split(",") if v.strip()}
            if op == "in" and labels.get(key, None) not in values:
                return False
            if op == "notin" and key in labels and labels[key] in values:
                return False
        elif term.startswith("!") and "=" not in term:
            if term[1:].strip() in labels:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term not in labels:
            return False
    return True


def _field(obj, path):
    if path == "source":   # events: the reporting component
        return (obj.get("source") or {}).get("component") or ""
    if path == "status.successful":   # jobs
        return str((obj.get("status") or {}).get("succeeded") or 0)
    value = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _field_terms(kind, selector, check=True):
    """Parse a fieldSelector: equality terms only (`=`, `==`, `!=`). Raises ValueError with
    the server's message for a field the resource does not support."""
    terms = []
    for term in _split_terms(selector or ""):
        negate = "!=" in term
        key, value = (term.split("!=", 1) if negate else
                      term.split("==", 1) if "==" in term else term.split("=", 1))
        key = key.strip()
        if check and key not in FIELDS.get(kind, ()):
            raise ValueError(f"field label not supported: {key}")
        terms.append((key, value.strip(), negate))
    return terms


def _merge_patch(target, patch):
    """A JSON merge patch (RFC 7386): maps merge recursively, null deletes, anything else
    (lists included) replaces. Strategic-merge directives (`$patch`, `$setElementOrder/...`)
    are dropped: list merging by key is not modelled.
    https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/
    """
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            base = target.get(key)
            target[key] = _merge_patch(base if isinstance(base, dict) else {}, value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _json_patch(target, ops):
    """A JSON patch (RFC 6902): add, replace and remove only."""
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = target
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                parent[index] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                parent.pop(index)
        elif op["op"] in ("add", "replace"):
            parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            parent.pop(last)
    return target


def _pretty(resources):
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


def _grants(values, value):
    return "*" in (values or ()) or value in (values or ())


def _pod_requests(spec):
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


def _warning_header(texts):
    """The `Warning` response header of admission warnings: code 299, agent `-`, the text
    quoted. https://kubernetes.io/blog/2020/09/03/warnings/"""
    return ", ".join('299 - "' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'
                     for t in texts)


def _condition(obj, type_):
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c.get("type") == type_), None)


def _set_condition(obj, type_, status, reason, message=""):
    """Add a condition or update the one of that type; lastTransitionTime moves only when
    the status changes."""
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    now = _now()
    for cond in conditions:
        if cond["type"] == type_:
            if cond["status"] != status:
                cond["lastTransitionTime"] = now
            cond.update(status=status, reason=reason, message=message, lastProbeTime=now)
            return
    conditions.append({"type": type_, "status": status, "reason": reason,
                       "message": message, "lastProbeTime": now,
                       "lastTransitionTime": now})


class FakeKube:
    def __init__(self):
        self.cond = threading.Condition()
        self.rv = 1000
        self.objects = {"jobs": {}, "pods": {}, "events": {}, "serviceaccounts": {},
                        "secrets": {}, "configmaps": {},
                        "resourcequotas": {}}       # kind -> (ns, name) -> object
        self.logs = {}                              # (ns, pod) -> list of lines
        self.history = []                           # (rv, kind, type, object)
        self.compacted_rv = 0                       # watches from at or below: 410
        self.cut_generation = 0                     # bumped to cut open watches
        self.bookmark_generation = 0                # bumped to send BOOKMARKs
        self.expire_generation = 0                  # bumped to end watches with a 410
        self.reject_create = None                   # job -> (code, reason, message) | None
        self.webhook = None                         # (job, dry_run) -> the same, see _admit
        self.on_create = None                       # job -> None, run in a thread
        self.requests = []                          # (method, path) of every request
        self.watch_starts = []                      # resourceVersion of every watch
        self.namespaces = {"vsgd", "default"}       # namespaces that exist
        self.namespace_labels = {}                  # ns -> labels (Pod Security levels)
        self.user = "fake"                          # who the kubeconfig's token is
        self.roles = None                           # [(ns, rules)] bound, see bind_role
        self.denied = set()                         # (verb, group, resource) not granted
        self.access_reviews = []                    # resourceAttributes of every SSAR
        self.outages = []                           # faults, see outage()
        self.faulted = []                           # (method, path, kind) answered by one
        self.deletions = []                         # (job name, propagationPolicy | None)
        self.dry_runs = []                          # names of dry-run created Jobs
        self.gc_delay = 0.05                        # seconds before the GC acts
        self._ns_uids = {}
        self._connections = set()
        self._server = None
        self._port = 0
        self._stopped = False
        self._timers = []
        # What the project's Job template refers to (k8s/ and pipeline/k8s_access.py NAMED),
        # and the `default` ServiceAccount that every namespace gets.
        # https://kubernetes.io/docs/concepts/security/service-accounts/#default-service-accounts
        for ns in sorted(self.namespaces):
            self.add_object("serviceaccounts", "default", ns)
        self.add_object("serviceaccounts", "vsgd-train")
        self.add_object("secrets", "vsgd-credentials",
                        data={"AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake"})
        self.add_object("configmaps", "vsgd-endpoints",
                        data={"AWS_DEFAULT_REGION": "us-east-1"})

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> str:
        self._serve(0)
        return f"http://127.0.0.1:{self._port}"

    def _serve(self, port):
        fake = self

        class Handler(_Handler):
            kube = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self):
        self._stopped = True
        for timer in self._timers:
            timer.cancel()
        with self.cond:
            self.cut_generation += 1
            self.cond.notify_all()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self._drop_connections()

    def kubeconfig(self, url, namespace="vsgd") -> dict:
        return {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                          "namespace": namespace}}]}

    def _later(self, seconds, fn, *args):
        timer = threading.Timer(seconds, fn, args)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _drop_connections(self):
        with self.cond:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- faults -------------------------------------------------------------------------

    def outage(self, kind, *, seconds=None, count=None, match=None, retry_after=None):
        """Make requests fail, from now until `seconds` have passed or `count` matching
        requests have been answered by the fault (whichever comes first; one is required).

        kind: "503" / "500" (a Status body), "429" (what API Priority and Fairness answers:
        a plain-text body and `Retry-After`), "reset" (the request is read, then the
        connection is reset without an answer), or "refused" (nothing listens on the port:
        new connections are refused and open ones, watches included, are cut; after
        `seconds` the server listens on the same port again). `match(method, path)` picks
        the requests that fail (default: all, discovery and watches included; `path` is
        without the query string). Not for "refused", which works at the TCP level.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"outage kind must be one of {FAULT_KINDS}, not {kind!r}")
        if seconds is None and count is None:
            raise ValueError("an outage needs seconds= or count=")
        if kind == "refused" and (seconds is None or count is not None or match is not None):
            raise ValueError('a "refused" outage takes seconds= only')
        fault = {"kind": kind, "left": count, "match": match, "retry_after": retry_after,
                 "until": None if seconds is None else time.monotonic() + seconds,
                 "done": False}
        with self.cond:
            self.outages.append(fault)
        if kind == "refused":
            self._refuse(fault, seconds)
        return fault

    def _active(self, fault):
        if fault["kind"] == "refused":
            return not fault["done"]
        if fault["until"] is not None and time.monotonic() >= fault["until"]:
            return False
        return fault["left"] is None or fault["left"] > 0

    def outage_over(self) -> bool:
        """No outage is in force any more."""
        with self.cond:
            return not any(self._active(f) for f in self.outages)

    def _fault_for(self, method, path):
        with self.cond:
            for fault in self.outages:
                if fault["kind"] == "refused" or not self._active(fault):
                    continue
                if fault["match"] is not None and not fault["match"](method, path):
                    continue
                if fault["left"] is not None:
                    fault["left"] -= 1
                self.faulted.append((method, path, fault["kind"]))
                return fault
        return None

    def _refuse(self, fault, seconds):
        server, self._server = self._server, None
        with self.cond:
            self.cut_generation += 1
            self.cond.notify_all()
        if server is not None:
            server.shutdown()
            server.server_close()
        self._drop_connections()
        self._later(seconds, self._relisten, fault)

    def _relisten(self, fault):
        deadline = time.monotonic() + 5
        while not self._stopped:
            try:
                self._serve(self._port)   # HTTPServer sets SO_REUSEADDR: same port again
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        fault["done"] = True

    def cut_watches(self):
        """Drop every open watch connection without a clean end (a network blip)."""
        with self.cond:
            self.cut_generation += 1
            self.cond.notify_all()

    # -- storage with events ------------------------------------------------------------

    def _put(self, kind, obj, event):
        with self.cond:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            if event == "DELETED":
                self.objects[kind].pop(key, None)
            else:
                self.objects[kind][key] = obj
            self.history.append((self.rv, kind, event, copy.deepcopy(obj)))
            self.cond.notify_all()
            return copy.deepcopy(obj)

    def _prepare_job(self, job):
        meta = job.setdefault("metadata", {})
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta.setdefault("namespace", "default")
        job.setdefault("status", {})
        return job

    def create_job(self, job):
        created = self._put("jobs", self._prepare_job(job), "ADDED")
        if (created.get("spec") or {}).get("suspend"):
            self._suspend_changed(created["metadata"]["name"], created["metadata"]["namespace"],
                                  True)
        return created

    def job(self, name, ns="vsgd"):
        with self.cond:
            return copy.deepcopy(self.objects["jobs"].get((ns, name)))

    def jobs(self):
        with self.cond:
            return [copy.deepcopy(j) for j in self.objects["jobs"].values()]

    def pod(self, name, ns="vsgd"):
        with self.cond:
            return copy.deepcopy(self.objects["pods"].get((ns, name)))

    def _update_job(self, name, ns, change):
        with self.cond:
            job = copy.deepcopy(self.objects["jobs"][(ns, name)])
            change(job)
            return self._put("jobs", job, "MODIFIED")

    def _update_pod(self, name, ns, change):
        with self.cond:
            pod = copy.deepcopy(self.objects["pods"][(ns, name)])
            change(pod)
            return self._put("pods", pod, "MODIFIED")

    def add_object(self, kind, name, ns="vsgd", data=None):
        """A ServiceAccount, Secret or ConfigMap the API then serves (read only). `data`:
        for a Secret, plain strings (stored base64-encoded, as the API returns them); for a
        ConfigMap, its data; for a ServiceAccount, fields merged into the object (e.g.
        {"imagePullSecrets": [{"name": "x"}]})."""
        if kind not in ("serviceaccounts", "secrets", "configmaps"):
            raise ValueError(f"add_object kind must be serviceaccounts, secrets or "
                             f"configmaps, not {kind!r}")
        obj = {"apiVersion": "v1", "kind": READ_ONLY_KINDS[kind][0],
               "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()),
                            "creationTimestamp": _now()}}
        if kind == "secrets":
            # https://kubernetes.io/docs/reference/kubernetes-api/config-and-storage-resources/secret-v1/
            obj["type"] = "Opaque"
            obj["data"] = {k: base64.b64encode(v.encode() if isinstance(v, str) else v).decode()
                           for k, v in (data or {}).items()}
        elif kind == "configmaps":
            # https://kubernetes.io/docs/reference/kubernetes-api/config-and-storage-resources/config-map-v1/
            obj["data"] = dict(data or {})
        else:
            # https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/service-account-v1/
            obj.update(copy.deepcopy(data or {}))
        return self._put(kind, obj, "ADDED")

    def remove_object(self, kind, name, ns="vsgd"):
        with self.cond:
            obj = copy.deepcopy(self.objects[kind].get((ns, name)))
        return None if obj is None else self._put(kind, obj, "DELETED")

    def _namespace(self, name):
        # https://kubernetes.io/docs/reference/kubernetes-api/cluster-resources/namespace-v1/
        uid = self._ns_uids.setdefault(name, str(uuid.uuid4()))
        return {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "uid": uid, "resourceVersion": "1",
                             "creationTimestamp": "2024-01-01T00:00:00Z",
                             "labels": {**self.namespace_labels.get(name, {}),
                                        "kubernetes.io/metadata.name": name}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}

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
                continue   # a Role grants rights in its own namespace only
            for rule in rules:
                if not (_grants(rule.get("apiGroups"), group)
                        and _grants(rule.get("resources"), resource)
                        and _grants(rule.get("verbs"), verb)):
                    continue
                if rule.get("resourceNames") and name not in rule["resourceNames"]:
                    continue
                return True
        return False

    # -- admission ----------------------------------------------------------------------

    def label_namespace(self, ns, labels):
        """Set namespace labels, e.g. the Pod Security levels of k8s/base/namespace.yaml."""
        for key, level in labels.items():
            if key.startswith(PSA_LABEL) and not key.endswith("-version") and \
                    level not in PSA_LEVELS:
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
        obj = {"apiVersion": "v1", "kind": "ResourceQuota",
               "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()),
                            "creationTimestamp": _now()},
               "spec": {"hard": {k: str(v) for k, v in hard.items()}}}
        return self._put("resourcequotas", obj, "ADDED")

    def _quota_used(self, ns):
        with self.cond:
            used = {"count/jobs.batch": parse_quantity(
                sum(1 for (n, _) in self.objects["jobs"] if n == ns))}
            for (n, _), pod in self.objects["pods"].items():
                if n != ns or pod["status"].get("phase") in ("Succeeded", "Failed"):
                    continue
                for key, value in _pod_requests(pod["spec"]).items():
                    used[key] = used.get(key, 0) + value
        return used

    def _quota_status(self, quota):
        hard = quota["spec"]["hard"]
        used = self._quota_used(quota["metadata"]["namespace"])
        return {"hard": dict(hard),
                "used": {k: _pretty({k: used.get(k, parse_quantity(0))}).split("=", 1)[1]
                         for k in hard}}

    def _quota_refusal(self, ns, requested):
        """The ResourceQuota admission plugin: the first quota of the namespace (by name) that
        `requested` would take over a hard limit, in the plugin's words
        ("exceeded quota: <name>, requested: ..., used: ..., limited: ..."); None when every
        quota admits it. Dry runs are checked the same way and reserve nothing.
        https://kubernetes.io/docs/concepts/policy/resource-quotas/ ("the control plane
        rejects that request with HTTP status code 403 Forbidden")"""
        with self.cond:
            quotas = sorted((o for (n, _), o in self.objects["resourcequotas"].items()
                             if n == ns), key=lambda q: q["metadata"]["name"])
        used = self._quota_used(ns)
        for quota in quotas:
            hard = {k: parse_quantity(v) for k, v in quota["spec"]["hard"].items()}
            tracked = {k: v for k, v in requested.items() if k in hard and v}
            exceeded = [k for k, v in tracked.items() if used.get(k, 0) + v > hard[k]]
            if exceeded:
                return (f"exceeded quota: {quota['metadata']['name']}, "
                        f"requested: {_pretty({k: tracked[k] for k in exceeded})}, "
                        f"used: {_pretty({k: used.get(k, parse_quantity(0)) for k in exceeded})}, "
                        f"limited: {_pretty({k: hard[k] for k in exceeded})}")
        return None

    # -- events -------------------------------------------------------------------------

    def event(self, obj, reason, message, type="Warning", ns="vsgd"):
        """Record an Event about `obj` (a Job or Pod dict as stored), as the job-controller,
        the default-scheduler (FailedScheduling) or the kubelet would; an identical event
        again only bumps `count` and `lastTimestamp`. Returns the Event's name.
        https://kubernetes.io/docs/reference/kubernetes-api/cluster-resources/event-v1/
        """
        meta = obj["metadata"]
        kind = obj.get("kind") or ("Job" if "template" in (obj.get("spec") or {}) else "Pod")
        component = ("job-controller" if kind == "Job" else
                     "default-scheduler" if reason == "FailedScheduling" else "kubelet")
        involved = {"kind": kind, "namespace": meta.get("namespace", ns), "name": meta["name"],
                    "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion"),
                    "apiVersion": obj.get("apiVersion") or ("batch/v1" if kind == "Job"
                                                            else "v1")}
        source = {"component": component, **({"host": NODE} if component == "kubelet" else {})}
        now = _now()
        with self.cond:
            for existing in self.objects["events"].values():
                if (existing["involvedObject"]["uid"], existing["reason"], existing["message"],
                        existing["type"], existing["source"]) == (involved["uid"], reason,
                                                                  message, type, source):
                    event = copy.deepcopy(existing)
                    event["count"] += 1
                    event["lastTimestamp"] = now
                    return self._put("events", event, "MODIFIED")["metadata"]["name"]
            # The name client-go's recorder gives an event: <object>.<hex of unix nanos>.
            event = {"apiVersion": "v1", "kind": "Event",
                     "metadata": {"name": f"{meta['name']}.{time.time_ns():x}",
                                  "namespace": ns, "uid": str(uuid.uuid4()),
                                  "creationTimestamp": now},
                     "involvedObject": involved, "reason": reason, "message": message,
                     "type": type, "count": 1, "firstTimestamp": now, "lastTimestamp": now,
                     "eventTime": None, "source": source, "reportingComponent": component,
                     "reportingInstance": source.get("host", "")}
            return self._put("events", event, "ADDED")["metadata"]["name"]

    def events(self, ns="vsgd"):
        with self.cond:
            return [copy.deepcopy(e) for (n, _), e in self.objects["events"].items() if n == ns]

    def refuse_pods(self, job_name, message, ns="vsgd"):
        """The Job controller's pod creation is refused (ResourceQuota, Pod Security
        admission, a missing ServiceAccount, ...): a Warning FailedCreate event on the Job,
        and no pod. https://kubernetes.io/docs/concepts/workloads/controllers/job/#controlling-parallelism
        (fewer pods "if the Job controller failed to create Pods for any reason")."""
        if not message.startswith("Error creating: "):
            message = "Error creating: " + message
        return self.event(self.job(job_name, ns), "FailedCreate", message, "Warning", ns)

    # -- what a controller and kubelet would do -----------------------------------------

    def _owned(self, uid, ns):
        """The pods a Job (by uid) owns, through their ownerReferences.
        https://kubernetes.io/docs/concepts/overview/working-with-objects/owners-dependents/
        """
        with self.cond:
            return [copy.deepcopy(p) for (n, _), p in self.objects["pods"].items()
                    if n == ns and any(r.get("uid") == uid for r in
                                       p["metadata"].get("ownerReferences", []))]

    def _recount(self, job):
        """status.active: "the number of pending and running pods which are not terminating
        (without a deletionTimestamp)"; status.ready: those with a Ready condition.
        https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/job-v1/#JobStatus
        """
        pods = [p for p in self._owned(job["metadata"]["uid"], job["metadata"]["namespace"])
                if p["status"]["phase"] in ("Pending", "Running")]
        active = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        job["status"]["active"] = len(active)
        job["status"]["ready"] = sum(1 for p in active
                                     if (_condition(p, "Ready") or {}).get("status") == "True")
        terminating = len(pods) - len(active)
        if terminating or "terminating" in job["status"]:
            job["status"]["terminating"] = terminating

    def _new_pod(self, job_name, ns, phase, containers, conditions, scheduled=True):
        """A pod as the Job controller creates it: the labels it sets (both the
        batch.kubernetes.io/ ones and, deprecated since 1.27 but still set, the unprefixed
        ones: https://kubernetes.io/docs/reference/labels-annotations-taints/#batchkubernetesio-job-name)
        and an ownerReference to the Job (controller: true). The pod goes through admission
        first: Pod Security `enforce` and ResourceQuota refuse it as they would the Job
        controller's create, which then records FailedCreate on the Job (returns None)."""
        job = self.job(job_name, ns)
        template = job["spec"]["template"]
        uid = job["metadata"]["uid"]
        name = f"{job_name[:57]}-{uuid.uuid4().hex[:5]}"
        labels = {**template.get("metadata", {}).get("labels", {}), "job-name": job_name,
                  "controller-uid": uid, "batch.kubernetes.io/job-name": job_name,
                  "batch.kubernetes.io/controller-uid": uid}
        spec = copy.deepcopy(template["spec"])
        refusal = (self._pod_security(ns, "enforce", spec, template.get("metadata"))
                   or self._quota_refusal(ns, _pod_requests(spec)))
        if refusal:
            self.refuse_pods(job_name, f'pods "{name}" is forbidden: {refusal}', ns)
            return None
        status = {"phase": phase, "conditions": conditions}
        if scheduled:
            spec["nodeName"] = NODE
            status["startTime"] = _now()
        if containers is not None:
            status["containerStatuses"] = [
                {"name": c.get("name", "train"), "image": c.get("image", ""), "imageID": "",
                 "restartCount": 0, **containers} for c in spec["containers"]]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "labels": labels,
                            "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                                 "name": job_name, "uid": uid,
                                                 "controller": True,
                                                 "blockOwnerDeletion": True}]},
               "spec": spec, "status": status}
        self._put("pods", pod, "ADDED")

        def change(j):
            self._recount(j)
            j["status"].setdefault("startTime", _now())
        self._update_job(job_name, ns, change)
        return name

    @staticmethod
    def _pod_conditions(ready, reason="ContainersNotReady", message=""):
        """https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-conditions"""
        now = _now()
        conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                      {"type": "Initialized", "status": "True", "lastTransitionTime": now}]
        for type_ in ("ContainersReady", "Ready"):
            conditions.append({"type": type_, "status": "True", "lastTransitionTime": now}
                              if ready else
                              {"type": type_, "status": "False", "reason": reason,
                               "message": message, "lastTransitionTime": now})
        return conditions

    def start_pod(self, job_name, ns="vsgd", phase="Running", log=(), waiting=None):
        """A pod for the Job, as the Job controller would create it; returns its name (None
        when admission refused it: a FailedCreate event on the Job says why).
        `waiting=(reason, message)`: the pod is Pending with its containers in
        state.waiting (ErrImagePull, ImagePullBackOff, CreateContainerConfigError, ...).
        https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-state-waiting
        """
        names = [c.get("name", "train") for c in self.job(job_name, ns)["spec"]["template"]
                 ["spec"]["containers"]]
        unready = f"containers with unready status: [{' '.join(names)}]"
        if waiting is not None:
            phase = "Pending"
            state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
        elif phase == "Running":
            state = {"running": {"startedAt": _now()}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        running = "running" in state
        containers = {"ready": running, "started": running, "state": state}
        name = self._new_pod(job_name, ns, phase, containers,
                             self._pod_conditions(running, message=unready))
        if name is not None:
            with self.cond:
                self.logs[(ns, name)] = list(log)
        return name

    def set_waiting(self, pod_name, reason, message, ns="vsgd"):
        """The pod's containers go (back) to waiting, e.g. ErrImagePull -> ImagePullBackOff.
        https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-state-waiting
        """
        def change(pod):
            statuses = pod["status"].setdefault("containerStatuses", [])
            for status in statuses:
                status.update(ready=False, started=False,
                              state={"waiting": {"reason": reason, "message": message}})
            unready = ("containers with unready status: ["
                       + " ".join(s["name"] for s in statuses) + "]")
            pod["status"]["conditions"] = self._pod_conditions(False, message=unready)
        return self._update_pod(pod_name, ns, change)

    def unschedulable_pod(self, job_name, message="0/3 nodes are available: 3 Insufficient "
                          "nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No "
                          "preemption victims found for incoming pod.", ns="vsgd"):
        """A pod the scheduler cannot place: Pending, PodScheduled=False/Unschedulable, no
        containerStatuses, and a Warning FailedScheduling event on it. Returns its name.
        https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-conditions
        """
        conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                       "message": message, "lastProbeTime": None,
                       "lastTransitionTime": _now()}]
        name = self._new_pod(job_name, ns, "Pending", None, conditions, scheduled=False)
        if name is not None:
            self.event(self.pod(name, ns), "FailedScheduling", message, "Warning", ns)
        return name

    def log(self, pod, *lines, ns="vsgd"):
        with self.cond:
            self.logs.setdefault((ns, pod), []).extend(lines)

    def end_pod(self, pod, exit_code, reason=None, ns="vsgd", message=None):
        """The pod's containers exit. `message` is what the kubelet puts in
        state.terminated.message from terminationMessagePath (or the log tail with
        FallbackToLogsOnError).
        https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/
        """
        phase = "Succeeded" if exit_code == 0 else "Failed"

        def change(obj):
            obj["status"]["phase"] = phase
            for status in obj["status"].get("containerStatuses", []):
                terminated = {"exitCode": exit_code,
                              "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                              "finishedAt": _now()}
                started = (status.get("state") or {}).get("running", {}).get("startedAt")
                if started:
                    terminated["startedAt"] = started
                if message is not None:
                    terminated["message"] = message
                status.update(ready=False, started=False, state={"terminated": terminated})
            for cond in obj["status"].get("conditions", []):
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond.update(status="False", reason="PodCompleted", message="")
        self._update_pod(pod, ns, change)

    def pod_failed(self, job_name, pod, exit_code=1, reason="Error", ns="vsgd", message=None):
        """One attempt failed; the Job goes on (status.failed counts it)."""
        self.end_pod(pod, exit_code, reason, ns, message)
        self._update_job(job_name, ns, lambda j: j["status"].update(
            active=0, failed=j["status"].get("failed", 0) + 1))

    # Conditions in the 1.31+ order: SuccessCriteriaMet / FailureTarget first (pods are then
    # terminated), Complete / Failed only once every pod has terminated.
    # https://kubernetes.io/docs/concepts/workloads/controllers/job/#termination-of-job-pods

    def complete(self, job_name, ns="vsgd", terminal=True):
        """The Job succeeded. terminal=False: only SuccessCriteriaMet (`finalize` adds
        Complete)."""
        message = "Reached expected number of succeeded pods"

        def change(job):
            job["status"].update(active=0, succeeded=1, ready=0)
            _set_condition(job, "SuccessCriteriaMet", "True", "CompletionsReached", message)
            if terminal:
                job["status"]["completionTime"] = _now()
                _set_condition(job, "Complete", "True", "CompletionsReached", message)
        for pod in self.pods_of(job_name, ns):
            if pod["status"]["phase"] == "Running":
                self.end_pod(pod["metadata"]["name"], 0, ns=ns)
        return self._update_job(job_name, ns, change)

    def fail(self, job_name, reason, message="", ns="vsgd", terminal=True):
        """The Job failed. terminal=False: only FailureTarget, and its active pods are being
        terminated (deletionTimestamp set); `finalize` removes them and adds Failed."""
        def change(job):
            job["status"].update(active=0, failed=job["status"].get("failed", 0) + 1)
            _set_condition(job, "FailureTarget", "True", reason, message)
            if terminal:
                _set_condition(job, "Failed", "True", reason, message)
            else:
                self._recount(job)
        if not terminal:
            for pod in self.pods_of(job_name, ns):
                if pod["status"]["phase"] in ("Pending", "Running"):
                    self._update_pod(pod["metadata"]["name"], ns, lambda p: p["metadata"].update(
                        deletionTimestamp=_now(), deletionGracePeriodSeconds=30))
        return self._update_job(job_name, ns, change)

    def finalize(self, job_name, ns="vsgd"):
        """Every pod has terminated: add Complete after SuccessCriteriaMet, or Failed after
        FailureTarget (same reason and message)."""
        job = self.job(job_name, ns)
        for pod in self._owned(job["metadata"]["uid"], ns):
            if pod["metadata"].get("deletionTimestamp"):
                self._put("pods", pod, "DELETED")
        success, failure = _condition(job, "SuccessCriteriaMet"), _condition(job, "FailureTarget")
        if not (success or failure):
            raise ValueError(f"Job {job_name} has neither SuccessCriteriaMet nor FailureTarget")

        def change(j):
            self._recount(j)
            if success:
                j["status"]["completionTime"] = _now()
                _set_condition(j, "Complete", "True", success["reason"], success["message"])
            else:
                _set_condition(j, "Failed", "True", failure["reason"], failure["message"])
        return self._update_job(job_name, ns, change)

    def _suspend_changed(self, job_name, ns, suspended):
        """The Job controller's answer to spec.suspend: suspended, its active pods are
        deleted and Suspended=True (JobSuspended); resumed, Suspended=False (JobResumed) and
        startTime is reset. Events Suspended / Resumed.
        https://kubernetes.io/docs/concepts/workloads/controllers/job/#suspending-a-job
        """
        job = self.job(job_name, ns)
        if suspended:
            for pod in self._owned(job["metadata"]["uid"], ns):
                if pod["status"]["phase"] in ("Pending", "Running"):
                    self._put("pods", pod, "DELETED")

        def change(j):
            if suspended:
                _set_condition(j, "Suspended", "True", "JobSuspended", "Job suspended")
                self._recount(j)
            else:
                _set_condition(j, "Suspended", "False", "JobResumed", "Job resumed")
                j["status"]["startTime"] = _now()
        updated = self._update_job(job_name, ns, change)
        self.event(updated, "Suspended" if suspended else "Resumed",
                   "Job suspended" if suspended else "Job resumed", "Normal", ns)
        return updated

    def admit(self, job_name, ns="vsgd"):
        """What Kueue does to admit a Job it holds: spec.suspend=false (one write), then the
        Job controller resumes it (another)."""
        if not (self.job(job_name, ns)["spec"].get("suspend")):
            raise ValueError(f"Job {job_name} is not suspended")

        def change(job):
            job["spec"]["suspend"] = False
            job["metadata"]["generation"] = job["metadata"].get("generation", 1) + 1
        self._update_job(job_name, ns, change)
        return self._suspend_changed(job_name, ns, False)

    def delete_job(self, name, ns="vsgd"):
        with self.cond:
            job = copy.deepcopy(self.objects["jobs"].get((ns, name)))
        if job is None:
            return None
        for pod in self.pods_of(name, ns):
            self._put("pods", pod, "DELETED")
        return self._put("jobs", job, "DELETED")

    def _delete_job(self, job, policy):
        """A DELETE through the API. batch/v1 Jobs orphan their pods unless told otherwise
        ("unmanaged jobs ... have a default deletion policy of orphanDependents":
        https://kubernetes.io/docs/concepts/workloads/controllers/job/#ttl-mechanism-for-finished-jobs);
        the cascading policies follow
        https://kubernetes.io/docs/concepts/architecture/garbage-collection/#cascading-deletion
        Returns the object the API answers with (None: a Status)."""
        name, ns, uid = (job["metadata"]["name"], job["metadata"]["namespace"],
                         job["metadata"]["uid"])
        if policy == "Background":   # gone now; the garbage collector deletes the pods after
            self._put("jobs", job, "DELETED")
            self._later(self.gc_delay, self._gc_pods, uid, ns, False)
            return None
        finalizer = "foregroundDeletion" if policy == "Foreground" else "orphan"

        def mark(j):
            j["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            j["metadata"]["finalizers"] = [*j["metadata"].get("finalizers", []), finalizer]
        marked = self._update_job(name, ns, mark)
        self._later(self.gc_delay, self._gc_finish, name, ns, uid, policy == "Orphan"
                    or policy is None)
        return marked

    def _gc_pods(self, uid, ns, orphan):
        for pod in self._owned(uid, ns):
            if orphan:   # the dependents lose their ownerReference and stay
                self._update_pod(pod["metadata"]["name"], ns, lambda p: p["metadata"].update(
                    ownerReferences=[r for r in p["metadata"]["ownerReferences"]
                                     if r.get("uid") != uid]))
            else:
                self._put("pods", pod, "DELETED")

    def _gc_finish(self, name, ns, uid, orphan):
        self._gc_pods(uid, ns, orphan)
        with self.cond:
            job = copy.deepcopy(self.objects["jobs"].get((ns, name)))
        if job is not None and job["metadata"]["uid"] == uid:
            job["metadata"]["finalizers"] = [f for f in job["metadata"]["finalizers"]
                                             if f not in ("orphan", "foregroundDeletion")]
            self._put("jobs", job, "DELETED")   # last finalizer gone: the object goes

    def pods_of(self, job_name, ns="vsgd"):
        job = self.job(job_name, ns)
        uid = job and job["metadata"]["uid"]
        with self.cond:
            return [copy.deepcopy(p) for (n, _), p in self.objects["pods"].items()
                    if n == ns and p["metadata"]["labels"].get("job-name") == job_name
                    and (uid is None or p["metadata"]["labels"].get("controller-uid",
                                                                    uid) == uid)]

    # -- watches --------------------------------------------------------------------------
    # https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes

    def compact(self):
        """Unrelated changes happen in the cluster, then etcd compacts: the history is gone
        and a watch from any resourceVersion seen so far gets 410."""
        with self.cond:
            self.rv += 10
            self.compacted_rv = self.rv
            self.history.clear()

    def expire_watches(self):
        """Compaction with watches open: each sends an ERROR event (410 Expired) and ends
        its stream cleanly; resuming from any version seen so far gets 410 as well."""
        with self.cond:
            self.compact()
            self.expire_generation += 1
            self.cond.notify_all()

    def bookmark(self):
        """Every open watch that asked for allowWatchBookmarks=true gets a BOOKMARK at the
        current resourceVersion (an object carrying only that).
        https://kubernetes.io/docs/reference/using-api/api-concepts/#watch-bookmarks
        """
        with self.cond:
            self.bookmark_generation += 1
            self.cond.notify_all()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kube: FakeKube = None

    def log_message(self, *args):   # quiet
        pass

    def setup(self):
        super().setup()
        with self.kube.cond:
            self.kube._connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        with self.kube.cond:
            self.kube._connections.discard(self.connection)

    def handle(self):
        try:
            super().handle()
        except OSError:
            pass   # a client that stopped its watch, or a connection the fake dropped

    # -- plumbing -----------------------------------------------------------------------

    def _send(self, code, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _text(self, code, text, headers=None):
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        if hasattr(self, "_read_body"):
            return copy.deepcopy(self._read_body)
        length = int(self.headers.get("Content-Length") or 0)
        self._read_body = json.loads(self.rfile.read(length) or b"{}")
        return copy.deepcopy(self._read_body)

    def _fault(self, fault):
        kind = fault["kind"]
        if kind == "reset":
            # Read, then reset the connection without an answer (SO_LINGER 0: an RST).
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            return None
        self._body()   # drain it, so that the connection stays usable
        retry = fault["retry_after"]
        if kind == "429":
            # What API Priority and Fairness (and max-in-flight) answer: 429 with
            # Retry-After and a plain-text body, no Status object.
            # https://kubernetes.io/docs/concepts/cluster-administration/flow-control/
            return self._text(429, "Too many requests, please try again later.\n", {
                "Retry-After": str(1 if retry is None else retry),
                "X-Kubernetes-PF-FlowSchema-UID": "fake-flowschema-uid",
                "X-Kubernetes-PF-PriorityLevel-UID": "fake-prioritylevel-uid"})
        headers = {} if retry is None else {"Retry-After": str(retry)}
        details = None if retry is None else {"retryAfterSeconds": retry}
        if kind == "503":
            return self._send(503, _status(503, "ServiceUnavailable", "the server is "
                              "currently unable to handle the request", details), headers)
        return self._send(500, _status(500, "InternalError", "Internal error occurred: fake "
                                       "outage", {**(details or {}), "causes": [
                                           {"message": "fake outage"}]}), headers)

    def _forbidden(self, verb, group, resource, ns, name):
        """403 with the message the API server writes for an authorization denial.
        https://kubernetes.io/docs/reference/access-authn-authz/authorization/#determine-the-request-verb
        """
        base = resource.split("/")[0]
        qualified = f"{base}.{group}" if group else base
        scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
        subject = f'{qualified} "{name}"' if name else qualified
        message = (f'{subject} is forbidden: User "{self.kube.user}" cannot {verb} resource '
                   f'"{resource}" in API group "{group}" {scope}')
        return self._send(403, _status(403, "Forbidden", message,
                                       {"name": name or "", "group": group, "kind": base}))

    def _route(self, method):
        self.__dict__.pop("_read_body", None)   # one handler serves a keep-alive connection
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        kube = self.kube
        kube.requests.append((method, url.path))
        if fault := kube._fault_for(method, url.path):
            return self._fault(fault)
        for prefix, handler in DISCOVERY.items():
            if method == "GET" and url.path == prefix:
                return self._send(200, handler)
        if method == "GET" and url.path.startswith("/openapi/v3/apis/batch/v1"):
            return self._send(200, OPENAPI_BATCH_V1)
        if url.path == SSAR_PATH:
            return self._ssar(method)
        if m := JOB_PATH.match(url.path):
            attrs = ("batch", "jobs", m["ns"], m["name"])
            target = lambda: self._jobs(method, m["ns"], m["name"], query)  # noqa: E731
        elif m := POD_PATH.match(url.path):
            attrs = ("", "pods/log" if m["log"] else "pods", m["ns"], m["name"])
            target = lambda: self._pods(method, m["ns"], m["name"], bool(m["log"]),  # noqa
                                        query)
        elif m := CORE_PATH.match(url.path):
            attrs = ("", m["kind"], m["ns"], m["name"])
            target = lambda: self._read_only(method, m["kind"], m["ns"], m["name"],  # noqa
                                             query)
        elif m := NS_PATH.match(url.path):
            # For namespaces the request's namespace is the namespace named.
            attrs = ("", "namespaces", m["name"], m["name"])
            target = lambda: self._namespaces(method, m["name"], query)  # noqa: E731
        else:
            return self._send(404, _status(404, "NotFound", f"the server could not find the "
                                                            f"requested resource ({url.path})"))
        group, resource, ns, name = attrs
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update",
                "DELETE": "delete" if name else "deletecollection"}.get(method)
        named = name
        if method == "GET":
            verb = ("get" if name else "watch" if query.get("watch") in ("true", "1")
                    else "list")
            if not name:   # a list or watch of one name is authorized as that name
                named = next((v for k, v, negate in self._terms(query) if not negate
                              and k == "metadata.name"), None)
        if not kube.authorized(verb, group, resource, ns, named):
            self._body()
            return self._forbidden(verb, group, resource, ns, name)
        return target()

    @staticmethod
    def _terms(query):
        try:
            return [(k, v, negate) for k, v, negate in
                    _field_terms("any", query.get("fieldSelector"), check=False)]
        except ValueError:
            return []

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    def do_PUT(self):
        self._route("PUT")

    # -- resources ----------------------------------------------------------------------

    def _jobs(self, method, ns, name, query):
        kube = self.kube
        # Server-side dry run: the request goes through validation and every admission
        # plugin as a real one would (quota included: it is checked, nothing reserved), only
        # nothing is stored (KEP-576).
        # https://kubernetes.io/docs/reference/using-api/api-concepts/#dry-run
        dry_run = query.get("dryRun") == "All"
        if method == "POST" and name is None:
            return self._create_job(ns, self._body(), dry_run)
        if method == "GET" and name is None:
            if query.get("watch") in ("true", "1"):
                return self._watch("jobs", ns, query)
            return self._list("jobs", "JobList", "batch/v1", ns, query)
        job = kube.job(name, ns)
        if job is None:
            self._body()
            return self._send(404, _status(404, "NotFound", f'jobs.batch "{name}" not found',
                                           {"name": name, "group": "batch", "kind": "jobs"}))
        if method == "GET":
            return self._send(200, job)
        if method == "DELETE":
            return self._delete(job, query, dry_run)
        if method == "PATCH":
            return self._patch(job, dry_run)
        return self._send(405, _status(405, "MethodNotAllowed", method))

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
            return self._send(422, _status(422, "Invalid", f'Job.batch "{job_name}" is '
                                                           f'invalid: {message}',
                                           {"name": job_name, "group": "batch",
                                            "kind": "Job"}))
        if ns not in kube.namespaces:
            # https://kubernetes.io/docs/reference/access-authn-authz/admission-controllers/#namespacelifecycle
            return self._send(404, _status(404, "NotFound", f'namespaces "{ns}" not found',
                                           {"name": ns, "kind": "namespaces"}))
        # Pod Security admission only warns and audits on a workload's pod template; its
        # enforce level refuses the pods the controller creates (_new_pod).
        # https://kubernetes.io/docs/concepts/security/pod-security-admission/#workload-resources-and-pod-templates
        template = job.get("spec", {}).get("template", {})
        warning = kube._pod_security(ns, "warn", template.get("spec") or {},
                                     template.get("metadata"))
        headers = {"Warning": _warning_header([warning])} if warning else {}
        # Validating admission webhooks see whether the request is a dry run.
        # https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#side-effects
        for webhook in (lambda j, _: kube.reject_create and kube.reject_create(j),
                        lambda j, d: kube.webhook and kube.webhook(j, d)):
            if refusal := webhook(copy.deepcopy(job), dry_run):
                return self._send(refusal[0], _status(*refusal), headers)
        if refusal := kube._quota_refusal(ns, {"count/jobs.batch": parse_quantity(1)}):
            return self._send(403, _status(403, "Forbidden", f'jobs.batch "{job_name}" is '
                                                             f'forbidden: {refusal}',
                                           {"name": job_name, "group": "batch",
                                            "kind": "jobs"}), headers)
        if kube.job(job_name, ns) is not None:
            return self._send(409, _status(409, "AlreadyExists", f'jobs.batch '
                              f'"{job_name}" already exists',
                              {"name": job_name, "group": "batch", "kind": "jobs"}), headers)
        if dry_run:
            kube.dry_runs.append(job_name)
            return self._send(201, kube._prepare_job(job), headers)
        created = kube.create_job(job)
        if kube.on_create:
            threading.Thread(target=kube.on_create, args=(copy.deepcopy(created),),
                             daemon=True).start()
        return self._send(201, created, headers)

    def _delete(self, job, query, dry_run):
        """DeleteOptions in the body or as query parameters.
        https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/delete-options/
        """
        kube, name = self.kube, job["metadata"]["name"]
        options = self._body() or {}
        policy = query.get("propagationPolicy") or options.get("propagationPolicy")
        orphan = query.get("orphanDependents", options.get("orphanDependents"))
        if policy is None and orphan is not None:   # the deprecated form
            policy = "Orphan" if str(orphan).lower() == "true" else "Background"
        if policy not in (None, "Orphan", "Background", "Foreground"):
            return self._send(422, _status(422, "Invalid", f'DeleteOptions.meta.k8s.io "" is '
                              f'invalid: propagationPolicy: Unsupported value: "{policy}": '
                              f'supported values: "Foreground", "Background", "Orphan"'))
        # Preconditions: delete only the object the client means (this uid, this version),
        # else 409 Conflict with the storage layer's message.
        preconditions = options.get("preconditions") or {}
        meta = job["metadata"]
        for field, key in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if preconditions.get(field) is not None and preconditions[field] != meta[field]:
                return self._send(409, _status(
                    409, "Conflict", f'Operation cannot be fulfilled on jobs.batch "{name}": '
                    f"StorageError: invalid object, Code: 4, Key: /registry/jobs/"
                    f"{meta['namespace']}/{name}, ResourceVersion: 0, AdditionalErrorMsg: "
                    f"Precondition failed: {key} in precondition: {preconditions[field]}, "
                    f"{key} in object meta: {meta[field]}",
                    {"name": name, "group": "batch", "kind": "jobs"}))
        headers = {"Warning": f'299 - "{ORPHAN_WARNING}"'} if policy is None else {}
        answer = job
        if not dry_run:
            kube.deletions.append((name, policy))
            answer = kube._delete_job(job, policy)
        if answer is not None and policy != "Background":
            return self._send(200, answer, headers)   # still there, being deleted
        return self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Success",
                                "details": {"name": name, "group": "batch", "kind": "jobs",
                                            "uid": job["metadata"]["uid"]}}, headers)

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
            return self._send(415, _status(415, "UnsupportedMediaType", "the fake API server "
                              "does not model server-side apply"))
        new = copy.deepcopy(job)
        editable = {"metadata": new["metadata"], "spec": new.get("spec", {})}
        if "json-patch" in content_type or isinstance(patch, list):
            try:
                _json_patch(editable, patch)
            except (KeyError, IndexError, ValueError, TypeError) as exc:
                return self._send(422, _status(422, "Invalid", f"the JSON patch cannot be "
                                               f"applied: {exc!r}"))
        else:
            for part in ("metadata", "spec"):
                if isinstance(patch.get(part), dict):
                    _merge_patch(editable[part], patch[part])
        for key in ("uid", "creationTimestamp", "generation", "resourceVersion", "namespace",
                    "name"):   # set by the server
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

    def _pods(self, method, ns, name, log, query):
        kube = self.kube
        if method != "GET":
            self._body()
            return self._send(405, _status(405, "MethodNotAllowed", method))
        if name is None:
            if query.get("watch") in ("true", "1"):
                return self._watch("pods", ns, query)
            return self._list("pods", "PodList", "v1", ns, query)
        with kube.cond:
            pod = copy.deepcopy(kube.objects["pods"].get((ns, name)))
            lines = list(kube.logs.get((ns, name), []))
        if pod is None:
            return self._send(404, _status(404, "NotFound", f'pods "{name}" not found',
                                           {"name": name, "kind": "pods"}))
        if not log:
            return self._send(200, pod)
        if refusal := _log_refusal(pod, query.get("container")):
            return self._send(400, _status(400, "BadRequest", refusal))
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]):] if int(query["tailLines"]) else []
        return self._text(200, "".join(line + "\n" for line in lines))

    def _read_only(self, method, kind, ns, name, query):
        kube = self.kube
        if method != "GET":
            self._body()
            return self._send(405, _status(405, "MethodNotAllowed", method))
        if name is None:
            return self._list(kind, READ_ONLY_KINDS[kind][1], "v1", ns, query)
        with kube.cond:
            obj = copy.deepcopy(kube.objects[kind].get((ns, name)))
        if obj is None:
            return self._send(404, _status(404, "NotFound", f'{kind} "{name}" not found',
                                           {"name": name, "kind": kind}))
        if kind == "resourcequotas":
            obj["status"] = kube._quota_status(obj)
        return self._send(200, obj)

    def _namespaces(self, method, name, query):
        kube = self.kube
        if method != "GET":
            self._body()
            return self._send(405, _status(405, "MethodNotAllowed", method))
        if name is None:
            return self._send(200, {"kind": "NamespaceList", "apiVersion": "v1",
                                    "metadata": {"resourceVersion": str(kube.rv)},
                                    "items": [kube._namespace(n)
                                              for n in sorted(kube.namespaces)]})
        if name not in kube.namespaces:
            return self._send(404, _status(404, "NotFound", f'namespaces "{name}" not found',
                                           {"name": name, "kind": "namespaces"}))
        return self._send(200, kube._namespace(name))

    def _ssar(self, method):
        """SelfSubjectAccessReview: may the caller do this? Every authenticated user may ask
        (the system:basic-user role grants it), so it is never denied itself.
        https://kubernetes.io/docs/reference/access-authn-authz/authorization/#checking-api-access
        """
        kube = self.kube
        review = self._body()
        if method != "POST":
            return self._send(405, _status(405, "MethodNotAllowed", method))
        spec = review.get("spec") or {}
        attrs = spec.get("resourceAttributes")
        allowed = True
        if attrs is not None:
            resource = attrs.get("resource", "")
            if attrs.get("subresource"):
                resource += "/" + attrs["subresource"]
            allowed = kube.authorized(attrs.get("verb"), attrs.get("group", ""), resource,
                                      attrs.get("namespace"), attrs.get("name"))
            kube.access_reviews.append(copy.deepcopy(attrs))
        return self._send(201, {"kind": "SelfSubjectAccessReview",
                                "apiVersion": "authorization.k8s.io/v1",
                                "metadata": {"creationTimestamp": None}, "spec": spec,
                                "status": {"allowed": allowed}})

    def _list(self, kind, list_kind, api_version, ns, query):
        kube = self.kube
        try:
            fields = _field_terms(kind, query.get("fieldSelector"))
        except ValueError as exc:
            return self._send(400, _status(400, "BadRequest", str(exc)))
        # Items come ordered by their key in storage, namespace/name, which is what makes
        # chunked lists (`limit`, `continue`) consistent.
        # https://kubernetes.io/docs/reference/using-api/api-concepts/#retrieving-large-results-sets-in-chunks
        with kube.cond:
            items = [copy.deepcopy(o) for (n, _), o in sorted(kube.objects[kind].items())
                     if n == ns and _matches(o["metadata"].get("labels", {}),
                                             query.get("labelSelector"))
                     and all((_field(o, f) == v) != negate for f, v, negate in fields)]
            if kind == "resourcequotas":
                for quota in items:
                    quota["status"] = kube._quota_status(quota)
            rv = str(kube.rv)
        return self._send(200, {"kind": list_kind, "apiVersion": api_version,
                                "metadata": {"resourceVersion": rv}, "items": items})

    def _watch(self, kind, ns, query):
        kube = self.kube
        timeout = float(query.get("timeoutSeconds") or 1800)
        since = int(query.get("resourceVersion") or 0)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        kube.watch_starts.append(since)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + timeout
        with kube.cond:
            generation = kube.cut_generation
            bookmark_generation = kube.bookmark_generation
            expire_generation = kube.expire_generation
            if since and since < kube.compacted_rv:
                self._chunk({"type": "ERROR", "object": _status(
                    410, "Expired", f"too old resource version: {since} ({kube.compacted_rv})")})
                return self._end()
            if not since:   # "0"/unset: the current state first, as ADDED events
                pending = [(kube.rv, kind, "ADDED", o)
                           for _, o in sorted(kube.objects[kind].items())]
                since = kube.rv
            else:
                pending = []
            while True:
                pending += [e for e in kube.history if e[0] > since and e[1] == kind]
                for rv, _, event, obj in pending:
                    since = max(since, rv)
                    if obj["metadata"]["namespace"] == ns and _matches(
                            obj["metadata"].get("labels", {}), query.get("labelSelector")):
                        self._chunk({"type": event, "object": obj})
                pending = []
                if kube.expire_generation != expire_generation:
                    self._chunk({"type": "ERROR", "object": _status(
                        410, "Expired", f"too old resource version: {since} "
                                        f"({kube.compacted_rv})")})
                    return self._end()
                if kube.bookmark_generation != bookmark_generation:
                    bookmark_generation = kube.bookmark_generation
                    if bookmarks:
                        since = max(since, kube.rv)
                        self._chunk({"type": "BOOKMARK", "object": {
                            "kind": "Job" if kind == "jobs" else "Pod",
                            "apiVersion": "batch/v1" if kind == "jobs" else "v1",
                            "metadata": {"resourceVersion": str(since)}}})
                left = deadline - time.monotonic()
                if kube.cut_generation != generation:
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)   # no final chunk: the client sees a cut
                    return None
                if left <= 0:
                    return self._end()
                kube.cond.wait(min(left, 0.5))

    def _chunk(self, event):
        data = (json.dumps(event) + "\n").encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _log_refusal(pod, container):
    """Why the log of `container` cannot be read (a 400 Bad Request), or None: the API
    server's own checks (a pod not yet on a node, a container it does not have), then the
    kubelet's (validateContainerLogStatus), whose error the API server passes on as a 400:
    `kubectl logs` shows it as "Error from server (BadRequest): container "train" in pod
    "x" is waiting to start: ContainerCreating".
    https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#get-read-log-of-the-specified-pod
    """
    name = pod["metadata"]["name"]
    names = [c["name"] for c in pod["spec"].get("containers") or []]
    if container is None:
        if len(names) != 1:
            return (f"a container name must be specified for pod {name}, choose one of: "
                    f"[{' '.join(names)}]")
        container = names[0]
    elif container not in names:
        return f"container {container} is not valid for pod {name}"
    if not pod["spec"].get("nodeName"):
        return f"pod {name} does not have a host assigned"
    status = next((s for s in (pod.get("status") or {}).get("containerStatuses") or []
                   if s.get("name") == container), None)
    if status is None:
        return f'container "{container}" in pod "{name}" is not available'
    state, last = status.get("state") or {}, status.get("lastState") or {}
    if state.get("running") or state.get("terminated") or last.get("terminated"):
        return None
    reason = (state.get("waiting") or {}).get("reason")
    if reason is None:
        return f'container "{container}" in pod "{name}" is waiting to start - no logs yet'
    why = {"ErrImagePull": "image can't be pulled",
           "ImagePullBackOff": "trying and failing to pull image"}.get(reason, reason)
    return f'container "{container}" in pod "{name}" is waiting to start: {why}'


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
        errors.append(f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain '
                      f"must consist of lower case alphanumeric characters, '-' or '.', and "
                      f"must start and end with an alphanumeric character (e.g. "
                      f"'example.com', regex used for validation is "
                      f"'{DNS_SUBDOMAIN.pattern}')")
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    if not pod.get("containers"):
        errors.append("spec.template.spec.containers: Required value")
    policy = pod.get("restartPolicy") or "Always"   # the pod template's default
    if policy not in ("OnFailure", "Never"):
        errors.append(f'spec.template.spec.restartPolicy: Unsupported value: "{policy}": '
                      f'supported values: "OnFailure", "Never"')
    return errors


def _resources(group_version, resources):
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}


def _core(name, kind, verbs, short=None):
    return {"name": name, "singularName": kind.lower(), "namespaced": True, "kind": kind,
            "verbs": verbs, **({"shortNames": short} if short else {})}


DISCOVERY = {
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake",
                 "platform": "linux/amd64"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": "batch", "versions": [{"groupVersion": "batch/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": "batch/v1", "version": "v1"}},
        {"name": "authorization.k8s.io",
         "versions": [{"groupVersion": "authorization.k8s.io/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": "authorization.k8s.io/v1", "version": "v1"}}]},
    "/api/v1": _resources("v1", [
        _core("pods", "Pod", ["get", "list", "watch"], ["po"]),
        {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod",
         "verbs": ["get"]},
        _core("events", "Event", ["get", "list"], ["ev"]),
        _core("serviceaccounts", "ServiceAccount", ["get", "list"], ["sa"]),
        _core("secrets", "Secret", ["get", "list"]),
        _core("configmaps", "ConfigMap", ["get", "list"], ["cm"]),
        _core("resourcequotas", "ResourceQuota", ["get", "list"], ["quota"]),
        {"name": "namespaces", "singularName": "namespace", "namespaced": False,
         "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]}]),
    "/apis/batch/v1": _resources("batch/v1", [
        {"name": "jobs", "singularName": "job", "namespaced": True, "kind": "Job",
         "verbs": ["create", "delete", "get", "list", "patch", "watch"],
         "categories": ["all"]}]),
    "/apis/authorization.k8s.io/v1": _resources("authorization.k8s.io/v1", [
        {"name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
         "namespaced": False, "kind": "SelfSubjectAccessReview", "verbs": ["create"]}]),
    "/openapi/v3": {"paths": {
        "apis/batch/v1": {"serverRelativeURL": "/openapi/v3/apis/batch/v1?hash=fake"}}},
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
                "parameters": [{"name": "fieldValidation", "in": "query",
                                "schema": {"type": "string", "uniqueItems": True}}],
                "requestBody": {"content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/io.k8s.api.batch.v1.Job"}}}},
                "responses": {"201": {"description": "Created"}},
                "x-kubernetes-action": "post",
                "x-kubernetes-group-version-kind": {"group": "batch", "kind": "Job",
                                                    "version": "v1"}},
            "patch": {
                "operationId": "patchBatchV1NamespacedJob",
                "parameters": [{"name": "fieldValidation", "in": "query",
                                "schema": {"type": "string", "uniqueItems": True}}],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": "batch", "kind": "Job",
                                                    "version": "v1"}}}},
    "components": {"schemas": {"io.k8s.api.batch.v1.Job": {
        "type": "object",
        "x-kubernetes-group-version-kind": [{"group": "batch", "kind": "Job",
                                             "version": "v1"}],
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                       "metadata": {"type": "object"}, "spec": {"type": "object"},
                       "status": {"type": "object"}}}}},
}
