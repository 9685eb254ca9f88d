"""One launcher per run across machines: a lease in the remote store.

Machines that share `storage.remote` (two workstations, a workstation and a cluster, two
pipelines' Jobs in one bucket) share no lock; what keeps them from training one run twice is
a lease object beside the run's remote result, `<remote>/results/<run_hash>/LEASE.json`,
taken by the run's own process (`pipeline.train`) before it trains.

It is built on S3's conditional writes, which every write of it uses, so two writers can never
both believe they hold it:
- take: `PutObject` with `If-None-Match: *` succeeds for one writer only (412 for the rest);
- renew: every `LEASE_SECONDS / 4`, `PutObject` with `If-Match: <our ETag>`; a 412 means
  another launcher took the lease over (ours had expired), and the run stops (`on_lost`);
- take over an expired lease: `PutObject` with `If-Match: <the expired lease's ETag>`, so of
  two waiters only one wins;
- release: `DeleteObject` with `If-Match: <our ETag>`, never deleting a successor's lease.
(https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html and
https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-deletes.html; MinIO,
Ceph RGW and moto implement the same headers.)

Expiry is judged on the store's clock alone: a lease is expired when the store's `Date` of a
read is more than its holder's lease time (`LEASE_SECONDS`, recorded in the lease) past the
object's `Last-Modified`, so machines whose clocks disagree still agree on it. A machine that
dies loses its lease after `LEASE_SECONDS`, and the run then resumes elsewhere from its
checkpoint in the same store. A holder on this very machine whose process is gone (killed,
crashed: the lease names its host, boot, pid and the pid's start time) is known to be gone at
once, and its lease is taken over without waiting for it to expire.
"""

import email.utils
import json
import logging
import os
import socket
import threading
import time
import uuid

from .storage import endpoint_from_env, s3_client, split_s3

log = logging.getLogger(__name__)

LEASE_NAME = "LEASE.json"
# How long a lease outlives its last renewal. Long enough for a stalled store or a busy
# machine to renew in time; short enough that a dead machine's run resumes elsewhere soon.
# VSGD_LEASE_SECONDS overrides it (tests; stores with slow renewals).
LEASE_SECONDS = float(os.environ.get("VSGD_LEASE_SECONDS", "120"))
WAIT_POLL_SECONDS = min(30.0, LEASE_SECONDS / 4)


class Lease:
    """The lease of the run whose remote results go to `results_uri` (s3://...)."""

    def __init__(self, results_uri: str, endpoint_url: str | None = None):
        self.uri = f"{results_uri.rstrip('/')}/{LEASE_NAME}"
        self.bucket, self.key = split_s3(self.uri)
        # The endpoint resolved here, not inside the cached client: it is the cache's key.
        self.client = s3_client(endpoint_url or endpoint_from_env())
        self.token = uuid.uuid4().hex
        self.owner = f"pid {os.getpid()} on {socket.gethostname()}"
        self.process = this_process()
        self.etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- taking it ---------------------------------------------------------------------------

    def try_acquire(self) -> str | None:
        """Take the lease if it is free or expired: None when taken, else who holds it."""
        from botocore.exceptions import ClientError

        try:
            self.etag = self._put(IfNoneMatch="*")
            return None
        except ClientError as exc:
            if not _precondition_failed(exc):
                raise
        current = self.read()
        if current is None:  # released in between: try again at once
            return self.try_acquire()
        body, etag, age = current
        if body.get("token") == self.token:  # our own write, retried by botocore after a
            self.etag = etag  # lost response
            return None
        gone = _holder_is_gone(body)
        if age <= _lifetime(body) and not gone:
            return f"{body.get('owner', 'another launcher')} (renewed {age:.0f} s ago)"
        try:
            self.etag = self._put(IfMatch=etag)
        except ClientError as exc:
            if not _precondition_failed(exc):
                raise
            return "another launcher, which took the expired lease over a moment ago"
        log.warning(
            "took over the lease of %s (%s, last renewed %.0f s ago): %s",
            self.uri,
            body.get("owner"),
            age,
            "its process is gone" if gone else "expired",
        )
        return None

    def acquire(self, on_wait=None, cancel=None) -> bool:
        """Wait until the lease is ours (`on_wait(holder)` once, when another launcher holds
        it); False if `cancel()` turned true first. Then keep it renewed in the background:
        `on_lost()` is called (from that thread) if it is ever lost."""
        told = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return True
            if not told and on_wait is not None:
                on_wait(holder)
                told = True
            if cancel is not None and cancel():
                return False
            time.sleep(WAIT_POLL_SECONDS)

    def keep(self, on_lost) -> None:
        """Renew the lease every quarter of its life until `release`."""

        def renew():
            while not self._stop.wait(LEASE_SECONDS / 4):
                try:
                    self.etag = self._put(IfMatch=self.etag)
                except Exception as exc:  # noqa: BLE001 - decided below
                    if _is_client_error(exc) and _precondition_failed(exc):
                        log.error("lost the lease %s to another launcher", self.uri)
                        on_lost()
                        return
                    # A store outage: keep trying; the lease lasts LEASE_SECONDS.
                    log.warning("could not renew the lease %s (%s); retrying", self.uri, exc)

        self._renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Give the lease up (only if it is still ours)."""
        self._stop.set()
        if self.etag is None:
            return
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as exc:
            if not _precondition_failed(exc) and not _missing(exc):
                raise
        self.etag = None

    # -- reading it --------------------------------------------------------------------------

    def read(self) -> tuple[dict, str, float] | None:
        """(its body, ETag, seconds since its last write by the store's clock), or None."""
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        try:
            body = json.loads(r["Body"].read())
        except ValueError:
            body = {}
        now = email.utils.parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
        return body, r["ETag"], (now - r["LastModified"]).total_seconds()

    def _put(self, **condition) -> str:
        body = json.dumps(
            {
                "owner": self.owner,
                "token": self.token,
                "lease_seconds": LEASE_SECONDS,
                "process": self.process,
            }
        ).encode()
        return self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=body, ContentType="application/json", **condition
        )["ETag"]


def holder(results_uri: str, endpoint_url: str | None = None) -> str | None:
    """Who holds the live lease of a remote result, or None (no lease, or expired)."""
    current = Lease(results_uri, endpoint_url).read()
    if current is None or current[2] > _lifetime(current[0]):
        return None
    return current[0].get("owner", "another launcher")


def _lifetime(body: dict) -> float:
    """How long the lease lasts after its last renewal: what its holder said it renews
    within (holders may be configured differently), else ours."""
    value = body.get("lease_seconds")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9:
        return float(value)
    return LEASE_SECONDS


def _is_client_error(exc) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError)


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _precondition_failed(exc) -> bool:
    # 412 PreconditionFailed; 409 ConditionalRequestConflict when two conditional writes
    # race on one key (S3 asks to retry: the retry then sees the winner's object).
    return _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _missing(exc) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound")


def this_process() -> dict:
    """What tells this process apart from any other, ever, on this machine: the host (with
    its PID namespace: containers may share a hostname), the boot, the pid and the pid's
    start time (a pid is reused; pid and start time together are not)."""
    return {
        "host": _host(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
    }


def _holder_is_gone(body: dict) -> bool:
    """The lease's holder ran on this machine, in this boot, and its process has ended
    (False whenever that cannot be proved: another machine, no /proc)."""
    holder, here = body.get("process"), this_process()
    if not isinstance(holder, dict) or here["boot"] is None or here["start"] is None:
        return False
    if (holder.get("host"), holder.get("boot")) != (here["host"], here["boot"]):
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    return _start_time(pid) != holder.get("start")  # None: no such process any more


def _host() -> str:
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/pidns:{namespace}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat, field 22)."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat.rsplit(")", 1)[1].split()[19]) if stat else None
    except (IndexError, ValueError):
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
