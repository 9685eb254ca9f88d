"""Whether the services the protocol writes to answer, each within a few seconds: the
tracking server (an http(s) URI: a GET of MLflow's `/health`; SQLite: the database's
directory takes a new file, `pipeline.tracking_check`) and the remote store
(`storage.remote`: a HEAD of its bucket with `pipeline.storage`'s client)."""

import os
import ssl
import threading
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from vsgd.checker import Checker
from vsgd.tracking import tracking_uri

from ..redact import redact
from ..storage import endpoint_from_env, s3_client, split_s3
from ..tracking_check import check_tracking

WAIT_SECONDS = 5.0  # per service: long enough for a server across a network, short for a person


def tracking_status(configured: str | None, wait: float = WAIT_SECONDS) -> dict:
    """`{uri, kind, ok, detail}` of the tracking URI the runs will use (the environment's
    MLFLOW_TRACKING_URI, else `tracking.uri`); `ok` None where nothing is checked."""
    uri = tracking_uri(configured)
    if uri is None:
        return {"uri": None, "kind": "none", "ok": None, "detail": "untracked (tracking.uri null)"}
    shown = redact(uri)
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        ok, detail = _health(uri, wait)
        return {"uri": shown, "kind": scheme, "ok": ok, "detail": detail}
    checker = Checker()
    check_tracking(checker, configured)  # the form, and an SQLite file's directory
    if checker.problems:
        return {"uri": shown, "kind": scheme, "ok": False, "detail": "; ".join(checker.problems)}
    if scheme == "sqlite":
        return {
            "uri": shown,
            "kind": scheme,
            "ok": True,
            "detail": "the database's directory takes a new file",
        }
    return {"uri": shown, "kind": scheme, "ok": None, "detail": f"not probed ({scheme}: store)"}


def _health(uri: str, wait: float) -> tuple[bool, str]:
    """GET `<uri>/health` (MLflow's tracking server answers "OK"), credentials left out of
    the request: the endpoint needs none, and they must not reach a log."""
    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    context = None
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context = ssl._create_unverified_context()  # what MLflow's client does with it
    try:
        with urllib.request.urlopen(url, timeout=wait, context=context) as answer:
            return True, f"{url} answered {answer.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return True, f"{url} answered {exc.code} (the server wants credentials)"
        return False, f"{url} answered {exc.code} {exc.reason}: not an MLflow tracking server?"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return False, f"{url}: no answer within {wait:g} s ({reason})"


def store_status(remote: str | None, endpoint_url: str | None, wait: float = WAIT_SECONDS) -> dict:
    """`{uri, endpoint, ok, detail}` of `storage.remote`: its bucket answers a HEAD within
    `wait` seconds with the credentials and endpoint the runs get."""
    if not remote:
        return {
            "uri": None,
            "endpoint": None,
            "ok": None,
            "detail": "no remote store (local files)",
        }
    bucket, _ = split_s3(remote)
    try:
        client = s3_client(endpoint_url)
    except ImportError:
        return {
            "uri": remote,
            "endpoint": endpoint_url or endpoint_from_env(),
            "ok": False,
            "detail": "boto3 is not installed (`pip install '.[pipeline]'`)",
        }
    shown = client.meta.endpoint_url
    # The client retries for minutes (pipeline.storage); the doctor waits `wait` seconds. A
    # daemon thread: one still retrying does not keep the process from exiting.
    outcome = []

    def head():
        try:
            client.head_bucket(Bucket=bucket)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - botocore's errors, named in the report
            outcome.append(exc)

    thread = threading.Thread(target=head, name="head-bucket", daemon=True)
    thread.start()
    thread.join(wait)
    if not outcome:
        detail = f"no answer from {shown} within {wait:g} s"
        return {"uri": remote, "endpoint": shown, "ok": False, "detail": detail}
    if outcome[0] is not None:
        detail = _s3_error(outcome[0], bucket)
        return {"uri": remote, "endpoint": shown, "ok": False, "detail": detail}
    return {"uri": remote, "endpoint": shown, "ok": True, "detail": f"bucket {bucket!r} answers"}


def _s3_error(exc: Exception, bucket: str) -> str:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    if code in ("404", "NoSuchBucket"):
        return f"bucket {bucket!r} does not exist"
    if code in ("403", "AccessDenied"):
        return f"access to bucket {bucket!r} denied (credentials: AWS_* variables or a profile)"
    return redact(f"{type(exc).__name__}: {exc}")
