"""Places on this machine's GPUs, shared by every launcher on it.

A GPU takes `executor.local.runs_per_gpu` runs at a time, whichever launcher starts them: two
stages on one workstation (two `dvc exp run`s, DVC queue workers, a stage beside `python -m
pipeline tune`) never put more runs on one GPU between them than that (a launcher adds a run
to a GPU only while fewer than its own `runs_per_gpu` are on it, counting every launcher's).
Each place is a lock file, `<dir>/<gpu>.<slot>.lock` (dir: `$VSGD_GPU_PLACES`, default
`<tmp>/vsgd-gpu-places`, shared by every user: created sticky and world-writable like /tmp),
taken with the `filelock` library's native lock (`flock(2)`), as the run lock is
(`pipeline.runlock`): the kernel frees a place when its holders die, so a killed launcher
leaves no place taken.

The launcher hands the locked descriptor to the run's process (`pass_fds`): the place then
stays taken while the run lives, even past a launcher killed mid-run, and is given back when
the run has ended. A GPU is known by the name `CUDA_VISIBLE_DEVICES` gives it (an index, or a
UUID where the launcher's `CUDA_VISIBLE_DEVICES` lists UUIDs): launchers that name one GPU
differently (one by index, one by UUID; or with different `CUDA_DEVICE_ORDER`s) do not see
each other's places.
"""

import collections
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

PLACES_ENV = "VSGD_GPU_PLACES"
# How often a run waiting for a place looks again (another launcher's run may have ended)
# and whether the stage is stopping.
WAIT_POLL_SECONDS = 0.2


def places_dir() -> Path:
    """Where this machine's GPU places are: `$VSGD_GPU_PLACES`, else `<tmp>/vsgd-gpu-places`."""
    return Path(os.environ.get(PLACES_ENV) or Path(tempfile.gettempdir()) / "vsgd-gpu-places")


@dataclass
class Place:
    """A place taken on `gpu`; `fd` is its locked descriptor, for the run's process."""

    gpu: str
    fd: int
    lock: FileLock


class GpuPlaces:
    """Places on `gpus`, `per_gpu` on each: `take` gives a run a free place on the least
    loaded GPU, counting every launcher's runs (the first listed among equals), waiting for
    one in the order this launcher's runs asked; `give_back` frees it. Thread-safe."""

    def __init__(self, gpus: list[str], per_gpu: int, directory=None):
        self._gpus = list(gpus)
        self._per_gpu = per_gpu
        self._dir = Path(directory) if directory is not None else places_dir()
        self._waiting = collections.deque()
        self._changed = threading.Condition()
        _make_shared(self._dir)

    def take(self, cancel=lambda: False) -> Place | None:
        """A place, or None if `cancel()` turned true while waiting for one."""
        turn = object()
        with self._changed:
            self._waiting.append(turn)
            try:
                while not cancel():
                    if self._waiting[0] is turn and (place := self._free_place()):
                        return place
                    self._changed.wait(WAIT_POLL_SECONDS)
                return None
            finally:
                self._waiting.remove(turn)
                self._changed.notify_all()

    def give_back(self, place: Place) -> None:
        with self._changed:
            place.lock.release()
            self._changed.notify_all()

    def _free_place(self) -> Place | None:
        """A free place on the least loaded GPU with fewer than `per_gpu` runs on it, now
        taken; None if there is none."""
        load = {gpu: self._taken(gpu) for gpu in self._gpus}
        for gpu in sorted(self._gpus, key=load.get):  # stable: the first listed among equals
            if load[gpu] >= self._per_gpu:
                break
            for slot in range(self._per_gpu):
                place = self._try(gpu, slot)
                if place:
                    return place
        return None

    def _taken(self, gpu: str) -> int:
        """How many runs are on `gpu`, started by any launcher: its places taken, those of a
        launcher with more places per GPU included (each free one locked for an instant to
        tell)."""
        name = _file_name(gpu)
        slots = {
            int(m[1])
            for p in self._dir.glob(f"{name}.*.lock")
            if (m := re.fullmatch(rf"{re.escape(name)}\.(\d+)\.lock", p.name))
        }
        taken = 0
        for slot in slots | set(range(self._per_gpu)):
            place = self._try(gpu, slot)
            if place:
                place.lock.release()
            else:
                taken += 1
        return taken

    def _try(self, gpu: str, slot: int) -> Place | None:
        """The place `slot` of `gpu`, taken if free; None if another run holds it."""
        fds = []
        # A lock object per attempt, not per thread: a place belongs to the run it was
        # taken for, whatever thread gives it back.
        lock = FileLock(
            self._dir / f"{_file_name(gpu)}.{slot}.lock",
            mode=0o666,
            thread_local=False,
            preserve_lock_file=True,
            on_acquired=fds.append,
        )
        try:
            lock.acquire(blocking=False)
        except Timeout:
            return None
        return Place(gpu, fds[-1], lock)


def _file_name(gpu: str) -> str:
    """`gpu` (an index or a UUID) as the start of its places' file names."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", gpu)


def _make_shared(directory: Path) -> None:
    """The places' directory, usable by every user of the machine (sticky, world-writable,
    as /tmp is) when this process creates it."""
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        return
    os.chmod(directory, 0o1777)
