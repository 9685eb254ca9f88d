"""One training run from a resolved run spec (docs/ARCHITECTURE.md, "Resolved run spec").

    metrics = train(spec, checkpoint_store=LocalCheckpointStore("ckpt"), progress=None)

Iteration-based, as the paper: `schedule.iterations` steps of SGD-style training with StepLR
stepped per iteration, evaluation every `eval_every` iterations and after the last one, and
the *final* iterate reported. What a run computes (setup, the step, evaluation) is
`vsgd.engine`; this module sequences it: setup, restore, the loop of steps, log points
(`log_every`, where the running sums are read back once: the loop never waits for the device
otherwise), checkpoints, and the finish (outputs, MLflow).

Resuming is exact: the checkpoint holds the model, optimizer, scheduler, every RNG state, the
data position (epoch, batch), the running sums and the rows recorded so far (curve, beta1), and
the epoch permutations are derived from (seed, epoch) rather than drawn from a stream. On CPU a
run killed at any moment and restarted ends bit-identical to one that was never interrupted
(tests/test_trainer.py). Since resuming from any checkpoint of the run is exact, a checkpoint
that cannot be read back is set aside (kept, renamed) and the run resumes from the one before
it, or from the start, and still ends bit-identical (`restore`, tests/test_damaged_state.py).

Stopping (`stop`): polled after every training step, after that step's log point where one is
due. When it asks, the trainer saves a checkpoint at the step reached (with a checkpoint store)
and raises `Stopped`; the MLflow run is marked KILLED. That checkpoint may fall inside a log
window, so it also holds the window (`vsgd.step_clock`): the step where it started, its
training seconds and compile steps so far. The resumed run's next log point then reports the
whole window's train_loss and images/s, and `seconds_per_iter` covers every timed step; the run
ends bit-identical to an uninterrupted one (tests/test_interrupt.py). `pipeline.train` turns
SIGTERM and SIGINT into this.

Compilation: with a compiled model, each process's first step compiles it; that step's time is
recorded apart (`compile_seconds`) and left out of `seconds_per_iter` and images/s
(`vsgd.step_clock`, tests/test_compile_timing.py).

Divergence: a run whose training loss becomes NaN or inf stops at the next log point and is
recorded as diverged (`metrics["diverged"]`); it counts as finished. The step records the first
non-finite loss on the device and the log point reads it with the running sums, so detecting
it costs no extra wait for the device. The model is not evaluated after that: the metrics are
those of the last finite evaluation. The authors' trainer (generativeai-tue/vsgd) instead skips
an update whose loss is NaN and stops only when the validation loss is NaN. We stop at the
first non-finite training loss, for every optimizer alike, because skipped steps are silent:
they help an unstable optimizer (it just loses some steps) and hide how often it blew up.
"""

import logging
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import engine
from .data.errors import DataError
from .data.prepared import load_prepared
from .optim import VSGD, beta1_summary
from .outputs import write_outputs
from .spec import TRAINING_DEFAULTS, ConfigError, check_spec
from .step_clock import CHECKPOINT_KEYS as CLOCK_KEYS
from .step_clock import StepClock
from .tracking import Tracker

log = logging.getLogger(__name__)


class Stopped(Exception):
    """`train` stopped because its `stop` asked: at `step` of `iterations`, with a checkpoint
    at `step` saved (`checkpointed`) unless the run has no checkpoint store."""

    def __init__(self, step: int, iterations: int, checkpointed: bool):
        self.step, self.iterations, self.checkpointed = step, iterations, checkpointed
        super().__init__(
            f"stopped at step {step}/{iterations}"
            + (": checkpoint saved" if checkpointed else ": no checkpoint store, nothing saved")
        )


def train(spec: dict, *, checkpoint_store=None, progress=None, stop=None) -> dict:
    """Run (or resume, or just report) the run of `spec`; return its final metrics.

    `checkpoint_store`: see vsgd.checkpoint; None trains without checkpoints.
    `progress(step, iterations, info)` is called at every log point with the running
    `loss`, `acc`, `lr`, `images_per_sec` and, after an evaluation, its results (what was
    not measured, such as the test set of a run with `eval_test: false` or the images/s of a
    window whose only step compiled the model, is left out); the first log point after a
    compile step also has its `compile_seconds`.
    `stop`: a `threading.Event` or a callable returning true to stop, polled after every
    training step but the last (after its log point's work, where one is due): the run then
    saves a checkpoint at the step reached, when it has a checkpoint store, and raises
    `Stopped`. Nothing polls it before the first step, so setup is not interrupted by it.
    Raises `vsgd.spec.ConfigError` for an invalid spec, before any work.
    """
    tracker = Tracker.from_spec(spec)
    run, training = setup(spec)
    if run.denormals not in (None, training["denormals"]):
        log.warning(
            "training.denormals is %s, but this process's CPU threads %s",
            training["denormals"],
            {"keep": "keep them", "flush": "flush them", "mixed": "do both"}[run.denormals],
        )
    state, timing = restore(spec, run, checkpoint_store)
    stop_requested = _poller(stop)
    tracker.start(spec, run_id=state.mlflow_run_id, cuda=run.device.type == "cuda")
    status = "FAILED"
    try:
        # `build` compiles the model (compile true, or auto on CUDA) into `forward`, the
        # wrapper torch.compile returns, which keeps the model as `_orig_mod`.
        to_compile = getattr(run.forward, "_orig_mod", None) is run.model
        clock = StepClock(state.step, timing)
        while state.step < run.iterations:
            if to_compile:
                lr = clock.compile_step(engine.train_step, run, state)
                to_compile = False
            else:
                lr = engine.train_step(run, state)
            due = _Due.at(state.step, run, training, checkpoint_store)
            if due:
                log_point(run, state, lr, due, clock, tracker, progress)
                if state.diverged:
                    break  # no evaluation, no checkpoint of the diverged model
                if due.checkpoint:
                    carried = clock.record(state, inside_window=False)
                    save_checkpoint(spec, run, state, tracker, checkpoint_store, carried)
                clock.restart(state.step)
            # Not after the last step: finishing takes no longer than a checkpoint would.
            if state.step < run.iterations and stop_requested():
                saved = checkpoint_store is not None
                if saved and not due.checkpoint:
                    # After a log point the window is closed (it starts at this step).
                    carried = clock.record(state, inside_window=not due)
                    save_checkpoint(spec, run, state, tracker, checkpoint_store, carried)
                raise Stopped(state.step, run.iterations, saved)
        metrics = finish(spec, run, state, tracker, clock)
        status = "FINISHED"
        return metrics
    except (KeyboardInterrupt, SystemExit, Stopped):
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def _poller(stop):
    """`stop` as a function of no arguments (an Event's `is_set`); never true for None."""
    if stop is None:
        return lambda: False
    return stop.is_set if hasattr(stop, "is_set") else stop


def setup(spec: dict) -> tuple[engine.Run, dict]:
    """Check the spec, load its data (every array verified against its manifest's sha256,
    once per process and file: `load_prepared`) and check it is the spec's (the manifest
    checksum), build the run; also return the training keys with their defaults filled in."""
    problems = check_spec(spec)
    if problems:
        raise ConfigError(problems)
    training = {**TRAINING_DEFAULTS, **spec.get("training", {})}
    data = load_prepared(spec["data"]["dir"])
    expected = spec["data"].get("checksum")
    if expected and expected != data.manifest["checksum"]:
        raise DataError(
            f"{spec['data']['dir']} holds data with checksum "
            f"{data.manifest['checksum']}, the spec expects {expected}"
        )
    return engine.build(spec, training, data), training


# What `restore` reads from a checkpoint (`save_checkpoint` writes them); one without them all
# is damaged. The clock's (`vsgd.step_clock.CHECKPOINT_KEYS`) are not among them: older
# checkpoints have none.
CHECKPOINT_KEYS = (
    "run_hash",
    "step",
    "seconds",
    "curve",
    "beta1",
    "mlflow_run_id",
    "data",
    "sums",
    "nonfinite",
    "model",
    "optimizer",
    "scheduler",
    "rng",
)


def restore(spec: dict, run: engine.Run, store) -> tuple[engine.State, dict]:
    """A fresh state, or the one of the newest intact checkpoint in the store (modules and
    RNGs restored too), and what the checkpoint carries of the step clock ({} for a fresh
    state: `vsgd.step_clock.StepClock`).

    A checkpoint that cannot be read back (truncated, empty, garbage, not the bytes saved)
    is set aside with a warning and the one before it is tried (`ckpt.newest_intact`): an
    older checkpoint, or none, only means more steps to take again, and the run still ends
    bit-identical. A checkpoint of another run is refused instead: it is intact, and
    finding it means this run was given another run's checkpoint location."""
    state = engine.new_state(run)
    found = ckpt.newest_intact(store, CHECKPOINT_KEYS) if store is not None else None
    if found is None:
        return state, {}
    saved, candidate = found
    if saved["run_hash"] != spec["run_hash"]:
        raise RuntimeError(
            f"checkpoint {candidate.where} at {store!r} belongs to run "
            f"{saved['run_hash']}, not {spec['run_hash']}: a wrong checkpoint "
            f"location (it is left as it is)"
        )
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if run.device.type == "cuda" and saved["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], run.device)
    run.aug_gen.set_state(saved["rng"]["augment"])
    state.step, state.seconds = saved["step"], saved["seconds"]
    state.curve, state.beta1 = saved["curve"], saved["beta1"]
    state.mlflow_run_id = saved["mlflow_run_id"]
    state.epoch, state.batch = saved["data"]["epoch"], saved["data"]["batch"]
    state.sums.copy_(saved["sums"])
    state.nonfinite.copy_(saved["nonfinite"])
    log.info(
        "resuming %s from its checkpoint at step %d/%d", spec["name"], state.step, run.iterations
    )
    return state, {key: saved[key] for key in CLOCK_KEYS if key in saved}


@dataclass
class _Due:
    """What happens after a step: a log point (log), with an evaluation, a checkpoint and
    VSGD's adaptive-momentum summary where those are due. Every one of them is a log point."""

    log: bool
    eval: bool
    checkpoint: bool
    beta1: bool

    @classmethod
    def at(cls, step, run, training, store):
        final = step == run.iterations
        due = cls(
            log=step % training["log_every"] == 0,
            eval=step % training["eval_every"] == 0 or final,
            checkpoint=store is not None and (step % training["checkpoint_every"] == 0 or final),
            beta1=isinstance(run.optimizer, VSGD)
            and (step % training["beta1_every"] == 0 or final),
        )
        return due

    def __bool__(self):
        return self.log or self.eval or self.checkpoint or self.beta1


def log_point(run, state, lr, due, clock, tracker, progress) -> None:
    """Read the running sums and the divergence flag back (the only sync with the device),
    close the window of training time, evaluate if due (never a diverged model), and report
    to MLflow and `progress`."""
    # One transfer for both; it waits for the window's last step, so the clock is read after
    # it (before it, on CUDA, the window would hold only the kernel launches).
    *sums, nonfinite = torch.cat(
        [state.sums.reshape(-1), state.nonfinite.to(state.sums.dtype).reshape(1)]
    ).tolist()
    images_per_sec = clock.close(state, run.batch_size)
    l_loss, l_correct, e_loss, e_correct = sums
    l_n = (state.step - clock.window_step) * run.batch_size
    e_n = (state.step - (state.curve[-1]["step"] if state.curve else 0)) * run.batch_size
    state.sums[0] = 0
    out = {
        "train_loss": l_loss / l_n,
        "train_acc": l_correct / l_n,
        "lr": lr,
        "images_per_sec": images_per_sec,
        # This process's compile step, at the first log point after it.
        "compile_seconds": clock.last_compile,
    }
    clock.last_compile = None
    if nonfinite >= 0:
        state.diverged = {"step": int(nonfinite), "stopped_at": state.step}
        log.warning(
            "training loss not finite at step %d: the run stops at step %d/%d as diverged",
            state.diverged["step"],
            state.step,
            run.iterations,
        )
        due = _Due(log=True, eval=False, checkpoint=False, beta1=False)
    if due.eval:
        state.sums[1] = 0
        out.update(engine.measure(run))
        state.curve.append(
            {
                "step": state.step,
                "test_acc": out["test_acc"],
                "test_loss": out["test_loss"],
                "val_acc": out["val_acc"],
                "train_loss": e_loss / e_n,
                "train_acc": e_correct / e_n,
                "lr": lr,
            }
        )
    if due.beta1:
        b1 = beta1_summary(run.optimizer)
        state.beta1.append({"step": state.step, **b1})
        out.update({f"beta1_{key}": value for key, value in b1.items()})
    tracker.log_metrics(out, state.step)
    tracker.flush_in_background()
    if progress is not None:
        info = {"loss": out["train_loss"], "acc": out["train_acc"], **out}
        progress(state.step, run.iterations, {k: v for k, v in info.items() if v is not None})


def save_checkpoint(spec, run, state, tracker, store, timing: dict) -> None:
    """The state at `state.step`, with `timing`, what it carries of the step clock
    (`StepClock.record`: the open log window of a checkpoint taken inside one, None at a log
    point, where the window was just closed; the compile steps). `seconds` is always that of
    the closed windows, the open one's are in the window."""
    store.save(
        ckpt.to_bytes(
            {
                "run_hash": spec["run_hash"],
                "step": state.step,
                "seconds": state.seconds,
                **timing,
                "curve": state.curve,
                "beta1": state.beta1,
                "mlflow_run_id": tracker.run_id,
                "data": {"epoch": state.epoch, "batch": state.batch},
                # -1 at a log point (a diverged run stops before its checkpoint); inside a window it
                # may hold a step for the next log point to find, as if never stopped.
                "sums": state.sums.cpu(),
                "nonfinite": state.nonfinite.cpu(),
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "augment": run.aug_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state(run.device)
                    if run.device.type == "cuda"
                    else None,
                },
            }
        )
    )


def finish(spec, run, state, tracker, clock) -> dict:
    """The final iterate's metrics, written to `output_dir` and logged as MLflow artifacts.

    A diverged run reports its last finite evaluation (None where there was none), with
    `diverged: {step: first non-finite loss, stopped_at: the log point that found it}`;
    `iterations` is always the planned number, `steps_done` the steps actually taken.

    `seconds_per_iter` is the time of the training step alone: forward, backward, optimizer
    step, batch gathering and augmentation, averaged over `timed_steps`. It is the sum of the
    windows from the end of one log point's work to the next log point's read-back of the
    running sums, the wait for the device included; evaluation, logging, beta1 summaries
    and checkpoint writes fall outside every window, and so does the compile step of each
    process with a compiled model (its seconds are `compile_seconds`, null for a model not
    compiled). After a resume the replayed steps are timed again and the lost ones not at
    all, so `timed_steps` is `steps_done` less the compile steps; with none timed (every
    process took only its compile step) `seconds_per_iter` and `images_per_sec` are null. (The
    authors' `train_time` is per step too, but leaves out the batch, which their DataLoader
    workers load and augment ahead, and holds their step's own syncs: a NaN check and the
    gradient norm read back every step, and the beta1 histogram at its logging steps.)
    """
    last = last_finite_row(state.curve, state.diverged)
    timed = clock.timed_steps(state.step)
    metrics = {
        "name": spec["name"],
        "run_hash": spec["run_hash"],
        "dataset": spec["dataset"],
        "arch": spec["arch"],
        "arch_key": spec["arch_key"],
        "optimizer": spec["optimizer"]["name"],
        "lr": spec["optimizer"]["lr"],
        "seed": run.seed,
        "iterations": run.iterations,
        "steps_done": state.step,
        "diverged": state.diverged,
        **{
            key: last.get(key)
            for key in ("test_acc", "test_loss", "train_loss", "train_acc", "val_acc")
        },
        "seconds_per_iter": state.seconds / timed if timed else None,
        "timed_steps": timed,
        "compile_seconds": clock.compile_seconds if clock.compile_steps else None,
        "device": str(run.device),
        "device_name": device_name(run.device),
        # What the CPU did with float denormals, read back in this process (`training.
        # denormals` asks; a CPU without the mode keeps them); null off CPU.
        "denormals_in_effect": run.denormals,
        "mlflow_run_id": tracker.run_id,
    }
    spi = metrics["seconds_per_iter"]
    metrics["images_per_sec"] = run.batch_size / spi if spi else None
    out_dir = Path(spec["output_dir"])
    beta1 = state.beta1 if isinstance(run.optimizer, VSGD) else None
    metrics = write_outputs(out_dir, spec, metrics, state.curve, beta1)
    if state.diverged:
        tracker.set_tags({"diverged": "true"})
    # Every result file, so that a result can be fetched back from MLflow whole.
    tracker.log_artifacts(
        [
            out_dir / name
            for name in ("config.json", "curve.csv", "beta1.csv", "metrics.json")
            if (out_dir / name).is_file()
        ]
    )
    return metrics


def last_finite_row(curve: list[dict], diverged: dict | None) -> dict:
    """The curve row the metrics report: the last one, or for a diverged run the last one
    before the first non-finite step whose numbers are all finite ({} if there is none)."""
    if diverged is None:
        return curve[-1]
    for row in reversed(curve):
        if row["step"] < diverged["step"] and all(
            math.isfinite(v) for v in row.values() if isinstance(v, float)
        ):
            return row
    return {}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor() or platform.machine() or device.type
