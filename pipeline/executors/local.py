"""Run specs as `python -m pipeline.train --spec <file>` subprocesses on this machine.

Up to `max_parallel` at a time. Every output line of a run is echoed with its name as prefix
and kept in `<output_dir>/train.log`; a failed run does not stop the others. Parallel runs
share the CPU cores: each gets `cores // max_parallel` threads (OMP_NUM_THREADS, unless set),
so that they do not oversubscribe the cores (which slows CPU training down severalfold).
With a remote store in params.yaml, each run also gets `pipeline.storage.run_env`: where to
publish its result (so that any machine finds it by run hash) and the S3 endpoint.

Stopping (Ctrl-C, SIGTERM, or under DVC the death of `dvc repro`, which does not pass its
SIGTERM on): nothing new starts, every run gets one SIGTERM, saves a checkpoint at the step it
reached and exits; the executor waits up to GRACE_SECONDS for them before SIGKILL. The runs
have their own process group, so a terminal's Ctrl-C reaches them only through the executor:
a second signal would make a run stop at once, without its checkpoint. Further signals while
stopping are ignored (the grace period bounds the wait). A run stops by itself too when the
executor dies (`pipeline.contract.STOP_WITH_LAUNCHER_ENV`).

One launcher per run: the executor takes a run's lock (`pipeline.runlock`) before it writes
the run's spec or log and passes it on to the run's process, so a second stage on the same
workspace (or `python -m pipeline.train` started by hand) never trains it at the same time,
never writes into its log, and waits for it instead; it starts the run only if the other
launcher stopped before finishing it.
"""

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .. import results
from ..contract import (
    EXIT_CODES,
    LOCK_FD_ENV,
    LOG_NAME,
    RUN_MODULE,
    STOP_WITH_LAUNCHER_ENV,
    STOPPED_CODES,
    TEE_LOG_ENV,
    signal_main_thread,
    watch_launcher,
)
from ..runlock import RunLock
from .base import Executor, RunOutcome, spec_path, write_spec

TAIL_LINES = 30
# How long a stopped run may take to save its checkpoint and exit before it is killed: the
# Job template's terminationGracePeriodSeconds (pipeline/templates/job-template.yaml), the
# same budget a run has in a pod.
GRACE_SECONDS = 120


class LocalExecutor(Executor):
    def __init__(self, max_parallel: int = 1, command=None, out=None, run_env=None):
        self.max_parallel = max(1, int(max_parallel))
        # spec -> extra environment variables of its process (they win over ours).
        self.run_env = run_env or (lambda spec: {})
        # The single-run CLI; `--spec <file>` is appended. Tests substitute a stand-in.
        self.command = list(command or [sys.executable, "-m", RUN_MODULE])
        self.out = out or sys.stdout
        self._lock = threading.Lock()
        self._procs = set()
        self._stopping = threading.Event()

    def run(self, specs: list[dict]) -> list[RunOutcome]:
        if not specs:
            return []
        pool = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="run")
        previous = self._install_handlers()
        if previous and os.environ.get("DVC_STAGE"):
            # `dvc repro` dies of a SIGTERM without passing it on: stop as if we had it.
            watch_launcher(self._launcher_died)
        try:
            # map keeps the input order of the outcomes.
            return list(pool.map(self._run_one, specs))
        except BaseException:
            # Ctrl-C or a kill of the stage: start nothing new and stop the children, their
            # checkpoints make the next run resume.
            self._stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self._terminate_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _install_handlers(self) -> dict:
        """SIGINT and SIGTERM raise (KeyboardInterrupt, SystemExit(128 + signal)) once, so
        that `run` stops the children; the previous handlers, {} off the main thread (where
        handlers cannot be set)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }

    def _on_signal(self, signum, frame):
        if self._stopping.is_set():
            return  # stopping already: the runs have their SIGTERM and GRACE_SECONDS
        self._stopping.set()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _launcher_died(self):
        # Through the main thread's handler, which ignores it if a signal came first.
        signal_main_thread(signal.SIGTERM)

    def _run_one(self, spec: dict) -> RunOutcome:
        """The run, holding its run lock from before its log is opened until its process
        has ended (`pipeline.runlock`); a run another launcher holds is waited for, and only
        trained here if that launcher stopped without finishing it."""
        name = spec["name"]
        lock = RunLock.of(spec)
        if not lock.try_acquire():
            self._say(f"[{name}] waiting: another launcher is training it ({lock.holder()})")
            if not lock.acquire(cancel=self._stopping.is_set):
                return RunOutcome(name, spec["run_hash"], ok=False, error="not started")
        with lock:
            if results.is_done(spec):
                self._say(f"[{name}] finished by another launcher: {spec['output_dir']}")
                return RunOutcome(name, spec["run_hash"], ok=True)
            write_spec(spec)
            return self._start(spec, lock)

    def _start(self, spec: dict, lock: RunLock) -> RunOutcome:
        name = spec["name"]
        tail = collections.deque(maxlen=TAIL_LINES)
        cmd = self.command + ["--spec", str(spec_path(spec))]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            **self.run_env(spec),
            STOP_WITH_LAUNCHER_ENV: "1",
            LOCK_FD_ENV: str(lock.fd),
        }
        env.pop(TEE_LOG_ENV, None)  # we keep the run's log ourselves, in the same file
        env.setdefault("OMP_NUM_THREADS", str(self.threads_per_run()))
        log_path = spec_path(spec).parent / LOG_NAME
        with open(log_path, "a", encoding="utf-8") as log:
            with self._lock:
                if self._stopping.is_set():
                    return RunOutcome(name, spec["run_hash"], ok=False, error="not started")
                # Its own process group: see the module docstring. The run inherits the
                # locked descriptor, so the lock outlives us if we die before it.
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    bufsize=1,
                    env=env,
                    process_group=0,
                    pass_fds=(lock.fd,),
                )
                self._procs.add(proc)
            self._say(f"[{name}] start")
            try:
                for line in proc.stdout:
                    # tqdm redraws with \r; the last state of a line is what matters here.
                    line = line.rstrip("\n").rsplit("\r", 1)[-1]
                    log.write(line + "\n")
                    tail.append(line)
                    self._say(f"[{name}] {line}")
                code = proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)
        if code == 0:
            self._say(f"[{name}] done")
            return RunOutcome(name, spec["run_hash"], ok=True)
        if code < 0:
            error = f"killed by signal {signal.Signals(-code).name}"
        else:
            # Named where the code says more than "failed" or "stopped" (reported apart).
            meaning = EXIT_CODES.get(code) if code not in (1, *STOPPED_CODES) else None
            error = f"exit code {code}" + (f" ({meaning})" if meaning else "")
        # Stopped by us or by a signal of its own (a `kill` of the run): not a failure of the
        # run; the stage says which runs finished anyway.
        stopped = self._stopping.is_set() or code in STOPPED_CODES
        self._say(f"[{name}] {'stopped' if stopped else 'FAILED'}: {error}")
        return RunOutcome(name, spec["run_hash"], ok=False, error=error, log_tail="\n".join(tail))

    def threads_per_run(self) -> int:
        return max(1, _cpu_count() // self.max_parallel)

    def _say(self, text: str):
        with self._lock:
            print(text, file=self.out, flush=True)

    def _terminate_all(self):
        """One SIGTERM to every run, then up to GRACE_SECONDS (in all) for them to save
        their checkpoints and exit; SIGKILL for any still running after that."""
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _cpu_count() -> int:
    """Cores this process may run on (its affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
