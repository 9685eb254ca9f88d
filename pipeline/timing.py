"""Time the training step of every configuration of the grid in one process on one device.

Table 2 of the paper compares the optimizers' cost per iteration. The grid's runs measure
their own step time, but they may run on different machines (pods, GPUs, loaded CPUs), so
their times compare poorly across optimizers. This stage measures every dataset x
architecture x optimizer of the grid (the model, batch size, optimizer arguments and
training precision of `pipeline.grid.build_spec`, on the prepared dataset) on one device, in
one process, interleaved: for each of `timing.rounds` rounds, for each configuration in
turn, `timing.warmup` untimed steps, then `timing.steps` timed steps of the real training
step (`vsgd.engine.train_step`), the device synchronised before each clock read. Load from
other processes then falls on every configuration alike. Reported per configuration: the
median over rounds of the seconds per step, and its ratio to SGD's on the same dataset and
architecture (what Table 2 shows first).

The learning rate and seed do not matter for the time of a step (each configuration uses
the grid's lr and seed 0). The built runs stay alive across rounds (a torch.compile'd model is
compiled once); their training images are one copy per dataset on the device, shared by
every configuration of that dataset, so memory grows only with the models and optimizer
states.

    python -m pipeline timing [--set timing.steps=20] [--out results/timing]

Writes `<out>/timing.csv` (one row per configuration) and `<out>/timing.json` (the same
rows with every round's seconds, and the settings and device).
"""

import statistics
import time
from pathlib import Path

import torch

from vsgd import engine
from vsgd.data.prepared import load_prepared
from vsgd.spec import ConfigError
from vsgd.trainer import device_name

from . import step_timing
from .config import add_params_arguments, load_params
from .grid import build_spec
from .timing_results import write

OUT = Path("results/timing")


def add_arguments(parser):
    add_params_arguments(parser)
    parser.add_argument(
        "--out", default=str(OUT), help=f"directory for timing.csv and timing.json (default: {OUT})"
    )


def run(args) -> int:
    params = load_params(args.params, args.set)
    result = measure(params, log=lambda text: print(text, flush=True))
    write(result, Path(args.out))
    print(f"timing: {len(result['rows'])} configurations -> {args.out}/timing.csv")
    return 0


class _Config:
    """One configuration of the grid: its spec, and once built, its run and state."""

    def __init__(self, spec):
        self.spec = spec
        self.run = None
        self.state = None
        self.seconds = []  # per round: seconds per step

    @property
    def key(self):
        return self.spec["dataset"], self.spec["arch_key"], self.spec["optimizer"]["name"]


def configurations(params: dict) -> list[_Config]:
    """Every dataset x architecture x optimizer of the grid, in the grid's order."""
    # The spec's location of a dataset in a remote store plays no part here (and would
    # hash every file of it).
    local = {**params, "storage": {**params["storage"], "remote": None}}
    configs = [
        _Config(build_spec(local, ds, arch, opt, 0))
        for ds in params["datasets"]
        for arch in params["archs"]
        for opt in params["optimizers"]
    ]
    unprepared = sorted({c.spec["dataset"] for c in configs if c.spec["data"]["checksum"] is None})
    if unprepared:
        raise ConfigError(
            [
                f"timing: no prepared data for {', '.join(unprepared)}; run "
                "`dvc repro` (its prepare stage) or `python -m pipeline prepare "
                f"{unprepared[0]}` first"
            ]
        )
    return configs


def resolve_device(name: str):
    try:
        device = engine.resolve_device(name)
    except ConfigError:
        raise ConfigError(
            [
                f"timing.device: {name!r} but CUDA is not available here; "
                "allowed: auto, cpu, cuda, cuda:N, mps"
            ]
        ) from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def measure(params: dict, log=None) -> dict:
    """Time every configuration (see the module docstring); the rows and settings."""

    log = log or (lambda text: None)
    settings = params["timing"]
    steps, warmup, rounds = settings["steps"], settings["warmup"], settings["rounds"]
    configs = configurations(params)
    device = resolve_device(settings["device"])
    name = device_name(device)
    _static_compiles(len(configs))
    log(
        f"timing: {len(configs)} configurations on {device} ({name}), {rounds} round(s) of "
        f"{steps} timed steps after {warmup} warm-up steps each, interleaved"
    )
    shared = {}  # dataset -> its training images and labels on the device
    for r in range(rounds):
        start = time.perf_counter()
        for c in configs:
            if c.run is None:
                c.run, c.state = _build(c.spec, device, shared)
            step_timing.run_steps(c.run, c.state, warmup)
            c.seconds.append(step_timing.time_steps(c.run, c.state, steps))
            # The gradients are not needed between blocks: memory holds models and optimizer
            # states only.
            c.run.optimizer.zero_grad(set_to_none=True)
        log(f"timing: round {r + 1}/{rounds} done in {time.perf_counter() - start:.1f} s")
    rows = []
    median = {c.key: statistics.median(c.seconds) for c in configs}
    for c in configs:
        ds, arch, opt = c.key
        sgd = median.get((ds, arch, "sgd"))
        seconds = median[c.key]
        rows.append(
            {
                "dataset": ds,
                "arch": arch,
                "model": c.spec["arch"],
                "optimizer": opt,
                "batch_size": c.spec["batch_size"],
                "seconds_per_step": seconds,
                "images_per_sec": c.spec["batch_size"] / seconds,
                "ratio_to_sgd": None if sgd is None else seconds / sgd,
                "rounds": rounds,
                "steps": steps,
                "warmup": warmup,
                "device": str(device),
                "device_name": name,
                "precision": c.spec["training"]["precision"],
                "torch_version": torch.__version__,
                "round_seconds": list(c.seconds),
            }
        )
    for c in configs:  # free the models before the caller goes on
        c.run = c.state = None
    log(_summary(rows))
    return {
        "device": str(device),
        "device_name": name,
        "precision": ", ".join(sorted({row["precision"] for row in rows})),
        "torch_version": torch.__version__,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "rows": rows,
    }


def _build(spec, device, shared):
    """The run of `spec` on `device` and its fresh state, with the training images of its
    dataset shared with the configurations built before (`shared`, filled here)."""

    ds = spec["dataset"]
    if ds in shared:
        data = shared[ds]["data"]
    else:
        data = load_prepared(spec["data"]["dir"])
    run, state = step_timing.build(spec, device, data)
    if ds in shared:
        # One copy of the images per dataset on the device; this run's own copy is freed.
        run.train_x, run.train_y = shared[ds]["x"], shared[ds]["y"]
    else:
        shared[ds] = {"data": data, "x": run.train_x, "y": run.train_y}
    return run, state


def _static_compiles(n: int) -> None:
    """A run compiles its one model with static shapes, alone in its process. Here one
    process compiles every model of the grid, the same model class at two image sizes: keep
    each compile static (no shapes made dynamic on the second size) and allow a cache entry
    per configuration (else dynamo falls back to eager after its limit)."""
    try:
        import torch._dynamo
    except ImportError:
        return
    config = torch._dynamo.config
    config.automatic_dynamic_shapes = False
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, key):
            setattr(config, key, max(getattr(config, key), n))
            break


def _summary(rows) -> str:
    lines = [
        f"{'dataset':<13} {'model':<16} {'optimizer':<9} {'batch':>5} {'s/step':>9} {'x SGD':>6}"
    ]
    for row in rows:
        ratio = "" if row["ratio_to_sgd"] is None else f"{row['ratio_to_sgd']:.2f}"
        lines.append(
            f"{row['dataset']:<13} {row['model']:<16} {row['optimizer']:<9} "
            f"{row['batch_size']:>5} {row['seconds_per_step']:>9.4f} {ratio:>6}"
        )
    return "\n".join(lines)
