"""Run specs as `python -m pipeline.train --spec <file>` subprocesses on this machine.

Up to `executor.max_parallel` at a time (and no more than the GPU places, below). Every output
line of a run is echoed with its name as prefix and kept in `<output_dir>/train.log`; a failed
run does not stop the others. Parallel runs share the CPU cores: each gets `cores // runs at
once` threads (OMP_NUM_THREADS, unless set), so that they do not oversubscribe the cores
(which slows CPU training down severalfold); runs on GPUs too.
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

GPUs: a run that may use one (`training.device` auto or cuda) gets exactly one, through
`CUDA_VISIBLE_DEVICES` in its environment (inside the run, `cuda` is that GPU), from
`executor.local.gpus` (default all this machine shows the launcher: `CUDA_VISIBLE_DEVICES`
honoured, as CUDA reads it), at most `executor.local.runs_per_gpu` runs per GPU, whichever
launcher on this machine starts them (`pipeline.gpu_places`), the least loaded GPU first; a
GPU goes to the next waiting run the moment its run ends. Unset,
`max_parallel` is one run per GPU place; set, it caps the runs at once, and a run that needs
a GPU still waits for a free place. Without a GPU (none here, or `gpus: none`) such a run
sees none (`CUDA_VISIBLE_DEVICES` empty: `auto` trains on the CPU). `before_stage` refuses,
for the whole stage, a run that names CUDA where it cannot have it: `cuda` without a GPU,
and `cuda:N` (N > 0) with one, which the run would see as cuda:0. cpu and mps runs are left
as they are. The cores are split between the runs that can run at once, GPU runs or not.
"""

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from vsgd.spec import TRAINING_DEFAULTS, ConfigError

from .. import results
from ..contract import (
    COMPILE_THREADS_ENV,
    EXIT_CODES,
    LOCK_FD_ENV,
    LOG_NAME,
    RUN_MODULE,
    STOP_WITH_LAUNCHER_ENV,
    STOPPED_CODES,
    TEE_LOG_ENV,
    compile_threads,
    signal_main_thread,
    watch_launcher,
)
from ..gpu_places import GpuPlaces, Place
from ..runlock import RunLock
from .base import Executor, RunOutcome, spec_path, write_spec

TAIL_LINES = 30
# How long a stopped run may take to save its checkpoint and exit before it is killed: the
# Job template's terminationGracePeriodSeconds (pipeline/templates/job-template.yaml), the
# same budget a run has in a pod.
GRACE_SECONDS = 120
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


class LocalExecutor(Executor):
    def __init__(
        self,
        max_parallel: int | None = 1,
        command=None,
        out=None,
        run_env=None,
        *,
        gpus="all",
        runs_per_gpu: int = 1,
        machine_gpus=None,
    ):
        # executor.max_parallel; None: one run per GPU place when the runs use GPUs, else
        # one at a time.
        self.parallel = None if max_parallel is None else max(1, int(max_parallel))
        # How many runs run at once (what shares the cores; the stage's ETA counts on it):
        # set for the runs at hand by `before_stage` and `run`.
        self.max_parallel = self.parallel or 1
        # executor.local: "all", "none" or indices into the machine's GPUs.
        self.gpus = gpus
        self.runs_per_gpu = max(1, int(runs_per_gpu))
        # () -> the GPUs this machine shows us (`visible_gpus`, which the factory passes),
        # asked once, and only when a run may use a GPU; by default none.
        self.machine_gpus = machine_gpus or (lambda: [])
        self._machine = None
        self._places = None  # GpuPlaces of the current `run`, None without GPUs
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
        gpus, workers = self.plan_runs(specs)
        self._places = GpuPlaces(gpus, self.runs_per_gpu) if gpus else None
        pool = ThreadPoolExecutor(workers, thread_name_prefix="run")
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

    def before_stage(self, stage: str, unfinished: list[dict]) -> None:
        self.plan_runs(unfinished)

    def plan_runs(self, specs: list[dict]) -> tuple[list[str], int]:
        """(the GPUs the runs get, how many runs are started at once) for `specs`; sets
        `max_parallel`, the runs that can run at once: runs on GPUs never outnumber the
        GPU places, whatever `executor.max_parallel` allows."""
        gpus = self._gpus_for(specs)
        places = len(gpus) * self.runs_per_gpu
        on_gpus = sum(map(takes_gpu, specs)) if gpus else 0
        workers = self.parallel or (places if on_gpus else 1)
        self.max_parallel = min(workers, places) if specs and on_gpus == len(specs) else workers
        return gpus, workers

    def _gpus_for(self, specs: list[dict]) -> list[str]:
        """The GPUs the runs of `specs` are given ([] when none may use one, without asking
        the machine); ConfigError for what would fail them: GPUs listed that the machine does
        not have, and runs that name CUDA where they cannot have it."""
        wanting = [s for s in specs if takes_gpu(s)]
        if not wanting:
            return []
        if self._machine is None:
            self._machine = list(self.machine_gpus())
        machine, problems = self._machine, []
        if self.gpus in ("all", "none"):
            gpus = machine if self.gpus == "all" else []
        else:
            gpus = [machine[i] for i in self.gpus if i < len(machine)]
            problems += [
                f"executor.local.gpus[{n}]: {i} is not a GPU here; {self._machine_text()}"
                for n, i in enumerate(self.gpus)
                if i >= len(machine)
            ]
        named = collections.defaultdict(list)  # a CUDA device -> the runs that name it
        for spec in wanting:
            if device_of(spec).startswith("cuda"):
                named[device_of(spec)].append(spec["name"])
        for device, names in named.items():
            runs = f"{len(names)} run{'s' if len(names) > 1 else ''}, e.g. {names[0]}"
            if not gpus:
                why = "executor.local.gpus is none" if self.gpus == "none" else self._machine_text()
                problems.append(
                    f"training.device: {device!r} ({runs}) needs a CUDA GPU, but {why}; "
                    "allowed here: auto (CUDA where there is a GPU, else the CPU), cpu"
                )
            elif device not in ("cuda", "cuda:0"):
                problems.append(
                    f"training.device: {device!r} ({runs}): the local executor gives each run "
                    "one GPU, which the run sees as cuda:0; allowed: auto, cuda, cuda:0, cpu "
                    "(executor.local.gpus chooses the GPUs)"
                )
        if problems:
            raise ConfigError(problems)
        return gpus

    def _machine_text(self) -> str:
        visible = os.environ.get(VISIBLE_ENV)
        given = "" if visible is None else f" ({VISIBLE_ENV}={visible!r})"
        if not self._machine:
            return f"no CUDA GPU is visible here{given}"
        last = len(self._machine) - 1
        return f"the GPU indices here are {'0' if last == 0 else f'0 to {last}'}{given}"

    def _run_one(self, spec: dict) -> RunOutcome:
        outcome = self._hold_and_run(spec)
        self.events.run_ended(outcome)
        return outcome

    def _hold_and_run(self, spec: dict) -> RunOutcome:
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
        """The run on a free GPU place if it may use a GPU and there are any (waiting for one,
        unless the stage stops first); the place is given back as soon as its process ends."""
        place = None
        if self._places is not None and takes_gpu(spec):
            place = self._places.take(cancel=self._stopping.is_set)
            if place is None:
                return RunOutcome(spec["name"], spec["run_hash"], ok=False, error="not started")
        try:
            return self._start_on(spec, lock, place)
        finally:
            if place is not None:
                self._places.give_back(place)

    def _start_on(self, spec: dict, lock: RunLock, place: Place | None) -> RunOutcome:
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
        # Compile workers sized to the run's share of the cores, as in a pod (contract).
        env.setdefault(COMPILE_THREADS_ENV, str(compile_threads(self.threads_per_run())))
        gpu = place.gpu if place else None
        if takes_gpu(spec):
            # Its GPU alone (inside the run, `cuda` is that GPU), or none at all: never one
            # that another run was given.
            env[VISIBLE_ENV] = gpu or ""
        where = None if gpu is None else f"GPU {gpu}" if gpu.isdigit() else gpu
        log_path = spec_path(spec).parent / LOG_NAME
        with open(log_path, "a", encoding="utf-8") as log:
            with self._lock:
                if self._stopping.is_set():
                    return RunOutcome(name, spec["run_hash"], ok=False, error="not started")
                # Its own process group: see the module docstring. The run inherits the
                # locked descriptors of its run lock and its GPU place, so they outlive us
                # if we die before it.
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
                    pass_fds=(lock.fd, *([place.fd] if place else [])),
                )
                self._procs.add(proc)
            self._say(f"[{name}] start" + (f" on {where}" if where else ""))
            self.events.run_started(name, where)
            try:
                for line in proc.stdout:
                    # tqdm redraws with \r; the last state of a line is what matters here.
                    line = line.rstrip("\n").rsplit("\r", 1)[-1]
                    log.write(line + "\n")
                    tail.append(line)
                    self._say(f"[{name}] {line}")
                    self.events.run_output(name, line)
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


def device_of(spec: dict) -> str:
    return {**TRAINING_DEFAULTS, **(spec.get("training") or {})}["device"]


def takes_gpu(spec: dict) -> bool:
    """Whether the run may use a GPU: `auto` uses CUDA where it finds it, `cuda` needs it."""
    return device_of(spec) not in ("cpu", "mps")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them for a child."""
    return cuda_visible_devices(os.environ.get(VISIBLE_ENV), _cuda_device_count())


def cuda_visible_devices(value: str | None, device_count: int) -> list[str]:
    """The GPUs a `CUDA_VISIBLE_DEVICES` of `value` shows, read as CUDA reads it (and as
    torch.cuda does, `_parse_visible_devices`): unset, every GPU by index; else indices
    (leading digits, as strtoul reads them) or UUIDs (`GPU-...`/`MIG-...`, when the first
    entry is one), the list ending at the first entry that is not one; an entry listed twice
    shows none at all. `device_count`: how many GPUs CUDA counts with this value (torch's
    count, which ends the list at the first index the machine does not have)."""
    if value is None:
        return [str(i) for i in range(device_count)]
    entries = [entry.strip() for entry in value.split(",")]
    prefix = next((p for p in ("GPU-", "MIG-") if entries[0].startswith(p)), None)
    shown = []
    for entry in entries:
        if prefix is None:
            index = re.match(r"\+?\d+", entry)
            entry = str(int(index.group())) if index else None
        elif not entry.startswith(prefix):
            entry = None
        if entry is None:
            break
        if entry in shown:
            return []
        shown.append(entry)
    return shown[:device_count]


def _cuda_device_count() -> int:
    import torch  # only here, and only when a run may use a GPU: the launcher needs no torch

    return torch.cuda.device_count()
