"""Checkpoints: a training state <-> bytes, and where the bytes live.

A checkpoint store is anything with `load() -> bytes | None` and `save(data: bytes)`, where
`save` publishes the new checkpoint only once it is complete (a reader, or a process killed
mid-save, sees the previous checkpoint or the new one, never a mix). `LocalCheckpointStore`
keeps one file in a directory; `pipeline.storage.S3CheckpointStore` keeps one object in S3.
"""

import io
import os
from pathlib import Path
from typing import Protocol

import torch

from .files import atomic_write

FILENAME = "checkpoint.pt"


class CheckpointStore(Protocol):
    def load(self) -> bytes | None: ...

    def save(self, data: bytes) -> None: ...


class LocalCheckpointStore:
    """`<dir>/checkpoint.pt`, replaced atomically: temp file in the same directory, fsync,
    rename over the old one, fsync the directory (so the rename survives a power cut)."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.path = self.dir / FILENAME

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def __repr__(self):
        return f"LocalCheckpointStore({str(self.dir)!r})"


def to_bytes(state: dict) -> bytes:
    """Serialise a checkpoint dict (tensors, state dicts, lists, numbers, strings)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> dict:
    """The inverse of `to_bytes`, onto the CPU; `weights_only` loading never runs code from
    the file, so a checkpoint from a shared bucket cannot execute anything."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
