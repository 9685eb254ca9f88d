"""Checkpoints in an object store (`S3CheckpointStore`, vsgd.checkpoint's protocol): uploaded
whole, verified, then published by a small pointer object; and the store of a spec's
`checkpoint` (`open_checkpoint_store`).
"""

import functools
import hashlib
import json
import logging
import re

from vsgd.checkpoint import Candidate, Damaged, LocalCheckpointStore
from vsgd.files import utc_stamp

from .objects import IntegrityError, S3Store, open_store, transfer_config, verify_digest

log = logging.getLogger(__name__)


class S3CheckpointStore:
    """The checkpoint-store protocol (vsgd.checkpoint) over an object store.

    `save` uploads `checkpoint-<sha256>.pt` (complete: a PUT or a completed multipart upload
    is all or nothing), checks its size and hash in the store, then publishes it by replacing
    the small pointer object `LATEST.json`: `{key, sha256, size, previous}`, where `previous`
    names the checkpoint it replaces (`{key, sha256, size}` or null). A reader (or a process
    killed at any moment) sees the previous checkpoint or the new one. The previous object is
    kept, for a reader that read the old pointer a moment ago and to resume from when the
    newest turns out damaged; older ones are deleted.

    `candidates()`: the pointer's checkpoint, its previous one, then any other
    `checkpoint-<sha256>.pt` (a pointer that names no previous one, or none left), each read
    and checked against its sha256 (`vsgd.checkpoint.Damaged` when it differs or the object
    is missing). `set_aside` copies a damaged object as it is to
    `damaged/<key>.<UTC timestamp>` and removes it from where it was (S3 has no rename: a
    move), then takes it out of the pointer, which then names the one before it. `load()`
    is the pointer's checkpoint, verified (`IntegrityError`), with no fallback.
    """

    POINTER = "LATEST.json"
    DAMAGED = "damaged"  # prefix of what set_aside keeps
    KEY = re.compile(r"checkpoint-([0-9a-f]{64})\.pt")

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.uri = uri.rstrip("/")
        self.store = open_store(uri, endpoint_url)

    def _pointer(self) -> dict | None:
        raw = self.store.get_bytes(self.POINTER)
        return json.loads(raw) if raw is not None else None

    def load(self) -> bytes | None:
        pointer = self._pointer()
        if pointer is None:
            return None
        data = self.store.get_bytes(pointer["key"])
        if data is None:
            raise IntegrityError(
                f"{self.uri}/{self.POINTER} names {pointer['key']}, which does not exist"
            )
        verify_digest(
            f"{self.uri}/{pointer['key']}", pointer["sha256"], hashlib.sha256(data).hexdigest()
        )
        return data

    def save(self, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        key = f"checkpoint-{digest}.pt"
        self.store.put_bytes(key, data)
        info = self.store.head(key)
        if info is None or info["size"] != len(data) or info["sha256"] not in (None, digest):
            raise IntegrityError(
                f"{self.uri}/{key}: the store holds {info} after the upload "
                f"of {len(data)} bytes with sha256 {digest}; not published"
            )
        try:
            current, before = self._entries(self._pointer())
        except (ValueError, IntegrityError):  # a damaged pointer names nothing worth keeping
            current = before = None
        # Saving the same bytes again keeps the checkpoint before them as the previous one.
        previous = before if current is not None and current["key"] == key else current
        self._publish({"key": key, "sha256": digest, "size": len(data)}, previous)
        keep = {key, previous["key"] if previous else None}
        for old in self.store.list_keys("checkpoint-"):
            if old not in keep:
                self.store.delete(old)

    def _publish(self, entry: dict | None, previous: dict | None) -> None:
        """Point LATEST.json at `entry`, with `previous` as the one before it."""
        if entry is None:  # nothing left to name
            self.store.delete(self.POINTER)
            return
        self.store.put_bytes(self.POINTER, json.dumps({**entry, "previous": previous}).encode())

    def _entries(self, pointer) -> tuple[dict | None, dict | None]:
        """The pointer's checkpoint and the one before it, `{key, sha256, size}` or None;
        ValueError for a pointer that is not one."""
        if pointer is None:
            return None, None
        if not isinstance(pointer, dict):
            raise ValueError(f"{self.POINTER} is not a checkpoint pointer: {pointer!r}")
        previous = pointer.get("previous")  # pointers of older versions have none
        return self._entry(pointer), None if previous is None else self._entry(previous)

    def _entry(self, entry) -> dict:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("key"), str)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise ValueError(f"{self.POINTER} does not name a checkpoint: {entry!r}")
        return {k: entry.get(k) for k in ("key", "sha256", "size")}

    def candidates(self) -> list[Candidate]:
        out = []
        try:
            named = [e for e in self._entries(self._pointer()) if e is not None]
        except (ValueError, IntegrityError) as exc:
            named = []
            out.append(
                Candidate(
                    f"{self.uri}/{self.POINTER}",
                    functools.partial(_damaged, str(exc)),
                    self.POINTER,
                )
            )
        keys = {e["key"] for e in named}
        for key in self.store.list_keys("checkpoint-"):
            match = self.KEY.fullmatch(key)
            if match and key not in keys:  # content-addressed: the name holds the sha256
                named.append({"key": key, "sha256": match[1], "size": None})
                keys.add(key)
        seen = set()
        for entry in named:
            if entry["key"] not in seen:
                seen.add(entry["key"])
                out.append(
                    Candidate(
                        f"{self.uri}/{entry['key']}", functools.partial(self._read, entry), entry
                    )
                )
        return out

    def _read(self, entry: dict) -> bytes:
        where = f"{self.uri}/{entry['key']}"
        try:
            data = self.store.get_bytes(entry["key"])
        except IntegrityError as exc:  # differs from the sha256 stored with it
            raise Damaged(str(exc)) from exc
        if data is None:
            raise Damaged(f"{where} does not exist")
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry["sha256"]:
            raise Damaged(
                f"{where}: content hash {actual} differs from its recorded {entry['sha256']}"
            )
        return data

    def set_aside(self, candidate: Candidate, reason: str) -> str | None:
        key = self.POINTER if candidate.ref == self.POINTER else candidate.ref["key"]
        dest = f"{self.DAMAGED}/{key}.{utc_stamp()}"
        kept = self._move(key, dest)
        if key == self.POINTER:
            return kept
        try:
            current, previous = self._entries(self._pointer())
        except (ValueError, IntegrityError):
            return kept  # a damaged pointer is a candidate of its own, set aside in its turn
        if current is not None and current["key"] == key:
            self._publish(previous, None)
        elif previous is not None and previous["key"] == key:
            self._publish(current, None)
        return kept

    def _move(self, key: str, dest: str) -> str | None:
        """Copy object `key` as it is (`get_bytes` would refuse one that no longer matches
        its sha256) to `dest`, then delete `key`; the copy's URI, None if `key` is gone."""
        if not self.store.exists(key):
            return None
        if isinstance(self.store, S3Store):
            self.store.client.copy(
                {"Bucket": self.store.bucket, "Key": self.store._key(key)},
                self.store.bucket,
                self.store._key(dest),
                Config=transfer_config(),
            )
        else:
            self.store.put_file(dest, self.store._path(key))
        self.store.delete(key)
        return f"{self.store.uri}/{dest}"

    def __repr__(self):
        return f"S3CheckpointStore({self.uri!r})"


def _damaged(reason: str) -> bytes:
    raise Damaged(reason)


def open_checkpoint_store(uri: str, endpoint_url: str | None = None):
    """A run spec's `checkpoint`: an `s3://` URI or a local directory."""
    if uri.startswith("s3://"):
        return S3CheckpointStore(uri, endpoint_url)
    return LocalCheckpointStore(uri)
