"""The test API server's state: objects stored with their history (what watches replay),
its lifecycle on a local port, and faults injected into any request."""

import base64
import copy
import socket
import threading
import time
import uuid

from .clock import REAL_TIME
from .handler import serve
from .objects import READ_ONLY_KINDS, timestamp

FAULT_KINDS = ("503", "500", "429", "reset", "refused")


class Store:
    """The objects, their history and the faults; `clock` times every wait and duration of
    the server (faults lasting N seconds, watch timeouts, the garbage collector's delay)."""

    def __init__(self, clock=REAL_TIME):
        self.clock = clock
        self.cond = threading.Condition()
        self.rv = 1000
        self.objects = {
            "jobs": {},
            "pods": {},
            "events": {},
            "serviceaccounts": {},
            "secrets": {},
            "configmaps": {},
            "resourcequotas": {},
        }  # kind -> (ns, name) -> object
        self.logs = {}  # (ns, pod) -> list of lines
        self.history = []  # (rv, kind, type, object)
        self.compacted_rv = 0  # watches from at or below: 410
        self.cut_generation = 0  # bumped to cut open watches
        self.bookmark_generation = 0  # bumped to send BOOKMARKs
        self.expire_generation = 0  # bumped to end watches with a 410
        self.reject_create = None  # job -> (code, reason, message) | None
        self.webhook = None  # (job, dry_run) -> the same, see JobWrites
        self.on_create = None  # job -> None, run in a thread
        self.requests = []  # (method, path) of every request
        self.watches = []  # path of every watch=true request
        self.watch_starts = []  # resourceVersion of every watch served
        self.open_watches = 0  # watches being served now
        self.namespaces = {"vsgd", "default"}  # namespaces that exist
        self.namespace_labels = {}  # ns -> labels (Pod Security levels)
        self.user = "fake"  # who the kubeconfig's token is
        self.roles = None  # [(ns, rules)] bound, see bind_role
        self.denied = set()  # (verb, group, resource) not granted
        self.access_reviews = []  # resourceAttributes of every SSAR
        self.outages = []  # faults, see outage()
        self.faulted = []  # (method, path, kind) answered by one
        self.deletions = []  # (job name, propagationPolicy | None)
        self.dry_runs = []  # names of dry-run created Jobs
        self.gc_delay = 0.05  # seconds before the GC acts
        self._ns_uids = {}
        self._connections = set()
        self._server = None
        self._port = 0
        self._stopped = False
        self._timers = []
        # What the project's Job template refers to (k8s/ and pipeline/k8s/access.py NAMED),
        # and the `default` ServiceAccount that every namespace gets.
        # https://kubernetes.io/docs/concepts/security/service-accounts/#default-service-accounts
        for ns in sorted(self.namespaces):
            self.add_object("serviceaccounts", "default", ns)
        self.add_object("serviceaccounts", "vsgd-train")
        self.add_object(
            "secrets",
            "vsgd-credentials",
            data={"AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake"},
        )
        self.add_object("configmaps", "vsgd-endpoints", data={"AWS_DEFAULT_REGION": "us-east-1"})

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> str:
        self._serve(0)
        return f"http://127.0.0.1:{self._port}"

    def _serve(self, port):
        self._server = serve(self, port)
        self._port = self._server.server_address[1]

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
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
        }

    def _later(self, seconds, fn, *args):
        self._timers.append(self.clock.timer(seconds, fn, *args))

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
        `seconds` are the server's `clock`'s, and so are the seconds of `retry_after` to a
        client that keeps the same clock.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"outage kind must be one of {FAULT_KINDS}, not {kind!r}")
        if seconds is None and count is None:
            raise ValueError("an outage needs seconds= or count=")
        if kind == "refused" and (seconds is None or count is not None or match is not None):
            raise ValueError('a "refused" outage takes seconds= only')
        fault = {
            "kind": kind,
            "left": count,
            "match": match,
            "retry_after": retry_after,
            "until": None if seconds is None else self.clock.monotonic() + seconds,
            "done": False,
        }
        with self.cond:
            self.outages.append(fault)
        if kind == "refused":
            self._refuse(fault, seconds)
        return fault

    def _active(self, fault):
        if fault["kind"] == "refused":
            return not fault["done"]
        if fault["until"] is not None and self.clock.monotonic() >= fault["until"]:
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
        # Real time: how long the operating system takes to let the port go.
        deadline = time.monotonic() + 5
        while not self._stopped:
            try:
                self._serve(self._port)  # HTTPServer sets SO_REUSEADDR: same port again
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
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=timestamp(), generation=1)
        meta.setdefault("namespace", "default")
        job.setdefault("status", {})
        return job

    def create_job(self, job):
        created = self._put("jobs", self._prepare_job(job), "ADDED")
        if (created.get("spec") or {}).get("suspend"):
            self._suspend_changed(
                created["metadata"]["name"], created["metadata"]["namespace"], True
            )
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
            raise ValueError(
                f"add_object kind must be serviceaccounts, secrets or configmaps, not {kind!r}"
            )
        obj = {
            "apiVersion": "v1",
            "kind": READ_ONLY_KINDS[kind][0],
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": timestamp(),
            },
        }
        if kind == "secrets":
            # https://kubernetes.io/docs/reference/kubernetes-api/config-and-storage-resources/secret-v1/
            obj["type"] = "Opaque"
            obj["data"] = {
                k: base64.b64encode(v.encode() if isinstance(v, str) else v).decode()
                for k, v in (data or {}).items()
            }
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
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": uid,
                "resourceVersion": "1",
                "creationTimestamp": "2024-01-01T00:00:00Z",
                "labels": {
                    **self.namespace_labels.get(name, {}),
                    "kubernetes.io/metadata.name": name,
                },
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }

    # -- watches --------------------------------------------------------------------------
    # https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes

    def await_watch(self, count, timeout=10.0):
        """Wait until `count` watches have been served and one is open: how a test acts
        while its client watches (a cut, an event it must see). AssertionError after
        `timeout` real seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (len(self.watch_starts) >= count and self.open_watches):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no watch open after {len(self.watch_starts)} of {count} watches"
                    )
                self.cond.wait(left)

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
