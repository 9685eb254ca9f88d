"""Bytes that must be exact: atomic file writes, canonical JSON and the digests taken of them,
the per-process memory of files already hashed, and the one way of setting aside a file
that cannot be used.

Every checksum in the project (a prepared dataset's, a run's identity, an uploaded object's) is
taken through these helpers, so two places can never disagree on how a value is spelled.
"""

import datetime
import hashlib
import json
import os
import tempfile
from pathlib import Path

CHUNK = 4 * 1024 * 1024


def atomic_write(path, data: bytes | str) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one:
    a temp file beside it, fsynced, then renamed over it."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def canonical_json(obj) -> str:
    """One spelling per value: sorted keys, no whitespace, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def json_sha256(obj) -> str:
    """sha256 (hex) of `canonical_json(obj)`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_digest(path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# sha256 of the files this process has hashed, by `file_identity`: a file read again by the
# same process (the timing stage builds many runs from one dataset; a pod stages its data and
# then loads it) is not hashed again, while one rewritten or replaced in between is.
_SHA256_BY_IDENTITY: dict[tuple, str] = {}


def file_identity(stat: os.stat_result) -> tuple:
    """What identifies a file's bytes without reading them: device, inode, size and
    modification time (ns) of its `os.stat`/`os.fstat`. Writing to the file changes its
    mtime, replacing it its inode; renaming it (staging publishes a directory by a rename)
    changes neither and keeps the bytes, so the path is not part of it."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def hashed_before(identity: tuple) -> str | None:
    """The sha256 this process computed of the file with `identity`, if it did."""
    return _SHA256_BY_IDENTITY.get(identity)


def note_hashed(identity: tuple, digest: str) -> None:
    """Remember `digest` as the sha256 of the file with `identity` (its bytes were hashed
    while it had that identity from start to end)."""
    _SHA256_BY_IDENTITY[identity] = digest


def file_sha256_once(path) -> str:
    """`file_digest(path)` (sha256), computed once per process while the file keeps its
    `file_identity`."""
    identity = file_identity(os.stat(path))
    known = hashed_before(identity)
    if known is not None:
        return known
    digest = file_digest(path)
    if file_identity(os.stat(path)) == identity:  # else it changed while it was read
        note_hashed(identity, digest)
    return digest


def fsync_dir(directory) -> None:
    """Make the renames and new names in `directory` durable (they survive a power cut)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utc_stamp() -> str:
    """Now in UTC, e.g. `20250131T235959.123456Z`: sorts by time, and needs no escaping in
    a file name or an object key."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def set_aside(path, label: str = "damaged") -> Path:
    """Rename `path` (a file or a directory) to `<path>.<label>-<UTC timestamp>` beside it
    and return the new path. What cannot be used is kept for inspection, never deleted: the
    rename never replaces an existing name, and it is made durable."""
    path = Path(path)
    while True:
        dest = path.with_name(f"{path.name}.{label}-{utc_stamp()}")
        if not dest.exists():
            break
    os.rename(path, dest)
    fsync_dir(path.parent)
    return dest
