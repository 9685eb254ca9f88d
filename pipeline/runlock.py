"""One launcher per run on this machine: the run lock.

A run is trained by one process at a time, whoever starts it: two stages on one workspace, a
stage and `python -m pipeline.train`, or `gc` looking at its files. Every one of them takes
the run's lock, `<store>/.locks/<run_hash>.lock` beside the run's `output_dir`, before it
writes anything of the run (its spec, its log, its checkpoint, its MLflow run) and holds it
until it is done with the run.

The lock is the `filelock` library's native lock (`flock(2)` on Linux): the kernel releases it
when its holder dies, so a killed launcher never leaves a stale lock behind, and there is no
age-based expiry that could let a second launcher in beside a slow live one. The lock file
holds a line naming its holder (pid, host, since when), for the messages of whoever waits.

The local executor takes the lock in its own process, before it opens the run's log, and
hands the locked descriptor to the run's process (`LOCK_FD_ENV`, `pass_fds`): both then hold
the same open file description, so the lock lasts as long as either lives (an executor killed
mid-run leaves its run holding it while it saves its checkpoint and stops). Runs on other
machines sharing a remote store are kept apart by the remote lease (`pipeline.lease`).
"""

import datetime
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout, lock_descriptor

from .contract import LOCK_FD_ENV

LOCKS_DIR = ".locks"  # inside the result store: gc skips dot-entries
POLL_SECONDS = 1.0


def lock_path(output_dir, run_hash: str) -> Path:
    """The lock of the run whose results go to `output_dir` (`<store>/<run_hash>` in the
    pipeline): one per run hash in the store that holds them."""
    return Path(output_dir).parent / LOCKS_DIR / f"{run_hash}.lock"


class RunLock:
    """The lock of one run. `try_acquire` makes one attempt; `acquire` waits, until
    `cancel()` says to stop waiting; `holder()` says who has it."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = None  # the locked descriptor while held (borrowed from filelock)
        # thread_local=False: a launcher's worker threads each hold their own RunLock.
        self._lock = FileLock(
            self.path, thread_local=False, preserve_lock_file=True, on_acquired=self._record_holder
        )

    @classmethod
    def of(cls, spec: dict) -> "RunLock":
        return cls(lock_path(spec["output_dir"], spec["run_hash"]))

    def try_acquire(self) -> bool:
        try:
            self._lock.acquire(blocking=False)
        except Timeout:
            return False
        return True

    def acquire(self, cancel=None) -> bool:
        """Wait for the lock; False when `cancel()` turned true first."""
        try:
            self._lock.acquire(timeout=-1, poll_interval=POLL_SECONDS, cancel_check=cancel)
        except Timeout:
            return False
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
        self.fd = None

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ('another process' if unreadable)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        return text or "another process"

    def _record_holder(self, fd: int) -> None:
        self.fd = fd
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def inherited(spec: dict) -> bool:
    """This process holds the run's lock through a descriptor its launcher passed on
    (`LOCK_FD_ENV`): the descriptor is open, is this run's lock file, and locking it again
    succeeds at once (it is the launcher's own open file description). False otherwise: the
    process must then take the lock itself."""
    value = os.environ.get(LOCK_FD_ENV)
    if not value or not value.isdigit():
        return False
    fd = int(value)
    path = lock_path(spec["output_dir"], spec["run_hash"])
    try:
        mine, theirs = os.fstat(fd), os.stat(path)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            return False
        return lock_descriptor(fd, blocking=False)
    except OSError:
        return False
