"""The contract between a launcher and the runs it starts, in one place: what the single-run
CLI (`python -m pipeline.train`), both executors and the Job renderer agree on.

- Environment variables a launcher sets for a run (`*_ENV`), and the file a run's log is kept
  in (`LOG_NAME`).
- Exit codes (`EXIT_CODES`): what each means, and which of them say the run was stopped
  rather than failed (`STOPPED_CODES`).
- The messages a launcher recognises: a stale image (`STALE_IMAGE`), the driver a GPU pod
  needs (`CUDA_DRIVER`).
- The launcher watch: a run stops (as on SIGTERM) when the process that started it dies
  (`watch_launcher`), since DVC does not pass its own SIGTERM on.
- A run's progress line (`STEP_FORMAT`, written by `pipeline.run_log.Progress`), from which a
  launcher reads the step a run is at and its total (`parse_step`).

A leaf: it imports nothing of the project but `vsgd.spec`'s exit code.
"""

import math
import os
import re
import select
import signal
import threading
from pathlib import Path

from vsgd.spec import EX_CONFIG

# The start of the message of a pod whose code differs from the launcher's; the Kubernetes
# executor looks for it in the termination message.
STALE_IMAGE = "stale image"
# "1" when the Job requests GPUs (pipeline.k8s_jobs sets it): no CUDA is then a failure.
REQUIRE_CUDA_ENV = "VSGD_REQUIRE_CUDA"
# Where to write why the run failed (the Job template: /dev/termination-log).
TERMINATION_LOG_ENV = "VSGD_TERMINATION_LOG"
TERMINATION_LOG_LIMIT = 4096  # bytes; Kubernetes keeps no more of a termination message
# "1": copy everything the run prints into <output_dir>/LOG_NAME (the Job template sets it:
# a pod's own log is gone with the Job).
TEE_LOG_ENV = "VSGD_TEE_LOG"
LOG_NAME = "train.log"  # also the local executor's log of a run, and a result file
# "1": stop (as on SIGTERM) when the process that started this one dies; set by the local
# executor for its runs. A run DVC started (DVC_STAGE set) does so too.
STOP_WITH_LAUNCHER_ENV = "VSGD_STOP_WITH_LAUNCHER"
# What DVC runs a stage's command through (`$SHELL -c "<cmd>"`, dvc/stage/run.py).
SHELLS = ("sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "busybox")
# The driver the image's CUDA 13.0 needs: CUDA 13.0 GA's (its release notes); NVIDIA's CUDA
# compatibility guide gives >= 580 as the branch for all of CUDA 13.x.
CUDA_DRIVER = ">= 580.65.06"
# What a launcher runs for one run: `python -m RUN_MODULE --spec <file>` (the local executor)
# or `--spec-json` (the Job template's command).
RUN_MODULE = "pipeline.train"
# Where a run publishes its result in the remote store (`<remote>/results/<run_hash>`); set
# per run by both executors (`pipeline.storage.run_env`, the Job renderer).
RESULTS_ENV = "VSGD_RESULTS_URI"
ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"  # boto3's own variable for the S3 endpoint
SCRATCH_ENV = "VSGD_SCRATCH"  # where a run stages a remote dataset
# The run lock's descriptor the local executor hands its run (`pipeline.runlock`).
LOCK_FD_ENV = "VSGD_RUN_LOCK_FD"
# Inductor's own variable: how many worker processes torch.compile compiles kernels with, and
# the most it starts by itself (torch/_inductor/config.py, decide_compile_threads).
COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"
INDUCTOR_MAX_COMPILE_THREADS = 32

EX_TEMPFAIL = 75  # sysexits.h: try again later (`Detached`: the runs go on, a restart adopts them)
# A run's exit code -> what it means (anything else: a failure, with its log's tail).
EXIT_CODES = {
    0: "done (or finished by the launcher it waited for)",
    1: "failed",
    EX_CONFIG: "invalid configuration",  # also a stale image, no CUDA, data not the spec's
    EX_TEMPFAIL: "the launcher stopped following its runs; they go on",
    128 + signal.SIGINT: "stopped by SIGINT, checkpoint saved",
    128 + signal.SIGTERM: "stopped by SIGTERM, checkpoint saved",
}


# How a run's progress line begins, at each log point when it does not print to a terminal
# (`pipeline.run_log.Progress`; what follows is for people). A launcher reads the run's step
# and total from it (`parse_step`): the stage's grid-level progress and its ETA.
STEP_FORMAT = "step {step}/{total}"
_STEP_LINE = re.compile(
    # The local executor echoes a run's line as `[<name>] <line>`: tolerated, not required.
    r"^(?:\[[^\]]*\] )?"
    + re.escape(STEP_FORMAT)
    .replace(re.escape("{step}"), r"(?P<step>\d+)")
    .replace(re.escape("{total}"), r"(?P<total>\d+)")
    + r"(?!\S)"
)


def step_line(step: int, total: int) -> str:
    """The start of a run's progress line at `step` of `total`."""
    return STEP_FORMAT.format(step=step, total=total)


def parse_step(line: str) -> tuple[int, int] | None:
    """(step, total) of a run's progress line (`step_line`), bare or as the local executor
    echoes it; None for any other line."""
    match = _STEP_LINE.match(line.strip())
    if match is None:
        return None
    step, total = int(match["step"]), int(match["total"])
    return (step, total) if 0 <= step <= total and total > 0 else None


class Detached(Exception):
    """The executor stopped following runs that go on without it (the Kubernetes API was
    unreachable longer than its outage budget). Not a failure of any run: the next start of
    the stage adopts them."""


# Exit codes of a run that was stopped rather than failed: 128 + the signal after a
# checkpoint, and death by either signal.
STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)


def signal_main_thread(signum: int) -> None:
    """Send `signum` to the main thread, whose handler then runs there: a real signal, unlike
    `_thread.interrupt_main`, also wakes it from a blocking wait (for a lock, a child)."""
    signal.pthread_kill(threading.main_thread().ident, signum)


def launcher_pid() -> int:
    """The process that started this one: the parent, or its parent when the parent is a
    `sh -c` wrapper (DVC runs a stage's command as `$SHELL -c "<cmd>"`; bash and zsh exec a
    lone command, dash, Debian's /bin/sh, forks it and waits, and it is not signalled when
    DVC dies)."""
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        if os.path.basename(argv[0].decode()) in SHELLS and b"-c" in argv[1:]:
            stat = Path(f"/proc/{parent}/stat").read_text()
            return int(stat.rsplit(")", 1)[1].split()[1])  # the field after (comm) state
    except (OSError, ValueError, IndexError):
        pass
    return parent


def watch_launcher(on_death) -> bool:
    """Call `on_death()` from a daemon thread once the launcher (`launcher_pid`) has exited;
    False where that cannot be watched (no pidfd: not Linux >= 5.3).

    Why: `dvc repro` killed by SIGTERM dies without passing it on to its stage's command,
    which would train on as an orphan, racing the next `dvc repro` for the same checkpoint.
    A pidfd rather than PR_SET_PDEATHSIG, which fires only for the direct parent: the
    launcher may be the shell's parent. And a callback, so that `StopRequest` counts the
    launcher's death as a request of its own, never as a second signal."""
    pid = launcher_pid()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # it is gone already
        fd = None
    except (AttributeError, OSError):
        return False

    def wait():
        if fd is not None:
            select.select([fd], [], [])
            os.close(fd)
        on_death()

    threading.Thread(target=wait, name="launcher-watch", daemon=True).start()
    return True


def launched_by_dvc_or_executor() -> bool:
    return bool(os.environ.get("DVC_STAGE")) or os.environ.get(STOP_WITH_LAUNCHER_ENV) == "1"


def compile_threads(cpus: float | None) -> int | None:
    """Inductor's compile workers for a run that may use `cpus` CPUs (a pod's CPU request, a
    local run's share of the cores): its whole CPUs, at least 1, at most inductor's own
    ceiling; None without a figure.

    Inductor counts the machine's CPUs (up to 32), not the run's share: 32 workers on a big
    node can outgrow a pod's memory limit and get it OOM-killed while it compiles, and they
    would only contend for the CPUs the run has.
    """
    if cpus is None:
        return None
    return min(INDUCTOR_MAX_COMPILE_THREADS, max(1, math.floor(cpus)))
