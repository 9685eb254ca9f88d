"""The HTTP side of the test API server: routing, authorization, the faults, reads, lists
and watches streamed as chunked JSON events."""

import copy
import functools
import json
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from .discovery import DISCOVERY, OPENAPI_BATCH_V1
from .job_writes import JobWrites
from .objects import READ_ONLY_KINDS, error_status
from .scenario import log_refusal
from .selectors import field_terms, field_value, matches

JOB_PATH = re.compile(r"^/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs(/(?P<name>[^/]+))?$")
POD_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(/(?P<name>[^/]+)(?P<log>/log)?)?$")
CORE_PATH = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<kind>events|serviceaccounts|"
    r"secrets|configmaps|resourcequotas)(/(?P<name>[^/]+))?$"
)
NS_PATH = re.compile(r"^/api/v1/namespaces(/(?P<name>[^/]+))?$")
SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


class Handler(JobWrites, BaseHTTPRequestHandler):
    """One connection to the test API server; `kube` is the server's state (a FakeKube)."""

    protocol_version = "HTTP/1.1"
    kube = None

    def log_message(self, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        # No Nagle delay, as Go's net/http serves the real API server ("The default is true
        # (no delay)": https://pkg.go.dev/net#TCPConn.SetNoDelay): headers and body go out
        # in two writes, and the second would wait for the client's delayed ACK (~40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            pass  # a client that stopped its watch, or a connection the fake dropped

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
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return None
        self._body()  # drain it, so that the connection stays usable
        retry = fault["retry_after"]
        if kind == "429":
            # What API Priority and Fairness (and max-in-flight) answer: 429 with
            # Retry-After and a plain-text body, no Status object.
            # https://kubernetes.io/docs/concepts/cluster-administration/flow-control/
            return self._text(
                429,
                "Too many requests, please try again later.\n",
                {
                    "Retry-After": str(1 if retry is None else retry),
                    "X-Kubernetes-PF-FlowSchema-UID": "fake-flowschema-uid",
                    "X-Kubernetes-PF-PriorityLevel-UID": "fake-prioritylevel-uid",
                },
            )
        headers = {} if retry is None else {"Retry-After": str(retry)}
        details = None if retry is None else {"retryAfterSeconds": retry}
        if kind == "503":
            return self._send(
                503,
                error_status(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                    details,
                ),
                headers,
            )
        return self._send(
            500,
            error_status(
                500,
                "InternalError",
                "Internal error occurred: fake outage",
                {**(details or {}), "causes": [{"message": "fake outage"}]},
            ),
            headers,
        )

    def _forbidden(self, verb, group, resource, ns, name):
        """403 with the message the API server writes for an authorization denial.
        https://kubernetes.io/docs/reference/access-authn-authz/authorization/#determine-the-request-verb
        """
        base = resource.split("/")[0]
        qualified = f"{base}.{group}" if group else base
        scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
        subject = f'{qualified} "{name}"' if name else qualified
        message = (
            f'{subject} is forbidden: User "{self.kube.user}" cannot {verb} resource '
            f'"{resource}" in API group "{group}" {scope}'
        )
        return self._send(
            403,
            error_status(
                403, "Forbidden", message, {"name": name or "", "group": group, "kind": base}
            ),
        )

    def _route(self, method):
        self.__dict__.pop("_read_body", None)  # one handler serves a keep-alive connection
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        kube = self.kube
        kube.requests.append((method, url.path))
        if method == "GET" and query.get("watch") in ("true", "1"):
            kube.watches.append(url.path)
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
            target = functools.partial(self._jobs, method, m["ns"], m["name"], query)
        elif m := POD_PATH.match(url.path):
            attrs = ("", "pods/log" if m["log"] else "pods", m["ns"], m["name"])
            target = functools.partial(
                self._pods, method, m["ns"], m["name"], bool(m["log"]), query
            )
        elif m := CORE_PATH.match(url.path):
            attrs = ("", m["kind"], m["ns"], m["name"])
            target = functools.partial(
                self._read_only, method, m["kind"], m["ns"], m["name"], query
            )
        elif m := NS_PATH.match(url.path):
            # For namespaces the request's namespace is the namespace named.
            attrs = ("", "namespaces", m["name"], m["name"])
            target = lambda: self._namespaces(method, m["name"], query)  # noqa: E731
        else:
            return self._send(
                404,
                error_status(
                    404,
                    "NotFound",
                    f"the server could not find the requested resource ({url.path})",
                ),
            )
        group, resource, ns, name = attrs
        verb = {
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete" if name else "deletecollection",
        }.get(method)
        named = name
        if method == "GET":
            verb = "get" if name else "watch" if query.get("watch") in ("true", "1") else "list"
            if not name:  # a list or watch of one name is authorized as that name
                named = next(
                    (
                        v
                        for k, v, negate in self._terms(query)
                        if not negate and k == "metadata.name"
                    ),
                    None,
                )
        if not kube.authorized(verb, group, resource, ns, named):
            self._body()
            return self._forbidden(verb, group, resource, ns, name)
        return target()

    @staticmethod
    def _terms(query):
        try:
            return [
                (k, v, negate)
                for k, v, negate in field_terms("any", query.get("fieldSelector"), check=False)
            ]
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
            return self._send(
                404,
                error_status(
                    404,
                    "NotFound",
                    f'jobs.batch "{name}" not found',
                    {"name": name, "group": "batch", "kind": "jobs"},
                ),
            )
        if method == "GET":
            return self._send(200, job)
        if method == "DELETE":
            return self._delete(job, query, dry_run)
        if method == "PATCH":
            return self._patch(job, dry_run)
        return self._send(405, error_status(405, "MethodNotAllowed", method))

    def _pods(self, method, ns, name, log, query):
        kube = self.kube
        if method != "GET":
            self._body()
            return self._send(405, error_status(405, "MethodNotAllowed", method))
        if name is None:
            if query.get("watch") in ("true", "1"):
                return self._watch("pods", ns, query)
            return self._list("pods", "PodList", "v1", ns, query)
        with kube.cond:
            pod = copy.deepcopy(kube.objects["pods"].get((ns, name)))
            lines = list(kube.logs.get((ns, name), []))
        if pod is None:
            return self._send(
                404,
                error_status(
                    404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}
                ),
            )
        if not log:
            return self._send(200, pod)
        if refusal := log_refusal(pod, query.get("container")):
            return self._send(400, error_status(400, "BadRequest", refusal))
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]) :] if int(query["tailLines"]) else []
        return self._text(200, "".join(line + "\n" for line in lines))

    def _read_only(self, method, kind, ns, name, query):
        kube = self.kube
        if method != "GET":
            self._body()
            return self._send(405, error_status(405, "MethodNotAllowed", method))
        if name is None:
            return self._list(kind, READ_ONLY_KINDS[kind][1], "v1", ns, query)
        with kube.cond:
            obj = copy.deepcopy(kube.objects[kind].get((ns, name)))
        if obj is None:
            return self._send(
                404,
                error_status(
                    404, "NotFound", f'{kind} "{name}" not found', {"name": name, "kind": kind}
                ),
            )
        if kind == "resourcequotas":
            obj["status"] = kube._quota_status(obj)
        return self._send(200, obj)

    def _namespaces(self, method, name, query):
        kube = self.kube
        if method != "GET":
            self._body()
            return self._send(405, error_status(405, "MethodNotAllowed", method))
        if name is None:
            return self._send(
                200,
                {
                    "kind": "NamespaceList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(kube.rv)},
                    "items": [kube._namespace(n) for n in sorted(kube.namespaces)],
                },
            )
        if name not in kube.namespaces:
            return self._send(
                404,
                error_status(
                    404,
                    "NotFound",
                    f'namespaces "{name}" not found',
                    {"name": name, "kind": "namespaces"},
                ),
            )
        return self._send(200, kube._namespace(name))

    def _ssar(self, method):
        """SelfSubjectAccessReview: may the caller do this? Every authenticated user may ask
        (the system:basic-user role grants it), so it is never denied itself.
        https://kubernetes.io/docs/reference/access-authn-authz/authorization/#checking-api-access
        """
        kube = self.kube
        review = self._body()
        if method != "POST":
            return self._send(405, error_status(405, "MethodNotAllowed", method))
        spec = review.get("spec") or {}
        attrs = spec.get("resourceAttributes")
        allowed = True
        if attrs is not None:
            resource = attrs.get("resource", "")
            if attrs.get("subresource"):
                resource += "/" + attrs["subresource"]
            allowed = kube.authorized(
                attrs.get("verb"),
                attrs.get("group", ""),
                resource,
                attrs.get("namespace"),
                attrs.get("name"),
            )
            kube.access_reviews.append(copy.deepcopy(attrs))
        return self._send(
            201,
            {
                "kind": "SelfSubjectAccessReview",
                "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": spec,
                "status": {"allowed": allowed},
            },
        )

    def _list(self, kind, list_kind, api_version, ns, query):
        kube = self.kube
        try:
            fields = field_terms(kind, query.get("fieldSelector"))
        except ValueError as exc:
            return self._send(400, error_status(400, "BadRequest", str(exc)))
        # Items come ordered by their key in storage, namespace/name, which is what makes
        # chunked lists (`limit`, `continue`) consistent.
        # https://kubernetes.io/docs/reference/using-api/api-concepts/#retrieving-large-results-sets-in-chunks
        with kube.cond:
            items = [
                copy.deepcopy(o)
                for (n, _), o in sorted(kube.objects[kind].items())
                if n == ns
                and matches(o["metadata"].get("labels", {}), query.get("labelSelector"))
                and all((field_value(o, f) == v) != negate for f, v, negate in fields)
            ]
            if kind == "resourcequotas":
                for quota in items:
                    quota["status"] = kube._quota_status(quota)
            rv = str(kube.rv)
        return self._send(
            200,
            {
                "kind": list_kind,
                "apiVersion": api_version,
                "metadata": {"resourceVersion": rv},
                "items": items,
            },
        )

    def _watch(self, kind, ns, query):
        """Stream events as chunks until the timeout, a cut, or an expiry. The watch counts
        as open (`open_watches`) from the moment it took note of the cuts, bookmarks and
        expiries so far, under the lock: one a test sees open (`await_watch`) gets the
        next."""
        kube = self.kube
        timeout = float(query.get("timeoutSeconds") or 1800)
        since = int(query.get("resourceVersion") or 0)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = kube.clock.monotonic() + timeout
        with kube.cond:
            generation = kube.cut_generation
            bookmark_generation = kube.bookmark_generation
            expire_generation = kube.expire_generation
            kube.watch_starts.append(since)
            kube.open_watches += 1
            kube.cond.notify_all()
            try:
                return self._stream(
                    kind,
                    ns,
                    query,
                    since,
                    deadline,
                    bookmarks,
                    (generation, bookmark_generation, expire_generation),
                )
            finally:
                kube.open_watches -= 1
                kube.cond.notify_all()

    def _stream(self, kind, ns, query, since, deadline, bookmarks, generations):
        """The events of a watch, with the lock held (waits release it)."""
        kube = self.kube
        generation, bookmark_generation, expire_generation = generations
        if since and since < kube.compacted_rv:
            self._chunk(
                {
                    "type": "ERROR",
                    "object": error_status(
                        410, "Expired", f"too old resource version: {since} ({kube.compacted_rv})"
                    ),
                }
            )
            return self._end()
        if not since:  # "0"/unset: the current state first, as ADDED events
            pending = [(kube.rv, kind, "ADDED", o) for _, o in sorted(kube.objects[kind].items())]
            since = kube.rv
        else:
            pending = []
        while True:
            pending += [e for e in kube.history if e[0] > since and e[1] == kind]
            for rv, _, event, obj in pending:
                since = max(since, rv)
                if obj["metadata"]["namespace"] == ns and matches(
                    obj["metadata"].get("labels", {}), query.get("labelSelector")
                ):
                    self._chunk({"type": event, "object": obj})
            pending = []
            if kube.expire_generation != expire_generation:
                self._chunk(
                    {
                        "type": "ERROR",
                        "object": error_status(
                            410,
                            "Expired",
                            f"too old resource version: {since} ({kube.compacted_rv})",
                        ),
                    }
                )
                return self._end()
            if kube.bookmark_generation != bookmark_generation:
                bookmark_generation = kube.bookmark_generation
                if bookmarks:
                    since = max(since, kube.rv)
                    self._chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": "Job" if kind == "jobs" else "Pod",
                                "apiVersion": "batch/v1" if kind == "jobs" else "v1",
                                "metadata": {"resourceVersion": str(since)},
                            },
                        }
                    )
            left = deadline - kube.clock.monotonic()
            if kube.cut_generation != generation:
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)  # no final chunk: the client sees a cut
                return None
            if left <= 0:
                return self._end()
            kube.clock.wait(kube.cond, min(left, 0.5))

    def _chunk(self, event):
        data = (json.dumps(event) + "\n").encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def serve(kube, port=0) -> ThreadingHTTPServer:
    """Serve `kube` on 127.0.0.1:`port` (0: any free port) from a thread of its own."""

    class KubeHandler(Handler):
        pass

    KubeHandler.kube = kube
    server = ThreadingHTTPServer(("127.0.0.1", port), KubeHandler)
    server.daemon_threads = True
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return server
