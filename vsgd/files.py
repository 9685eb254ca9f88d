"""Bytes that must be exact: atomic file writes, canonical JSON and the digests taken of them.

Every checksum in the project (a prepared dataset's, a run's identity, an uploaded object's) is
taken through these helpers, so two places can never disagree on how a value is spelled.
"""

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
