"""What a run computes: its setup from a spec, one training step, and evaluation.

This module is part of the code version (`vsgd.spec.RESULT_MODULES`): a change here is a new
identity for every run. `vsgd.trainer` sequences these pieces (restore, log points,
checkpoints, outputs) without touching the numbers.

The whole dataset lives on the device as uint8; every batch is gathered by index, augmented
and normalised there. The epoch permutations are derived from (seed, epoch) rather than drawn
from a stream, so a resumed run needs only its position to continue exactly.
"""

import ctypes
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .data import Augmenter, DATASETS
from .models import build_model
from .optim import VSGD
from .spec import IMPORTED_CLASS, ConfigError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "vsgd": VSGD}
# VSGD's `implementation` (vsgd.spec.VSGD_IMPLEMENTATIONS) as the constructor's flags; `auto`
# leaves the choice to VSGD (multi-tensor where all parameters share a device type).
VSGD_IMPLEMENTATION_FLAGS = {"auto": {}, "single": {"foreach": False},
                             "foreach": {"foreach": True}, "fused": {"fused": True}}
# The validation split is the same for every run of a dataset (all seeds and lrs), so an lr
# chosen on it is chosen on one fixed held-out set.
VALIDATION_SEED = 20240409
# cuBLAS is deterministic only with a fixed workspace per stream (torch's reproducibility
# notes): 8 buffers of 4096 KiB, 32 MiB per stream (PyTorch's default size on Hopper, 8 MiB
# on other GPUs).
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# The OpenMP runtime whose threads run PyTorch's CPU kernels on Linux (GNU's, shipped with
# PyTorch's wheels): `set_denormals` sets the mode in each of its threads.
OPENMP_RUNTIME = "libgomp.so.1"
# at::internal::GRAIN_SIZE: an elementwise op of N elements runs in min(threads, N / grain)
# threads, each taking one part.
GRAIN_SIZE = 32768


@dataclass
class Run:
    """Everything a run computes with, built once by `build`."""
    device: torch.device
    model: torch.nn.Module
    forward: torch.nn.Module          # the model, compiled where that pays
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    augmenter: Augmenter
    aug_gen: torch.Generator
    autocast: object                  # () -> context manager
    train_x: torch.Tensor             # uint8 NHWC on the device
    train_y: torch.Tensor
    test_x: torch.Tensor | None       # None when the run must not see the test set
    test_y: torch.Tensor | None
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None
    batch_size: int
    seed: int
    iterations: int
    eval_batch_size: int
    denormals: str | None = None      # what the CPU does with them, read back; None off CPU

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_x) // self.batch_size  # the last partial batch is dropped


@dataclass
class State:
    """Where a run is; with the modules' state dicts and RNG states, what a checkpoint holds.

    `sums`: running loss*n and correct predictions, row 0 since the last log point (a
    checkpoint taken between log points, on a stop request, also records where that window
    began: vsgd.trainer), row 1 since the last evaluation. `nonfinite`: the first step whose
    training loss was NaN or inf, -1 while there is none; like `sums` it stays on the device
    and is read back at log points only. `seconds`: wall time of the training steps so far.
    `curve`: one row per evaluation; `beta1`: one row per adaptive-momentum summary.
    `diverged`: set by the trainer at the log point that found `nonfinite` set. `perm`: the
    current epoch's order (derived from `epoch`, never saved).
    """
    sums: torch.Tensor
    nonfinite: torch.Tensor
    step: int = 0
    epoch: int = 0
    batch: int = 0
    seconds: float = 0.0
    curve: list = field(default_factory=list)
    beta1: list = field(default_factory=list)
    diverged: dict | None = None
    mlflow_run_id: str | None = None
    perm: torch.Tensor | None = None


def make_optimizer(params, opt: dict) -> torch.optim.Optimizer:
    if IMPORTED_CLASS in opt:   # named by import path: imported, version checked, built
        from .imported_optimizers import make
        return make(opt, params)
    args = {k: v for k, v in opt.items() if k != "name"}
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    if "implementation" in args:  # VSGD's: a spec key, not a constructor argument
        args.update(VSGD_IMPLEMENTATION_FLAGS[args.pop("implementation")])
    return OPTIMIZERS[opt["name"]](params, **args)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"training.device: {name!r} but CUDA is not available here"])
    return device


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of `epoch`: a function of (seed, epoch) alone, so resuming needs
    only the epoch number, and CPU and GPU runs see the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor `t` on `device`, copied without waiting for the work queued there: a
    blocking copy would wait for every step before it to finish. On CUDA from pinned memory
    (from pageable memory the driver may wait anyway), whose allocator keeps the block until
    the copy has run."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def split_validation(x: np.ndarray, y: np.ndarray, size: int):
    """(train_x, train_y, val_x, val_y): `size` random images held out, the rest kept in
    their original order."""
    if size == 0:
        return x, y, None, None
    if size >= len(x):
        raise ConfigError([f"training.validation_size: {size} leaves no training images "
                           f"(the training split has {len(x)})"])
    held = np.zeros(len(x), dtype=bool)
    held[np.random.default_rng(VALIDATION_SEED).permutation(len(x))[:size]] = True
    return x[~held], y[~held], x[held], y[held]


def set_float32_precision(precision: str) -> None:
    """TF32 on (`tf32`) or off (`fp32`, `bf16`) for float32 matmuls and cuDNN convolutions.

    `fp32` is strict float32, as on the paper's RTX 2080 Ti, which has no TF32. It has to be
    asked for: PyTorch runs cuDNN convolutions in TF32 by default on Ampere and later, which
    rounds their inputs to 10 mantissa bits. Under `bf16` autocast what stays float32 is kept
    strict too. The flags are process-wide, so every run sets all three: nothing of an
    earlier run in the same process carries over.
    """
    tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def set_determinism(deterministic: bool) -> None:
    """Deterministic CUDA kernels (`True`), or the fastest ones (`False`).

    On: `torch.use_deterministic_algorithms` (which also puts torch.compile's inductor in its
    deterministic mode: no on-device benchmarking that can change numerics, so a resumed
    process compiles the same kernels), cuDNN's deterministic algorithms and no cuDNN
    benchmarking. `warn_only`: an op without a deterministic CUDA kernel warns in the run's
    log instead of failing the run; the models' ops all have one (docs/performance.md).
    Off: cuDNN benchmarks and picks the fastest algorithm per shape, which may round
    differently in another process. CPU kernels give the same bits either way. Process-wide
    flags: every run sets all of them, so nothing of an earlier run carries over.

    `CUBLAS_WORKSPACE_CONFIG` goes into this process's environment when it is unset (a value
    given from outside is kept): PyTorch reads it when the process first calls cuBLAS, and a
    run's first cuBLAS call comes after this (the model's first forward). Set whatever
    `deterministic` says: once cuBLAS has started it cannot change, and a later run of this
    process may be deterministic. It only sizes cuBLAS's workspace; child processes inherit it
    harmlessly.
    """
    os.environ.setdefault(*CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def set_denormals(denormals: str) -> None:
    """Float denormals flushed to zero on CPU (`flush`), or computed with (`keep`).

    A CPU step whose activations or optimizer state underflow into denormals runs several
    times slower (x86's microcode assist per operation); flushed, they are zero. What
    `torch.set_flush_denormal` sets (x86's FTZ and DAZ, AArch64's FZ) is a register of the
    calling thread, and OpenMP's threads keep the one they were started with, so each thread
    of PyTorch's OpenMP team sets it too (GNU's runtime; with another, only this thread does,
    and `denormals_in_effect` says so). CUDA kernels are untouched: they keep their own
    behaviour (docs/performance.md). Process-wide: every run sets it, so nothing of an
    earlier run in the same process carries over.
    """
    flush = denormals == "flush"
    torch.set_flush_denormal(flush)  # False where the CPU has no such mode: the probe tells
    threads = torch.get_num_threads()
    if threads == 1:
        return  # this thread runs every CPU kernel
    try:
        # The runtime already loaded (never a second one), GOMP_parallel(fn, data, threads,
        # flags): a parallel region in which each thread of the team, this one too, sets its
        # own mode. ctypes releases the GIL for the call; each thread takes it for `fn`.
        parallel = ctypes.CDLL(OPENMP_RUNTIME, mode=os.RTLD_NOLOAD).GOMP_parallel
    except (OSError, AttributeError):  # not loaded, or not Linux: this thread's mode only
        return
    each = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(flush))
    parallel(each, None, ctypes.c_uint(threads), ctypes.c_uint(0))


def denormals_in_effect() -> str:
    """What this process's CPU kernels do with a float32 denormal, read back from all of
    PyTorch's threads: `flush` (each computes it as zero), `keep`, or `mixed` (some do)."""
    n = 2 * GRAIN_SIZE * torch.get_num_threads()  # every thread multiplies a part
    # 2**-127 made from its bits (arithmetic could flush it), times one; the product's bits
    # compared as integers (a float comparison may itself read a denormal as zero).
    tiny = torch.full((n,), 1 << 22, dtype=torch.int32).view(torch.float32)
    flushed = int((tiny * 1.0).view(torch.int32).eq(0).sum())
    return "flush" if flushed == n else "keep" if flushed == 0 else "mixed"


def build(spec: dict, training: dict, data) -> Run:
    """The modules and on-device data of `spec`'s run; `data` is its `Prepared` dataset and
    `training` its training keys with defaults filled in."""
    device = resolve_device(training["device"])
    # Before anything is built or compiled: compiled kernels may depend on the flags.
    set_float32_precision(training["precision"])
    set_determinism(training["deterministic"])
    set_denormals(training["denormals"])
    channels_last = training["channels_last"] is True or (
        training["channels_last"] == "auto" and device.type in ("cpu", "cuda"))  # faster
    # Compiling costs ~50 s on CPU for a few % at best: only where it pays (CUDA).
    compile_model = training["compile"] is True or (training["compile"] == "auto"
                                                    and device.type == "cuda")
    bs, seed = spec["batch_size"], spec["seed"]

    train_x, train_y, val_x, val_y = split_validation(data.train_x, data.train_y,
                                                      training["validation_size"])
    test_x, test_y = data.test_x, data.test_y
    if training["test_limit"]:
        test_x, test_y = test_x[:training["test_limit"]], test_y[:training["test_limit"]]
    if not training["eval_test"]:
        # A tuning run: the test set is not even put on the device, so nothing can read it.
        test_x = test_y = None
    if bs > len(train_x):
        raise ConfigError([f"batch_size: {bs} exceeds the {len(train_x)} training images"])

    def on_device(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

    info = DATASETS[spec["dataset"]]
    torch.manual_seed(seed)
    model = build_model(spec["arch"], info.num_classes, info.image_size)
    model = model.to(device, memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format)
    optimizer = make_optimizer(model.parameters(), spec["optimizer"])
    amp_dtype = torch.bfloat16 if training["precision"] == "bf16" else None
    return Run(
        device=device, model=model,
        forward=torch.compile(model) if compile_model else model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, spec["schedule"]["step_size"],
                                                  spec["schedule"]["gamma"]),
        augmenter=Augmenter(spec["dataset"], device, channels_last=channels_last),
        aug_gen=torch.Generator(device).manual_seed(seed),
        autocast=lambda: torch.autocast(device.type, dtype=amp_dtype,
                                        enabled=amp_dtype is not None),
        train_x=on_device(train_x), train_y=on_device(train_y),
        test_x=on_device(test_x), test_y=on_device(test_y),
        val_x=on_device(val_x), val_y=on_device(val_y),
        batch_size=bs, seed=seed, iterations=spec["schedule"]["iterations"],
        eval_batch_size=training["eval_batch_size"],
        denormals=denormals_in_effect() if device.type == "cpu" else None)


def new_state(run: Run) -> State:
    # float64 sums keep the running means exact over thousands of steps; MPS has no float64.
    dtype = torch.float32 if run.device.type == "mps" else torch.float64
    return State(sums=torch.zeros(2, 2, device=run.device, dtype=dtype),
                 nonfinite=torch.full((), -1, device=run.device, dtype=torch.int64))


def train_step(run: Run, state: State) -> float:
    """One iteration: the next batch of the epoch order, forward, backward, update, StepLR,
    the running sums, and `nonfinite` if this is the first step with a NaN or inf loss.
    Returns the lr the step used. Never waits for the device."""
    if state.perm is None:  # a new or resumed run
        state.perm = to_device(epoch_permutation(len(run.train_x), run.seed, state.epoch),
                               run.device)
    if state.batch == run.batches_per_epoch:
        state.epoch, state.batch = state.epoch + 1, 0
        state.perm = to_device(epoch_permutation(len(run.train_x), run.seed, state.epoch),
                               run.device)
    bs = run.batch_size
    idx = state.perm[state.batch * bs:(state.batch + 1) * bs]
    x, y = run.augmenter.train(run.train_x[idx], run.aug_gen), run.train_y[idx]
    with run.autocast():
        logits = run.forward(x)
        loss = F.cross_entropy(logits, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    state.sums += torch.stack([loss.detach() * bs,
                               (logits.argmax(1) == y).sum()]).to(state.sums.dtype)
    # A tensor op, not an `if`: testing the loss on the host would wait for the device.
    state.nonfinite.masked_fill_((state.nonfinite < 0) & ~torch.isfinite(loss.detach()),
                                 state.step + 1)
    state.step, state.batch = state.step + 1, state.batch + 1
    return lr


@torch.no_grad()
def evaluate(model, x, y, augmenter, batch_size, autocast) -> tuple[float, float]:
    """(mean loss, accuracy) over uint8 images `x` already on the device."""
    model.eval()
    sums = torch.zeros(2, device=y.device, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        yb = y[i:i + batch_size]
        with autocast():
            logits = model(augmenter.test(x[i:i + batch_size]))
        sums += torch.stack([F.cross_entropy(logits.float(), yb, reduction="sum"),
                             (logits.argmax(1) == yb).sum()]).double()
    model.train()
    loss, correct = sums.tolist()
    return loss / len(x), correct / len(x)


def measure(run: Run) -> dict:
    """Test (unless the run must not see it) and validation (where there is a split) loss
    and accuracy of the current model; None for what is not measured."""
    out = {}
    out["test_loss"], out["test_acc"] = (None, None) if run.test_x is None else evaluate(
        run.forward, run.test_x, run.test_y, run.augmenter, run.eval_batch_size, run.autocast)
    out["val_loss"], out["val_acc"] = (None, None) if run.val_x is None else evaluate(
        run.forward, run.val_x, run.val_y, run.augmenter, run.eval_batch_size, run.autocast)
    return out
