"""Run specs as `python -m pipeline.train --spec <file>` subprocesses on this machine.

Up to `max_parallel` at a time. Every output line of a run is echoed with its name as prefix
and kept in `<output_dir>/train.log`; a failed run does not stop the others. Parallel runs
share the CPU cores: each gets `cores // max_parallel` threads (OMP_NUM_THREADS, unless set),
so that they do not oversubscribe the cores (which slows CPU training down severalfold).
With a remote store in params.yaml, each run also gets `pipeline.storage.run_env`: where to
publish its result (so that any machine finds it by run hash) and the S3 endpoint.
"""

import collections
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from . import RunOutcome, spec_path, write_spec

LOG_NAME = "train.log"
TAIL_LINES = 30
EXIT_MEANING = {78: "invalid configuration"}


class LocalExecutor:
    def __init__(self, max_parallel: int = 1, command=None, out=None, run_env=None):
        self.max_parallel = max(1, int(max_parallel))
        # spec -> extra environment variables of its process (they win over ours).
        self.run_env = run_env or (lambda spec: {})
        # The single-run CLI; `--spec <file>` is appended. Tests substitute a stand-in.
        self.command = list(command or [sys.executable, "-m", "pipeline.train"])
        self.out = out or sys.stdout
        self._lock = threading.Lock()
        self._procs = set()
        self._stopping = threading.Event()

    def run(self, specs: list[dict]) -> list[RunOutcome]:
        if not specs:
            return []
        for spec in specs:
            if not spec_path(spec).exists():
                write_spec(spec)
        pool = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="run")
        previous = _raise_on_sigterm()
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
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _run_one(self, spec: dict) -> RunOutcome:
        name = spec["name"]
        tail = collections.deque(maxlen=TAIL_LINES)
        cmd = self.command + ["--spec", str(spec_path(spec))]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.run_env(spec)}
        env.setdefault("OMP_NUM_THREADS", str(self.threads_per_run()))
        log_path = spec_path(spec).parent / LOG_NAME
        with open(log_path, "a", encoding="utf-8") as log:
            with self._lock:
                if self._stopping.is_set():
                    return RunOutcome(name, spec["run_hash"], ok=False, error="not started")
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, errors="replace", bufsize=1, env=env)
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
            error = f"exit code {code}" + (f" ({EXIT_MEANING[code]})" if code in EXIT_MEANING
                                           else "")
        # Stopped by us or by a Ctrl-C at the terminal (which reaches the runs directly, maybe
        # before us): not a failure of the run; the stage says which runs finished anyway.
        stopped = self._stopping.is_set() or code in (130, -signal.SIGINT)
        self._say(f"[{name}] {'stopped' if stopped else 'FAILED'}: {error}")
        return RunOutcome(name, spec["run_hash"], ok=False, error=error,
                          log_tail="\n".join(tail))

    def threads_per_run(self) -> int:
        return max(1, _cpu_count() // self.max_parallel)

    def _say(self, text: str):
        with self._lock:
            print(text, file=self.out, flush=True)

    def _terminate_all(self):
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cpu_count() -> int:
    """Cores this process may run on (its affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _raise_on_sigterm():
    """Turn SIGTERM into SystemExit so `run` can stop its children before exiting; returns
    the previous handler (None off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)
