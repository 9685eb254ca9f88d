"""One training run: `python -m pipeline.train`.

    python -m pipeline.train --spec run.json          # what the executors run
    python -m pipeline.train --spec-json '{...}'      # Kubernetes Jobs (no shared disk)
    python -m pipeline.train --dataset cifar100 --arch vgg --optimizer vsgd [--seed 0]
                             [--set key=value ...] [--params params.yaml]

Exit codes: 0 done (or finished already), 78 invalid configuration (every problem listed,
no traceback; also a stale image, a GPU requested where CUDA is not available, and prepared
data that is not what the spec was built on), 1 any other failure, 143
stopped by SIGTERM, 130 by SIGINT (128 + the signal). Progress is a tqdm bar when stderr is a
terminal and one plain line per log point otherwise (Kubernetes and executor logs).

Stopping: SIGTERM (preemption, eviction, `kubectl delete`, an executor's stop, `kill`) and
SIGINT (Ctrl-C) ask the trainer to stop after the step in flight: it saves a checkpoint at
the step it reached and the process exits 143 or 130, so the next start loses no step
(`StopRequest`). Under DVC (and the local executor) the run also stops so when the process
that started it dies, since DVC does not pass its own SIGTERM on (`watch_launcher`).

One process per run: before it writes anything of the run, the process holds the run's
lock on this machine (`pipeline.runlock`; the local executor passes its own on) and, with
VSGD_RESULTS_URI set, the run's lease in the remote store (`pipeline.lease`). A run held by
another launcher is waited for; a run that then has a whole result (here, or published to the
remote store) is not trained again: the process says so and exits 0.

Before training, checks that make a pod fail with 78 rather than train the wrong thing or
waste a retry: the spec's run hash is recomputed with this installation's code (a mismatch
is a stale image, `STALE_IMAGE`), and with `VSGD_REQUIRE_CUDA=1` (a Job that requests a GPU)
CUDA must be available. With `VSGD_TERMINATION_LOG` set, why the run failed or stopped is
written there (Kubernetes shows it in the pod's status); with `VSGD_TEE_LOG=1` everything
the run prints is also appended to `<output_dir>/train.log`, published with the result.
"""

import argparse
import datetime
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from vsgd.data.errors import DataError
from vsgd.spec import ARCHS, OPTIMIZERS, TRAINING_DEFAULTS, ConfigError

from . import results
from .contract import (CUDA_DRIVER, EX_CONFIG, LOG_NAME, REQUIRE_CUDA_ENV, RESULTS_ENV,
                       STALE_IMAGE, TEE_LOG_ENV, TERMINATION_LOG_ENV, TERMINATION_LOG_LIMIT,
                       launched_by_dvc_or_executor, signal_main_thread, watch_launcher)
from .config import load_params
from .grid import build_spec
from .lease import Lease
from .plan import load_selection
from .runlock import RunLock, inherited
from .storage import endpoint_from_env



class StaleImage(ConfigError):
    """The spec's run hash was computed with other code than this installation's."""

    def __str__(self):
        return self.problems[0]


def open_checkpoint_store(uri: str | None):
    """The checkpoint store of a spec's `checkpoint`: a local directory, `s3://bucket/prefix`
    (`pipeline.storage.S3CheckpointStore`), or None for no checkpoints."""
    if not uri:
        return None
    if uri.startswith("s3://"):
        from pipeline.storage import open_checkpoint_store as open_remote
        return open_remote(uri)
    if "://" in uri:
        raise ConfigError([f"checkpoint: {uri!r}; allowed: a local directory or "
                           "s3://bucket/prefix"])
    from vsgd.checkpoint import LocalCheckpointStore
    return LocalCheckpointStore(uri)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # Bad flags are a configuration error: not worth a retry, and a termination message.
        self.print_usage(sys.stderr)
        raise ConfigError([message])


def parse_args(argv):
    p = _Parser(prog="python -m pipeline.train", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", metavar="FILE", help="resolved run spec file (JSON)")
    src.add_argument("--spec-json", metavar="JSON", help="resolved run spec as a JSON string")
    src.add_argument("--dataset", help="build the spec from params.yaml (with --arch, "
                     "--optimizer)")
    p.add_argument("--arch", help=f"architecture key of params.yaml: {', '.join(ARCHS)}")
    p.add_argument("--optimizer", help=f"optimizer key of params.yaml: {', '.join(OPTIMIZERS)}")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a params.yaml key (repeatable)")
    p.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="the params file (default: params.yaml)")
    try:
        args = p.parse_args(argv)
        if args.dataset and not (args.arch and args.optimizer):
            p.error("--dataset needs --arch and --optimizer")
        if not args.dataset and (args.arch or args.optimizer or args.overrides):
            p.error("--arch/--optimizer/--set build a spec from params.yaml: use them with "
                    "--dataset, not with --spec/--spec-json")
    except SystemExit as exc:  # --help; any other exit of argparse is a bad flag
        raise SystemExit(EX_CONFIG if exc.code else 0) from None
    return args


def load_spec(args) -> dict:
    """The run spec; raises ConfigError for anything the user has to fix."""
    if args.spec or args.spec_json:
        try:
            text = Path(args.spec).read_text(encoding="utf-8") if args.spec \
                else args.spec_json
            return json.loads(text)
        except OSError as exc:
            raise ConfigError([f"--spec: cannot read {args.spec}: {exc.strerror}"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"--spec: {args.spec} is not UTF-8 text ({exc.reason} at byte "
                               f"{exc.start})"]) from exc
        except ValueError as exc:   # JSONDecodeError, or an integer too long to convert
            raise ConfigError([f"spec is not valid JSON: {exc}"]) from exc
    params = load_params(args.params, args.overrides)
    problems = []
    for flag, value, allowed in (("--dataset", args.dataset, params["protocol"]),
                                 ("--arch", args.arch, ARCHS),
                                 ("--optimizer", args.optimizer, params["optimizer"])):
        if value not in allowed:
            problems.append(f"{flag}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
    if problems:
        raise ConfigError(problems)
    # The tune stage's choice for this cell where it made one, else the pinned values.
    values = load_selection(params).get((args.dataset, args.arch, args.optimizer)) or {}
    return build_spec(params, args.dataset, args.arch, args.optimizer, args.seed, values)


class Progress:
    """tqdm bar on a terminal, else one plain line per log point, with an ETA either way."""

    def __init__(self, name: str, tty: bool):
        self.name, self.tty = name, tty
        self.bar = None
        self.t0 = self.step0 = None

    def __call__(self, step, total, info):
        if self.t0 is None:  # the rate of this process, from its first log point
            self.t0, self.step0 = time.monotonic(), step
        if self.tty:
            self._bar(step, total, info)
            return
        rate = (step - self.step0) / max(time.monotonic() - self.t0, 1e-9)
        eta = _hms((total - step) / rate) if step > self.step0 else "?"
        line = (f"step {step}/{total} loss {info['loss']:.4f} acc {info['acc']:.4f} "
                f"lr {info['lr']:.4g} {info['images_per_sec']:.0f} img/s eta {eta}")
        if "test_acc" in info:
            line += f" | test_acc {info['test_acc']:.4f} test_loss {info['test_loss']:.4f}"
        if info.get("val_acc") is not None:  # also the tune stage's runs, which skip test
            line += f"{'' if 'test_acc' in info else ' |'} val_acc {info['val_acc']:.4f}"
        print(line, file=sys.stderr, flush=True)

    def _bar(self, step, total, info):
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=step, desc=self.name, unit="it",
                            dynamic_ncols=True)
        self.bar.update(step - self.bar.n)
        post = {"loss": f"{info['loss']:.3f}", "acc": f"{info['acc']:.3f}"}
        for key in ("test_acc", "val_acc"):
            if info.get(key) is not None:
                post[key] = f"{info[key]:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# stopping


class StopRequest:
    """The stop request of this process's run, for `vsgd.trainer.train(stop=...)`: SIGTERM
    or SIGINT (`handle`) or the death of the launcher (`launcher_died`) asks, the trainer
    polls (`__call__`) after every step and then saves a checkpoint and stops.

    Until the trainer's first poll (spec checks, data staging, model build, the first step
    and its compilation) there is no step worth waiting for, so a signal raises
    KeyboardInterrupt at once; so does any signal once the trainer has returned (`done`), and
    a second signal while stopping: whoever sends two means now. The launcher's death is one
    more request, never a second signal: it may come with a signal to the whole process
    group (`kill -TERM -<pgid>`), which must not cost the checkpoint.
    """

    def __init__(self):
        self.signum: int | None = None   # the first request's signal
        self.polled = False
        self._calls = 0
        self._launcher_died = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def __call__(self) -> bool:
        self.polled = True
        return self.signum is not None

    def done(self) -> None:
        """Training is over: from now on a signal interrupts at once."""
        self.polled = False

    def handle(self, signum, frame) -> None:
        self._calls += 1
        if self.signum is None:
            self.signum = signum
        if not self.polled or self._calls > 1 + self._launcher_died:
            raise KeyboardInterrupt

    def launcher_died(self) -> None:
        """From the watching thread: ask as SIGTERM does, through the main thread."""
        self._launcher_died = True
        signal_main_thread(signal.SIGTERM)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# one process per run


def hold_run(spec: dict, stop: "StopRequest") -> tuple[tuple, bool]:
    """Hold the run for this process: its run lock on this machine (inherited from the
    local executor, or taken here) and, when it publishes to an S3 store, its lease there
    (`pipeline.lease`, renewed until released). Another launcher holding either is waited
    for, saying who; a signal interrupts the wait. If the lease is ever lost to another
    launcher, the run stops as on SIGTERM (checkpoint, exit 143). Returns what is held and
    whether it had to wait (the run may have been finished meanwhile)."""
    held, waited = [], False
    if not inherited(spec):
        lock = RunLock.of(spec)
        if not lock.try_acquire():
            print(f"{spec['name']}: another launcher is training it ({lock.holder()}); "
                  "waiting for it", file=sys.stderr, flush=True)
            lock.acquire()
            waited = True
        held.append(lock)
    uri = os.environ.get(RESULTS_ENV)
    if uri and uri.startswith("s3://"):
        lease = Lease(uri, endpoint_from_env())
        told = []

        def say(who):
            told.append(who)
            print(f"{spec['name']}: another launcher is training it ({who}, lease "
                  f"{lease.uri}); waiting for it", file=sys.stderr, flush=True)
        lease.acquire(on_wait=say)
        lease.keep(on_lost=stop.launcher_died)
        held.append(lease)
        waited = waited or bool(told)
    return tuple(held), waited


def finished_elsewhere(spec: dict) -> str | None:
    """After waiting for another launcher: what to say when it finished the run, whose whole
    result is then in the local store, or published to the remote store (then copied here).
    None when it has to be trained (the other launcher stopped before the end)."""
    if results.is_done(spec):
        return (f"{spec['name']}: finished by another launcher: {spec['output_dir']}; "
                "nothing to train")
    uri = os.environ.get(RESULTS_ENV)
    if uri and results.fetch_published(uri, spec, endpoint_from_env()):
        return (f"{spec['name']}: finished by another launcher: {uri}, copied to "
                f"{spec['output_dir']}; nothing to train")
    return None


# ---------------------------------------------------------------------------------------------
# the pod's checks, its termination message and its log


def check_code(spec: dict) -> None:
    """The spec's run hash is the one this installation computes: else the image is stale
    (StaleImage), or the spec was changed after it was built (ConfigError)."""
    from vsgd.spec import code_version, run_hash
    ours, expected = run_hash(spec), spec["run_hash"]
    if ours == expected:
        return
    theirs, here = spec.get("code_version"), code_version()
    if theirs == here:
        raise ConfigError([f"run_hash: {expected} is not the hash of this spec ({ours}, with "
                           f"the same code version {here[:12]}): the spec was changed after "
                           "it was built; build it again"])
    raise StaleImage([
        f"{STALE_IMAGE}: the spec was built by code version "
        f"{theirs[:12] if theirs else 'unknown'} (run hash {expected}), this image has code "
        f"version {here[:12]} (run hash {ours}): it would not train the run its hash names. "
        "Rebuild and push the image (`make image`) from the launcher's checkout, then start "
        "the run again"])


def check_cuda(spec: dict) -> None:
    """With REQUIRE_CUDA_ENV=1 (the Job requests a GPU), CUDA must be available and the
    spec must not ask for another device: a pod that would train on its CPU fails at once."""
    if os.environ.get(REQUIRE_CUDA_ENV) != "1":
        return
    problems = []
    device = {**TRAINING_DEFAULTS, **(spec.get("training") or {})}["device"]
    if device in ("cpu", "mps"):
        problems.append(f"training.device: {device!r}, but the Job requests a GPU "
                        f"({REQUIRE_CUDA_ENV}=1): set training.device to auto or cuda, or "
                        "request no GPU")
    import torch
    if not torch.cuda.is_available():
        built = (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                 else "a CPU-only build")
        problems.append(
            "GPU requested but CUDA is not available: driver/device plugin (the node needs "
            f"an NVIDIA driver {CUDA_DRIVER} for the image's CUDA 13.0, and the NVIDIA device "
            "plugin or the GPU Operator must give this pod its nvidia.com/gpu; check "
            "`nvidia-smi` on the node and `kubectl describe node`; PyTorch "
            f"{torch.__version__} here is {built})")
    if problems:
        raise ConfigError(problems)


def write_termination_message(text: str) -> None:
    """`text` (at most TERMINATION_LOG_LIMIT bytes) to $VSGD_TERMINATION_LOG, if set; a
    failure to write it is only reported, never in the way of the run's own error."""
    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    data = text.strip().encode("utf-8")[:TERMINATION_LOG_LIMIT]
    try:
        with open(path, "wb") as f:
            f.write(data.decode("utf-8", "ignore").encode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - the message is a courtesy
        print(f"could not write the termination message to {path}: {exc}", file=sys.stderr)


class _Tee:
    """A text stream that writes to `stream` and to `log`; a failing log is dropped (with
    one line saying so), the stream is never held up by it."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        n = self.stream.write(text)
        if self.log is not None:
            try:
                self.log.write(text)
                self.log.flush()
            except (OSError, ValueError) as exc:
                self.log = None
                self.stream.write(f"{LOG_NAME}: no longer written ({exc})\n")
        return n

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self.stream, name)


class TeeLog:
    """With TEE_LOG_ENV=1, stdout and stderr (and the log handlers on them) also go to
    `<output_dir>/train.log`, appended, after a header line per start. What C code writes to
    the file descriptors directly (rare: a crash dump) is only in the pod's log."""

    def __init__(self, output_dir):
        path = Path(output_dir) / LOG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8", errors="replace")
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.file.write(f"==== {now} {socket.gethostname()}: python -m pipeline.train "
                        f"(pid {os.getpid()}) ====\n")
        self.file.flush()
        self.streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)
        self._swap(self.streams[1], sys.stderr)

    @classmethod
    def start(cls, output_dir) -> "TeeLog | None":
        """The tee if TEE_LOG_ENV asks for it; a log that cannot be opened costs the copy of
        the log, not the run."""
        if os.environ.get(TEE_LOG_ENV) != "1":
            return None
        try:
            return cls(output_dir)
        except OSError as exc:
            print(f"{LOG_NAME}: not kept in {output_dir} ({exc})", file=sys.stderr)
            return None

    def _swap(self, old, new):
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)

    def close(self):
        self._swap(sys.stderr, self.streams[1])
        sys.stdout, sys.stderr = self.streams
        self.file.close()


# ---------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    # First of all: a signal from here on stops the run as StopRequest says.
    stop = StopRequest()
    stop.install()
    if launched_by_dvc_or_executor():
        watch_launcher(stop.launcher_died)
    tee = progress = None
    held = ()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("mlflow", "alembic", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from pipeline import redact, storage
        redact.install()  # no credential value in this run's log
        from vsgd.spec import check_spec
        spec = load_spec(args)
        problems = check_spec(spec)
        if problems:
            raise ConfigError(problems)
        check_code(spec)
        check_cuda(spec)
        # One process per run, before anything of it is written (its log, checkpoint, MLflow
        # run): wait for another launcher that holds it, then train only if it is unfinished.
        held, waited = hold_run(spec, stop)
        finished = finished_elsewhere(spec) if waited else None
        if finished:
            print(finished, file=sys.stderr)
            return 0
        # After the checks, which need no torch: a pod that fails them fails in a moment.
        from vsgd.trainer import Stopped, train
        store = open_checkpoint_store(spec.get("checkpoint"))
        tee = TeeLog.start(spec["output_dir"])
        progress = Progress(spec["name"], sys.stderr.isatty())
        # A remote dataset (spec data.uri) is staged into local scratch once, verified.
        spec["data"]["dir"] = storage.stage_data(spec)
        try:
            metrics = train(spec, checkpoint_store=store, progress=progress, stop=stop)
        except Stopped as exc:
            return _stopped(stop, progress,
                            f"stopped by {stop.name} at step {exc.step}/{exc.iterations}: " + (
                                "checkpoint saved, run again to resume" if exc.checkpointed
                                else "no checkpoint store, a new start begins at step 0"))
        stop.done()
        progress.close()
        if tee is not None:
            tee.file.flush()
        storage.publish_result(spec["output_dir"])  # to $VSGD_RESULTS_URI when set (pods)
        print(_done_line(spec, metrics), file=sys.stderr)
        return 0
    except (ConfigError, DataError) as exc:
        # A data error (prepared data that is not what the spec was built on, altered or
        # damaged) is the user's to fix, like a configuration error: retrying cannot help.
        if progress is not None:
            progress.close()
        print(exc, file=sys.stderr)
        write_termination_message(str(exc))
        return EX_CONFIG
    except KeyboardInterrupt:
        return _stopped(stop, progress, f"interrupted by {stop.name} before it could save a "
                                        "checkpoint; the last one (if any) is kept, run again "
                                        "to resume")
    except Exception as exc:  # noqa: BLE001 - reported as a crash would be, plus the message
        from pipeline.redact import redact
        if progress is not None:
            progress.close()
        sys.stderr.write(redact("".join(traceback.format_exception(exc))))
        write_termination_message(redact(traceback.format_exception_only(exc)[-1]))
        return 1
    finally:
        if tee is not None:
            tee.close()
        for hold in reversed(held):   # the lease, then the lock
            hold.release()


def _done_line(spec: dict, metrics: dict) -> str:
    shown = " ".join(f"{key} {metrics[key]:.4f}" for key in ("test_acc", "test_loss", "val_acc")
                     if metrics.get(key) is not None) or "no finite evaluation"
    diverged = (f"diverged at step {metrics['diverged']['step']}; "
                if metrics.get("diverged") else "")
    return (f"done {spec['name']}: {diverged}{shown} ({metrics['images_per_sec']:.0f} img/s) "
            f"-> {spec['output_dir']}")


def _stopped(stop: StopRequest, progress, message: str) -> int:
    if progress is not None:
        progress.close()
    print(message, file=sys.stderr)
    write_termination_message(message)
    return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
