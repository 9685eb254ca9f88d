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
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from vsgd.data.errors import DataError
from vsgd.spec import ARCHS, OPTIMIZERS, ConfigError, check_spec
from vsgd.trainer import Stopped, train

from . import redact, results, storage
from .config import load_params
from .contract import EX_CONFIG, RESULTS_ENV, launched_by_dvc_or_executor, watch_launcher
from .grid import build_spec
from .lease import Lease
from .plan import load_selection
from .pod_checks import check_code, check_cuda
from .run_log import Progress, TeeLog, write_termination_message
from .runlock import RunLock, inherited
from .stopping import StopRequest


def open_checkpoint_store(uri: str | None):
    """The checkpoint store of a spec's `checkpoint`: a local directory, `s3://bucket/prefix`
    (`pipeline.storage.S3CheckpointStore`), or None for no checkpoints."""
    if not uri:
        return None
    if "://" in uri and not uri.startswith("s3://"):
        raise ConfigError(
            [f"checkpoint: {uri!r}; allowed: a local directory or s3://bucket/prefix"]
        )
    return storage.open_checkpoint_store(uri)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # Bad flags are a configuration error: not worth a retry, and a termination message.
        self.print_usage(sys.stderr)
        raise ConfigError([message])


def parse_args(argv):
    p = _Parser(
        prog="python -m pipeline.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", metavar="FILE", help="resolved run spec file (JSON)")
    src.add_argument("--spec-json", metavar="JSON", help="resolved run spec as a JSON string")
    src.add_argument("--dataset", help="build the spec from params.yaml (with --arch, --optimizer)")
    p.add_argument("--arch", help=f"architecture key of params.yaml: {', '.join(ARCHS)}")
    p.add_argument("--optimizer", help=f"optimizer key of params.yaml: {', '.join(OPTIMIZERS)}")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml key (repeatable)",
    )
    p.add_argument(
        "--params",
        default="params.yaml",
        metavar="FILE",
        help="the params file (default: params.yaml)",
    )
    try:
        args = p.parse_args(argv)
        if args.dataset and not (args.arch and args.optimizer):
            p.error("--dataset needs --arch and --optimizer")
        if not args.dataset and (args.arch or args.optimizer or args.overrides):
            p.error(
                "--arch/--optimizer/--set build a spec from params.yaml: use them with "
                "--dataset, not with --spec/--spec-json"
            )
    except SystemExit as exc:  # --help; any other exit of argparse is a bad flag
        raise SystemExit(EX_CONFIG if exc.code else 0) from None
    return args


def load_spec(args) -> dict:
    """The run spec; raises ConfigError for anything the user has to fix."""
    if args.spec or args.spec_json:
        try:
            text = Path(args.spec).read_text(encoding="utf-8") if args.spec else args.spec_json
            return json.loads(text)
        except OSError as exc:
            raise ConfigError([f"--spec: cannot read {args.spec}: {exc.strerror}"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                [f"--spec: {args.spec} is not UTF-8 text ({exc.reason} at byte {exc.start})"]
            ) from exc
        except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
            raise ConfigError([f"spec is not valid JSON: {exc}"]) from exc
    params = load_params(args.params, args.overrides)
    problems = []
    for flag, value, allowed in (
        ("--dataset", args.dataset, params["protocol"]),
        ("--arch", args.arch, ARCHS),
        ("--optimizer", args.optimizer, params["optimizer"]),
    ):
        if value not in allowed:
            problems.append(f"{flag}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
    if problems:
        raise ConfigError(problems)
    # The tune stage's choice for this cell where it made one, else the pinned values.
    values = load_selection(params).get((args.dataset, args.arch, args.optimizer)) or {}
    return build_spec(params, args.dataset, args.arch, args.optimizer, args.seed, values)


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
            print(
                f"{spec['name']}: another launcher is training it ({lock.holder()}); "
                "waiting for it",
                file=sys.stderr,
                flush=True,
            )
            lock.acquire()
            waited = True
        held.append(lock)
    uri = os.environ.get(RESULTS_ENV)
    if uri and uri.startswith("s3://"):
        lease = Lease(uri, storage.endpoint_from_env())
        told = []

        def say(who):
            told.append(who)
            print(
                f"{spec['name']}: another launcher is training it ({who}, lease "
                f"{lease.uri}); waiting for it",
                file=sys.stderr,
                flush=True,
            )

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
        return (
            f"{spec['name']}: finished by another launcher: {spec['output_dir']}; nothing to train"
        )
    uri = os.environ.get(RESULTS_ENV)
    if uri and results.fetch_published(uri, spec, storage.endpoint_from_env()):
        return (
            f"{spec['name']}: finished by another launcher: {uri}, copied to "
            f"{spec['output_dir']}; nothing to train"
        )
    return None


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
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for noisy in ("mlflow", "alembic", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        redact.install()  # no credential value in this run's log
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
        store = open_checkpoint_store(spec.get("checkpoint"))
        tee = TeeLog.start(spec["output_dir"])
        progress = Progress(spec["name"], sys.stderr.isatty())
        # A remote dataset (spec data.uri) is staged into local scratch once, verified.
        spec["data"]["dir"] = storage.stage_data(spec)
        try:
            metrics = train(spec, checkpoint_store=store, progress=progress, stop=stop)
        except Stopped as exc:
            return _stopped(
                stop,
                progress,
                f"stopped by {stop.name} at step {exc.step}/{exc.iterations}: "
                + (
                    "checkpoint saved, run again to resume"
                    if exc.checkpointed
                    else "no checkpoint store, a new start begins at step 0"
                ),
            )
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
        return _stopped(
            stop,
            progress,
            f"interrupted by {stop.name} before it could save a "
            "checkpoint; the last one (if any) is kept, run again "
            "to resume",
        )
    except Exception as exc:  # noqa: BLE001 - reported as a crash would be, plus the message
        if progress is not None:
            progress.close()
        sys.stderr.write(redact.redact("".join(traceback.format_exception(exc))))
        write_termination_message(redact.redact(traceback.format_exception_only(exc)[-1]))
        return 1
    finally:
        if tee is not None:
            tee.close()
        for hold in reversed(held):  # the lease, then the lock
            hold.release()


def _done_line(spec: dict, metrics: dict) -> str:
    shown = (
        " ".join(
            f"{key} {metrics[key]:.4f}"
            for key in ("test_acc", "test_loss", "val_acc")
            if metrics.get(key) is not None
        )
        or "no finite evaluation"
    )
    diverged = (
        f"diverged at step {metrics['diverged']['step']}; " if metrics.get("diverged") else ""
    )
    speed = metrics["images_per_sec"]  # None when no step was timed (only compile steps)
    return (
        f"done {spec['name']}: {diverged}{shown} "
        f"({'-' if speed is None else f'{speed:.0f}'} img/s) -> {spec['output_dir']}"
    )


def _stopped(stop: StopRequest, progress, message: str) -> int:
    if progress is not None:
        progress.close()
    print(message, file=sys.stderr)
    write_termination_message(message)
    return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
