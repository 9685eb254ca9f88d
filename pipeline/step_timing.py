"""The training step of a run, timed: the run built from its spec as a timed run is (the keys
that change what a step computes from the spec, the rest at their defaults), untimed steps,
timed steps with the device synchronised before each clock read.

The timing stage (`pipeline.timing`, Table 2) and the estimate a stage gives before its runs
start (`pipeline.estimate`) both time steps this way.
"""

import time

import torch

from vsgd import engine
from vsgd.spec import TRAINING_DEFAULTS

# The training keys that change what a step computes (the rest decide when to evaluate, log
# or save, and which images are held out or evaluated): the spec's values are timed, the
# others take their defaults (no validation split, one test image on the device).
TIMED_TRAINING = ("precision", "compile", "channels_last", "deterministic", "denormals")


def timed_training(spec: dict, device, **override) -> dict:
    """The training keys a timed run of `spec` is built with, on `device`; `override` sets
    any of them (e.g. `compile=False`)."""
    timed = {k: spec["training"][k] for k in TIMED_TRAINING if k in spec["training"]}
    return {
        **TRAINING_DEFAULTS,
        **timed,
        "device": str(device),
        "validation_size": 0,
        "test_limit": 1,
        **override,
    }


def build(spec: dict, device, data, **override):
    """(run, fresh state) of `spec` on `device` with `data` (its `Prepared` dataset);
    `override`: training keys, as `timed_training`."""
    run = engine.build(spec, timed_training(spec, device, **override), data)
    return run, engine.new_state(run)


def run_steps(run, state, steps: int) -> None:
    """`steps` untimed training steps (a warm-up)."""
    for _ in range(steps):
        engine.train_step(run, state)


def time_steps(run, state, steps: int) -> float:
    """Seconds per step of `steps` training steps, the device synchronised before each
    clock read."""
    sync(run.device)
    t0 = time.perf_counter()
    run_steps(run, state, steps)
    sync(run.device)
    return (time.perf_counter() - t0) / steps


def step_seconds(run, state, steps: int, enough) -> list[float]:
    """Each step's seconds, one step after another, for up to `steps` steps, fewer once
    `enough(seconds so far)` says so (asked after each step)."""
    seconds = []
    while len(seconds) < steps and not (seconds and enough(seconds)):
        seconds.append(time_steps(run, state, 1))
    return seconds


def sync(device) -> None:
    """Wait for the work queued on `device` (CUDA, MPS; the CPU runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
