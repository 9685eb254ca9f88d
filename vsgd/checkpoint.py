"""Checkpoints: a training state <-> bytes, and where the bytes live.

The checkpoint store protocol (`CheckpointStore`; docs/ARCHITECTURE.md) keeps a run's newest
checkpoint and the one before it:

- `save(data)` publishes a new checkpoint only once it is complete, and keeps the previous
  one until then: a reader, or a process killed at any moment of a save, always finds a
  complete checkpoint (the new one or the previous), never a mix.
- `candidates()` lists what there is to resume from, newest first, as `Candidate`s whose
  `read()` returns the checkpoint's bytes or raises `Damaged` when they cannot be had as they
  were saved (the object a pointer names is missing, the bytes differ from their recorded
  sha256). Any other error (a store that cannot be reached, a disk error) propagates: it says
  nothing about the checkpoint, and the next try may succeed.
- `set_aside(candidate, reason)` moves a checkpoint that cannot be used out of the way, kept
  for inspection (never deleted), and returns where it went, so that it is never offered
  again and the next `save` does not keep it as the previous checkpoint.
- `load()` is the newest published checkpoint's bytes (None without one), as `save` left it:
  no fallback (tools, tests).

A run resumes through `newest_intact(store, required)`: the first candidate that reads and
decodes with every key the trainer needs; each one before it is set aside with a warning.
Damage is anything that keeps a checkpoint from being read back as saved: `Damaged` from
`read()`, a record of the archive whose CRC-32 differs from the one `torch.save` wrote (a
flipped bit in a tensor, which `torch.load` would load as another number without a word), any
exception of `torch.load(weights_only=True)` (truncated, zero bytes, garbage), a missing key.
An intact checkpoint of another run is not damage, and is returned: the trainer refuses it,
since it means the run was given another run's checkpoint location, and setting it aside
would hide that run's progress while both go on writing there.

`LocalCheckpointStore` keeps `checkpoint.pt` and `checkpoint.prev.pt` in a directory;
`pipeline.storage.S3CheckpointStore` content-addressed objects and a pointer in S3.
"""

import io
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .files import atomic_write, fsync_dir, set_aside

log = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


class Damaged(Exception):
    """A checkpoint cannot be read back as it was saved; the message says why."""


@dataclass(frozen=True)
class Candidate:
    """A checkpoint a store offers to resume from. `where`: its path or URI, for messages;
    `read()`: its bytes, or `Damaged`; `ref`: what the store itself knows it by."""

    where: str
    read: Callable[[], bytes]
    ref: Any = None


class CheckpointStore(Protocol):
    def load(self) -> bytes | None: ...

    def save(self, data: bytes) -> None: ...

    def candidates(self) -> list[Candidate]: ...

    def set_aside(self, candidate: Candidate, reason: str) -> str | None: ...


class LocalCheckpointStore:
    """`<dir>/checkpoint.pt` (the newest) and `<dir>/checkpoint.prev.pt` (the one before).

    `save` first gives the current checkpoint.pt its second name, checkpoint.prev.pt (a hard
    link renamed over the old previous one; a copy where the file system has no hard links),
    then replaces checkpoint.pt atomically: temp file in the same directory, fsync, rename
    over it, fsync the directory (so the rename survives a power cut). checkpoint.pt is
    complete at every instant, and so is the previous one. A damaged file is set aside as
    `<name>.damaged-<UTC timestamp>`."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.path = self.dir / FILENAME
        self.previous = self.dir / PREVIOUS

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._keep_as_previous()
        atomic_write(self.path, data)
        fsync_dir(self.dir)

    def _keep_as_previous(self) -> None:
        # One name: a run's checkpoints have one writer, and one killed here leaves no more
        # than this link behind, removed by the next save.
        tmp = self.dir / f".{PREVIOUS}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(self.path, tmp)
            except OSError:  # no hard links here (some network and FUSE file systems)
                atomic_write(self.previous, self.path.read_bytes())
                return
            os.replace(tmp, self.previous)
        finally:
            tmp.unlink(missing_ok=True)

    def candidates(self) -> list[Candidate]:
        return [
            Candidate(str(path), _reader(path), path)
            for path in (self.path, self.previous)
            if path.exists()
        ]

    def set_aside(self, candidate: Candidate, reason: str) -> str | None:
        try:
            return str(set_aside(candidate.ref))
        except FileNotFoundError:  # gone since it was listed: nothing to keep
            return None

    def __repr__(self):
        return f"LocalCheckpointStore({str(self.dir)!r})"


def _reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise Damaged(f"{path} disappeared") from exc

    return read


def newest_intact(store, required=()) -> tuple[dict, Candidate] | None:
    """The newest checkpoint of `store` that reads and decodes with every key in `required`,
    and its candidate; None if there is none. Those before it are set aside, each with a
    warning: the caller resumes from an older checkpoint (or from the start), which ends
    the same, only later."""
    damaged = False
    for candidate in store.candidates():
        try:
            return decode(candidate.read(), required), candidate
        except Damaged as exc:
            damaged = True
            kept = store.set_aside(candidate, str(exc))
            log.warning(
                "checkpoint %s cannot be used (%s); set aside as %s",
                candidate.where,
                exc,
                kept or "(nothing left to keep)",
            )
    if damaged:
        log.warning("no intact checkpoint left in %r: the run starts from step 0", store)
    return None


def decode(data: bytes, required=()) -> dict:
    """`from_bytes(data)`, its bytes checked to be those saved and the state to be a dict with
    every key in `required`; `Damaged` for anything else."""
    _check_records(data)
    try:
        state = from_bytes(data)
    except Exception as exc:  # noqa: BLE001 - whatever torch.load raises on non-checkpoints
        text = str(exc).strip().splitlines()
        raise Damaged(
            f"unreadable ({len(data)} bytes): {type(exc).__name__}{': ' + text[0] if text else ''}"
        ) from exc
    if not isinstance(state, dict):
        raise Damaged(f"holds a {type(state).__name__}, not a checkpoint")
    missing = [key for key in required if key not in state]
    if missing:
        raise Damaged(f"lacks {', '.join(missing)}")
    return state


def _check_records(data: bytes) -> None:
    """Every record of the archive `torch.save` writes carries the CRC-32 of its bytes, which
    `torch.load` does not check; zipfile does (0.04 s for a 120 MB checkpoint, measured)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            changed = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise Damaged(f"unreadable ({len(data)} bytes): not a whole archive: {exc}") from exc
    if changed is not None:
        raise Damaged(f"record {changed} differs from the CRC-32 it was saved with")


def to_bytes(state: dict) -> bytes:
    """Serialise a checkpoint dict (tensors, state dicts, lists, numbers, strings)."""
    # torch is imported here, not with the module: the object-store side of the protocol
    # (pipeline.storage) uses this module from stages that never load torch.
    import torch

    writes_crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)  # what `decode` checks the bytes against
    try:
        buf = io.BytesIO()
        torch.save(state, buf)
    finally:
        torch.serialization.set_crc32_options(writes_crc)
    return buf.getvalue()


def from_bytes(data: bytes) -> dict:
    """The inverse of `to_bytes`, onto the CPU; `weights_only` loading never runs code from
    the file, so a checkpoint from a shared bucket cannot execute anything."""
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
