"""One training run from a resolved run spec (docs/ARCHITECTURE.md, "Resolved run spec").

    metrics = train(spec, checkpoint_store=LocalCheckpointStore("ckpt"), progress=None)

Iteration-based, as the paper: `schedule.iterations` steps of SGD-style training with StepLR
stepped per iteration, evaluation every `eval_every` iterations and after the last one, and
the *final* iterate reported. What a run computes (setup, the step, evaluation) is
`vsgd.engine`; this module sequences it: setup, restore, the loop of steps, log points
(`log_every`, where the running sums are read back once: the loop never waits for the device
otherwise), checkpoints, and the finish (outputs, MLflow).

Resuming is exact: the checkpoint holds the model, optimizer, scheduler, every RNG state, the
data position (epoch, batch) and the running sums, and the epoch permutations are derived from
(seed, epoch) rather than drawn from a stream. On CPU a run killed at any moment and restarted
ends bit-identical to one that was never interrupted (tests/test_trainer.py).
"""

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import engine
from .data import DataError, load_prepared
from .files import atomic_write
from .optim import VSGD, beta1_summary
from .spec import TRAINING_DEFAULTS, ConfigError, check_spec
from .tracking import Tracker

log = logging.getLogger(__name__)

CURVE_COLUMNS = ("step", "test_acc", "test_loss", "val_acc", "train_loss", "train_acc", "lr")


def train(spec: dict, *, checkpoint_store=None, progress=None) -> dict:
    """Run (or resume, or just report) the run of `spec`; return its final metrics.

    `checkpoint_store`: see vsgd.checkpoint; None trains without checkpoints.
    `progress(step, iterations, info)` is called at every log point with the running
    `loss`, `acc`, `lr`, `images_per_sec` and, after an evaluation, its results.
    Raises `vsgd.spec.ConfigError` for an invalid spec, before any work.
    """
    run, training = setup(spec)
    state = restore(spec, run, checkpoint_store)
    tracker = Tracker.from_spec(spec)
    tracker.start(spec, run_id=state.mlflow_run_id)
    status = "FAILED"
    try:
        clock = _Clock(state)
        while state.step < run.iterations:
            lr = engine.train_step(run, state)
            due = _Due.at(state.step, run, training, checkpoint_store)
            if due:
                log_point(run, state, lr, due, clock, tracker, progress)
                if due.checkpoint:
                    save_checkpoint(spec, run, state, tracker, checkpoint_store)
                clock.restart(state)
        metrics = finish(spec, run, state, tracker)
        status = "FINISHED"
        return metrics
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def setup(spec: dict) -> tuple[engine.Run, dict]:
    """Check the spec, load and verify its data, build the run; also return the training
    keys with their defaults filled in."""
    problems = check_spec(spec)
    if problems:
        raise ConfigError(problems)
    training = {**TRAINING_DEFAULTS, **spec.get("training", {})}
    data = load_prepared(spec["data"]["dir"])
    expected = spec["data"].get("checksum")
    if expected and expected != data.manifest["checksum"]:
        raise DataError(f"{spec['data']['dir']} holds data with checksum "
                        f"{data.manifest['checksum']}, the spec expects {expected}")
    return engine.build(spec, training, data), training


def restore(spec: dict, run: engine.Run, store) -> engine.State:
    """A fresh state, or the one in the checkpoint store (modules and RNGs restored too)."""
    state = engine.new_state(run)
    saved = store.load() if store is not None else None
    if saved is None:
        return state
    saved = ckpt.from_bytes(saved)
    if saved["run_hash"] != spec["run_hash"]:
        raise RuntimeError(f"checkpoint at {store!r} belongs to run {saved['run_hash']}, "
                           f"not {spec['run_hash']}")
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if run.device.type == "cuda" and saved["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], run.device)
    run.aug_gen.set_state(saved["rng"]["augment"])
    state.step, state.seconds = saved["step"], saved["seconds"]
    state.curve, state.mlflow_run_id = saved["curve"], saved["mlflow_run_id"]
    state.epoch, state.batch = saved["data"]["epoch"], saved["data"]["batch"]
    state.sums.copy_(saved["sums"])
    log.info("resuming %s from its checkpoint at step %d/%d", spec["name"], state.step,
             run.iterations)
    return state


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
        due = cls(log=step % training["log_every"] == 0,
                  eval=step % training["eval_every"] == 0 or final,
                  checkpoint=store is not None and (
                      step % training["checkpoint_every"] == 0 or final),
                  beta1=isinstance(run.optimizer, VSGD) and (
                      step % training["beta1_every"] == 0 or final))
        return due

    def __bool__(self):
        return self.log or self.eval or self.checkpoint or self.beta1


class _Clock:
    """The loop's wall time (log points included, checkpoint writes left out) and the start
    of the current logging window, for images/s."""

    def __init__(self, state):
        self.restart(state)

    def restart(self, state):
        self.start = time.perf_counter()
        self.window_step = state.step


def log_point(run, state, lr, due, clock, tracker, progress) -> None:
    """Read the running sums back (the only sync with the device), evaluate if due, and
    report to MLflow and `progress`."""
    now = time.perf_counter()
    (l_loss, l_correct), (e_loss, e_correct) = state.sums.tolist()
    l_n = (state.step - clock.window_step) * run.batch_size
    e_n = (state.step - (state.curve[-1]["step"] if state.curve else 0)) * run.batch_size
    state.sums[0] = 0
    out = {"train_loss": l_loss / l_n, "train_acc": l_correct / l_n, "lr": lr,
           "images_per_sec": l_n / (now - clock.start)}
    if due.eval:
        state.sums[1] = 0
        out.update(engine.measure(run))
        state.curve.append({"step": state.step, "test_acc": out["test_acc"],
                            "test_loss": out["test_loss"], "val_acc": out["val_acc"],
                            "train_loss": e_loss / e_n, "train_acc": e_correct / e_n,
                            "lr": lr})
    if due.beta1:
        b1 = beta1_summary(run.optimizer)
        out["beta1_median"], out["beta1_mean"] = b1["median"], b1["mean"]
    tracker.log_metrics(out, state.step)
    tracker.flush_in_background()
    if progress is not None:
        progress(state.step, run.iterations,
                 {"loss": out["train_loss"], "acc": out["train_acc"], **out})
    state.seconds += time.perf_counter() - clock.start


def save_checkpoint(spec, run, state, tracker, store) -> None:
    store.save(ckpt.to_bytes({
        "run_hash": spec["run_hash"], "step": state.step, "seconds": state.seconds,
        "curve": state.curve, "mlflow_run_id": tracker.run_id,
        "data": {"epoch": state.epoch, "batch": state.batch},
        "sums": state.sums.cpu(), "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "augment": run.aug_gen.get_state(),
                "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda"
                else None},
    }))


def finish(spec, run, state, tracker) -> dict:
    """The final iterate's metrics, written to `output_dir` and logged as MLflow artifacts."""
    last = state.curve[-1]
    metrics = {
        "name": spec["name"], "run_hash": spec["run_hash"], "dataset": spec["dataset"],
        "arch": spec["arch"], "arch_key": spec["arch_key"],
        "optimizer": spec["optimizer"]["name"], "lr": spec["optimizer"]["lr"],
        "seed": run.seed, "iterations": run.iterations,
        "test_acc": last["test_acc"], "test_loss": last["test_loss"],
        "train_loss": last["train_loss"], "train_acc": last["train_acc"],
        "val_acc": last["val_acc"],
        "seconds_per_iter": state.seconds / run.iterations,
        "device": str(run.device), "device_name": device_name(run.device),
        "mlflow_run_id": tracker.run_id,
    }
    metrics["images_per_sec"] = run.batch_size / metrics["seconds_per_iter"]
    out_dir = Path(spec["output_dir"])
    write_outputs(out_dir, spec, metrics, state.curve)
    tracker.log_artifacts([out_dir / "config.json", out_dir / "metrics.json"])
    return metrics


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


def write_outputs(out_dir: Path, spec: dict, metrics: dict, curve: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [",".join(CURVE_COLUMNS)]
    rows += [",".join("" if row[c] is None else repr(row[c]) for c in CURVE_COLUMNS)
             for row in curve]
    atomic_write(out_dir / "curve.csv", "\n".join(rows) + "\n")
    atomic_write(out_dir / "config.json", json.dumps(spec, indent=2) + "\n")
    # metrics.json last: its presence (with the run hash) marks the run as done.
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
