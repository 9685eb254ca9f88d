"""Every configuration of the protocol on this device: images/s of the training step
(`vsgd.engine.build` + `train_step`, as the timing stage times it) against the bare forward +
backward + step ceiling (one batch already on the device, nothing else), per precision, the
peak memory, and whether the training step waits for the device (a host sync: with
`torch.cuda.set_sync_debug_mode("error")` around a few steps after the warm-up).

One configuration is a dataset x architecture of params' protocol at its batch size, with
VSGD (the optimizer under study; its step is the most expensive of the grid's) and the
compile and channels_last settings of params, on synthetic images of the dataset's shape.
Each configuration is built alone (dynamo's caches cleared before it, the previous one
freed), so its peak memory is its own.
"""

import gc
import time

import torch
import torch._dynamo
import torch.nn.functional as F

from vsgd import engine
from vsgd.data import DATASETS
from vsgd.models import build_model

from ..grid import build_spec
from ..step_timing import timed_training
from .worker import synthetic_data

SYNC_CHECK_STEPS = 3


def configuration_spec(params: dict, dataset: str, arch: str, batch: int | None) -> dict:
    """The spec of a configuration (VSGD, else the grid's first optimizer), at `batch` (None:
    its protocol's batch size). The remote store is left out: where a pod would stage the
    data from plays no part and computing it hashes the dataset."""
    local = {**params, "storage": {**params["storage"], "remote": None}}
    optimizer = "vsgd" if "vsgd" in params["optimizers"] else params["optimizers"][0]
    spec = build_spec(local, dataset, arch, optimizer, 0)
    if batch is not None:
        spec["batch_size"] = batch
    return spec


def measure(spec: dict, precision: str, device, warmup: int, steps: int, log=print) -> dict:
    """One configuration at one precision: the training step, the host-sync check (CUDA),
    then the ceiling; images/s, seconds, peak memory."""
    cuda = device.type == "cuda"
    batch = spec["batch_size"]
    # Enough images that the timed steps and the sync check stay in the first epoch (a new
    # epoch copies its order to the device, once per epoch).
    data = synthetic_data(spec["dataset"], batch * (warmup + steps + SYNC_CHECK_STEPS + 1))
    _fresh(cuda)
    start = time.perf_counter()
    training = timed_training(spec, device, precision=precision)
    run = engine.build(spec, training, data)
    state = engine.new_state(run)
    for _ in range(warmup):
        engine.train_step(run, state)
    _sync(device)
    setup = time.perf_counter() - start
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.train_step(run, state)
    _sync(device)
    step_seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    host_sync = _host_sync(run, state) if cuda else None
    compiled = run.forward is not run.model
    channels_last = any(
        p.dim() == 4
        and p.is_contiguous(memory_format=torch.channels_last)
        and not p.is_contiguous()
        for p in run.model.parameters()
    )
    del run, state
    ceiling = _ceiling(spec, training, warmup, steps, compiled, channels_last)
    row = {
        "dataset": spec["dataset"],
        "arch": spec["arch_key"],
        "model": spec["arch"],
        "optimizer": spec["optimizer"]["name"],
        "batch_size": batch,
        "precision": precision,
        "compiled": compiled,
        "channels_last": channels_last,
        "step_seconds": step_seconds,
        "images_per_sec": batch / step_seconds,
        "ceiling_images_per_sec": ceiling,
        "ratio_to_ceiling": batch / step_seconds / ceiling,
        "setup_seconds": setup,
        "warmup": warmup,
        "peak_memory_mib": peak,
        "host_sync": host_sync,
    }
    log(
        f"  {spec['dataset']:<12} {spec['arch']:<16} {precision:<4} batch {batch:<4} "
        f"{row['images_per_sec']:9.1f} img/s, ceiling {ceiling:9.1f} "
        f"({row['ratio_to_ceiling']:.2f})"
        + (f", peak {peak:.0f} MiB" if peak is not None else "")
        + (f", host sync: {host_sync}" if host_sync else "")
        + f", setup {setup:.1f} s"
    )
    return row


def _host_sync(run, state) -> str | None:
    """None when a few training steps never wait for the device, else what waited (the
    first line of torch's error)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(SYNC_CHECK_STEPS):
            engine.train_step(run, state)
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return None


def _ceiling(spec, training, warmup, steps, compiled, channels_last) -> float:
    """Forward + backward + step on one batch already on the device, in the memory format,
    compilation, precision, determinism and denormal mode of the training step; images/s."""
    precision, device = training["precision"], torch.device(training["device"])
    engine.set_float32_precision(precision)
    engine.set_determinism(training["deterministic"])
    engine.set_denormals(training["denormals"])
    info = DATASETS[spec["dataset"]]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(spec["arch"], info.num_classes, info.image_size).to(
        device, memory_format=fmt
    )
    optimizer = engine.make_optimizer(model.parameters(), spec["optimizer"])
    forward = torch.compile(model) if compiled else model
    batch = spec["batch_size"]
    x = torch.randn(batch, 3, info.image_size, info.image_size, device=device).contiguous(
        memory_format=fmt
    )
    y = torch.randint(0, info.num_classes, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def release(device) -> None:
    """Give back what this process holds of the device (before other processes use it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fresh(cuda: bool) -> None:
    """Nothing of the previous configuration left: its memory, its compiled graphs (a new
    model of a class compiled before would count against dynamo's recompile limit)."""
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
