"""One training run from a resolved run spec (docs/ARCHITECTURE.md, "Resolved run spec").

    metrics = train(spec, checkpoint_store=LocalCheckpointStore("ckpt"), progress=None)

Iteration-based, as the paper: `schedule.iterations` steps of SGD-style training with StepLR
stepped per iteration, evaluation every `eval_every` iterations and after the last one, and
the *final* iterate reported. The whole dataset lives on the device as uint8 and every batch
is gathered, augmented and normalised there; the loop never waits for the device except at
log points (`log_every`), where the running sums are read back once.

Resuming is exact: the checkpoint holds the model, optimizer, scheduler, every RNG state, the
data position (epoch, batch) and the running sums, and the epoch permutations are derived from
(seed, epoch) rather than drawn from a stream. On CPU a run killed at any moment and restarted
ends bit-identical to one that was never interrupted (tests/test_trainer.py).
"""

import json
import logging
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .data import Augmenter, DATASETS, DataError, load_prepared
from .models import MODELS, build_model
from .optim import VSGD, beta1_summary
from .tracking import Tracker

log = logging.getLogger(__name__)

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "vsgd": VSGD}
TRAINING_DEFAULTS = {"eval_every": 500, "checkpoint_every": 1000, "log_every": 50,
                     "validation_size": 0, "precision": "fp32", "compile": "auto",
                     "channels_last": "auto", "device": "auto", "eval_batch_size": 1000,
                     "test_limit": 0, "beta1_every": 500}
REQUIRED = ("name", "run_hash", "dataset", "arch", "arch_key", "data", "optimizer", "schedule",
            "batch_size", "seed", "output_dir")
# The validation split is the same for every run of a dataset (all seeds and lrs), so an lr
# chosen on it is chosen on one fixed held-out set.
VALIDATION_SEED = 20240409
CURVE_COLUMNS = ("step", "test_acc", "test_loss", "val_acc", "train_loss", "train_acc", "lr")


class SpecError(ValueError):
    """The run spec is invalid; `problems` holds one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("invalid run spec:\n" + "\n".join(f"  - {p}" for p in self.problems))


def check_spec(spec: dict) -> list[str]:
    """Every problem of `spec` (missing keys, unknown names, bad values), [] when valid."""
    if not isinstance(spec, dict):
        return [f"the spec must be a JSON object, got {type(spec).__name__}"]
    problems = [f"{k}: missing" for k in REQUIRED if k not in spec]
    if "dataset" in spec and spec["dataset"] not in DATASETS:
        problems.append(f"dataset: {spec['dataset']!r} is not one of {', '.join(DATASETS)}")
    if "arch" in spec and spec["arch"] not in MODELS:
        problems.append(f"arch: {spec['arch']!r} is not one of {', '.join(MODELS)}")
    if "data" in spec and not (isinstance(spec["data"], dict) and spec["data"].get("dir")):
        problems.append("data.dir: missing (the prepared dataset directory)")
    for key in ("batch_size", "seed"):
        if key in spec and not _is_int(spec[key], minimum=1 if key == "batch_size" else 0):
            problems.append(f"{key}: must be an integer >= {1 if key == 'batch_size' else 0}, "
                            f"got {spec[key]!r}")
    sched = spec.get("schedule", {"iterations": 1, "step_size": 1, "gamma": 1})
    if not isinstance(sched, dict) or set(sched) != {"iterations", "step_size", "gamma"}:
        problems.append("schedule: must be {iterations, step_size, gamma}")
    else:
        for key in ("iterations", "step_size"):
            if not _is_int(sched[key], minimum=1):
                problems.append(f"schedule.{key}: must be an integer >= 1, got {sched[key]!r}")
        if not _is_number(sched["gamma"]) or not 0 < sched["gamma"] <= 1:
            problems.append(f"schedule.gamma: must be in (0, 1], got {sched['gamma']!r}")
    if "optimizer" in spec:
        problems += _check_optimizer(spec["optimizer"])
    training = spec.get("training", {})
    if not isinstance(training, dict):
        return problems + ["training: must be a mapping"]
    for key in sorted(set(training) - set(TRAINING_DEFAULTS)):
        problems.append(f"training.{key}: unknown key; allowed: {', '.join(TRAINING_DEFAULTS)}")
    t = {**TRAINING_DEFAULTS, **training}
    for key in ("eval_every", "checkpoint_every", "log_every", "beta1_every", "eval_batch_size"):
        if not _is_int(t[key], minimum=1):
            problems.append(f"training.{key}: must be an integer >= 1, got {t[key]!r}")
    for key in ("validation_size", "test_limit"):
        if not _is_int(t[key], minimum=0):
            problems.append(f"training.{key}: must be an integer >= 0, got {t[key]!r}")
    if t["precision"] not in ("fp32", "bf16"):
        problems.append(f"training.precision: must be fp32 or bf16, got {t['precision']!r}")
    for key in ("compile", "channels_last"):
        if t[key] not in ("auto", True, False):
            problems.append(f"training.{key}: must be auto, true or false, got {t[key]!r}")
    if not (isinstance(t["device"], str)
            and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t["device"])):
        problems.append(f"training.device: must be auto, cpu, mps, cuda or cuda:N, "
                        f"got {t['device']!r}")
    return problems


def _check_optimizer(opt) -> list[str]:
    if not isinstance(opt, dict) or opt.get("name") not in OPTIMIZERS:
        name = opt.get("name") if isinstance(opt, dict) else opt
        return [f"optimizer.name: {name!r} is not one of {', '.join(OPTIMIZERS)}"]
    try:  # the constructor knows its arguments and their ranges best
        _make_optimizer([torch.zeros(1, requires_grad=True)], opt)
    except (TypeError, ValueError) as exc:
        return [f"optimizer: {opt['name']} rejects {_args(opt)}: {exc}"]
    return []


def _is_int(v, minimum):
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _args(opt: dict) -> dict:
    args = {k: v for k, v in opt.items() if k != "name"}
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    return args


def _make_optimizer(params, opt: dict) -> torch.optim.Optimizer:
    return OPTIMIZERS[opt["name"]](params, **_args(opt))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"training.device is {name!r} but CUDA is not available")
    return device


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


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of `epoch`: a function of (seed, epoch) alone, so resuming needs
    only the epoch number, and CPU and GPU runs see the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def split_validation(x: np.ndarray, y: np.ndarray, size: int):
    """(train_x, train_y, val_x, val_y): `size` random images held out, the rest kept in
    their original order."""
    if size == 0:
        return x, y, None, None
    if size >= len(x):
        raise SpecError([f"training.validation_size: {size} leaves no training images "
                         f"(the training split has {len(x)})"])
    held = np.zeros(len(x), dtype=bool)
    held[np.random.default_rng(VALIDATION_SEED).permutation(len(x))[:size]] = True
    return x[~held], y[~held], x[held], y[held]


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


def train(spec: dict, *, checkpoint_store=None, progress=None) -> dict:
    """Run (or resume, or just report) the run of `spec`; return its final metrics.

    `checkpoint_store`: see vsgd.checkpoint; None trains without checkpoints.
    `progress(step, iterations, info)` is called at every log point with the running
    `loss`, `acc`, `lr`, `images_per_sec` and, after an evaluation, its results.
    """
    problems = check_spec(spec)
    if problems:
        raise SpecError(problems)
    tr = {**TRAINING_DEFAULTS, **spec.get("training", {})}
    iterations, bs, seed = spec["schedule"]["iterations"], spec["batch_size"], spec["seed"]
    device = resolve_device(tr["device"])
    channels_last = tr["channels_last"] is True or (
        tr["channels_last"] == "auto" and device.type in ("cpu", "cuda"))  # measured faster
    # Compiling costs ~50 s on CPU for a few % at best: only where it pays (CUDA).
    compile_model = tr["compile"] is True or (tr["compile"] == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # Data: uint8 on the device, gathered per batch by index.
    data = load_prepared(spec["data"]["dir"])
    expected = spec["data"].get("checksum")
    if expected and expected != data.manifest["checksum"]:
        raise DataError(f"{spec['data']['dir']} holds data with checksum "
                        f"{data.manifest['checksum']}, the spec expects {expected}")
    train_x, train_y, val_x, val_y = split_validation(data.train_x, data.train_y,
                                                      tr["validation_size"])
    test_x, test_y = data.test_x, data.test_y
    if tr["test_limit"]:
        test_x, test_y = test_x[:tr["test_limit"]], test_y[:tr["test_limit"]]
    if bs > len(train_x):
        raise SpecError([f"batch_size: {bs} exceeds the {len(train_x)} training images"])
    on_device = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    train_x, train_y, test_x, test_y = map(on_device, (train_x, train_y, test_x, test_y))
    if val_x is not None:
        val_x, val_y = on_device(val_x), on_device(val_y)
    batches_per_epoch = len(train_x) // bs  # drop the last partial batch: fixed shapes

    info = DATASETS[spec["dataset"]]
    torch.manual_seed(seed)
    model = build_model(spec["arch"], info.num_classes, info.image_size)
    model = model.to(device, memory_format=memory_format)
    optimizer = _make_optimizer(model.parameters(), spec["optimizer"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, spec["schedule"]["step_size"],
                                                spec["schedule"]["gamma"])
    augmenter = Augmenter(spec["dataset"], device, channels_last=channels_last)
    aug_gen = torch.Generator(device).manual_seed(seed)
    forward = torch.compile(model) if compile_model else model
    amp_dtype = torch.bfloat16 if tr["precision"] == "bf16" else None
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype,  # noqa: E731
                                      enabled=amp_dtype is not None)

    # State that a checkpoint carries besides the modules: where we are, the running sums
    # of loss*n and correct predictions (row 0: since the last log point, which a checkpoint
    # always is; row 1: since the last evaluation) and the loop's wall time so far.
    step, epoch, batch, seconds = 0, 0, 0, 0.0
    sums = torch.zeros(2, 2, device=device,
                       dtype=torch.float32 if device.type == "mps" else torch.float64)
    curve: list[dict] = []
    run_id = None
    saved = checkpoint_store.load() if checkpoint_store is not None else None
    if saved is not None:
        state = ckpt.from_bytes(saved)
        if state["run_hash"] != spec["run_hash"]:
            raise RuntimeError(f"checkpoint at {checkpoint_store!r} belongs to run "
                               f"{state['run_hash']}, not {spec['run_hash']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        aug_gen.set_state(state["rng"]["augment"])
        step, seconds, curve, run_id = (state["step"], state["seconds"], state["curve"],
                                        state["mlflow_run_id"])
        epoch, batch = state["data"]["epoch"], state["data"]["batch"]
        sums.copy_(state["sums"])
        log.info("resuming %s from its checkpoint at step %d/%d", spec["name"], step,
                 iterations)

    tracker = Tracker.from_spec(spec)
    tracker.start(spec, run_id=run_id)

    def save_checkpoint():
        state = {
            "run_hash": spec["run_hash"], "step": step, "seconds": seconds, "curve": curve,
            "mlflow_run_id": tracker.run_id, "data": {"epoch": epoch, "batch": batch},
            "sums": sums.cpu(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "augment": aug_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda"
                    else None},
        }
        checkpoint_store.save(ckpt.to_bytes(state))

    status = "FAILED"
    try:
        perm = epoch_permutation(len(train_x), seed, epoch).to(device)
        model.train()
        t_loop = t_window = time.perf_counter()
        window_start = step
        while step < iterations:
            if batch == batches_per_epoch:
                epoch, batch = epoch + 1, 0
                perm = epoch_permutation(len(train_x), seed, epoch).to(device)
            idx = perm[batch * bs:(batch + 1) * bs]
            x, y = augmenter.train(train_x[idx], aug_gen), train_y[idx]
            with autocast():
                logits = forward(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            scheduler.step()
            sums += torch.stack([loss.detach() * bs,
                                 (logits.argmax(1) == y).sum()]).to(sums.dtype)
            step, batch = step + 1, batch + 1

            final = step == iterations
            do_eval = step % tr["eval_every"] == 0 or final
            do_checkpoint = checkpoint_store is not None and (
                step % tr["checkpoint_every"] == 0 or final)
            do_beta1 = isinstance(optimizer, VSGD) and (step % tr["beta1_every"] == 0 or final)
            if not (step % tr["log_every"] == 0 or do_eval or do_checkpoint or do_beta1):
                continue
            now = time.perf_counter()
            (l_loss, l_correct), (e_loss, e_correct) = sums.tolist()  # the only sync
            l_n = (step - window_start) * bs
            e_n = (step - (curve[-1]["step"] if curve else 0)) * bs
            sums[0] = 0
            out = {"train_loss": l_loss / l_n, "train_acc": l_correct / l_n, "lr": lr,
                   "images_per_sec": l_n / (now - t_window)}
            if do_eval:
                sums[1] = 0
                out["test_loss"], out["test_acc"] = evaluate(
                    forward, test_x, test_y, augmenter, tr["eval_batch_size"], autocast)
                out["val_loss"], out["val_acc"] = (None, None) if val_x is None else evaluate(
                    forward, val_x, val_y, augmenter, tr["eval_batch_size"], autocast)
                curve.append({"step": step, "test_acc": out["test_acc"],
                              "test_loss": out["test_loss"], "val_acc": out["val_acc"],
                              "train_loss": e_loss / e_n, "train_acc": e_correct / e_n,
                              "lr": lr})
            if do_beta1:
                b1 = beta1_summary(optimizer)
                out["beta1_median"], out["beta1_mean"] = b1["median"], b1["mean"]
            tracker.log_metrics(out, step)
            tracker.flush_in_background()
            if progress is not None:
                progress(step, iterations, {"loss": out["train_loss"], "acc": out["train_acc"],
                                            **out})
            # The loop's time, log points included, checkpoint writes left out.
            seconds += time.perf_counter() - t_loop
            if do_checkpoint:
                save_checkpoint()
            t_loop = t_window = time.perf_counter()
            window_start = step

        last = curve[-1]
        metrics = {
            "name": spec["name"], "run_hash": spec["run_hash"], "dataset": spec["dataset"],
            "arch": spec["arch"], "arch_key": spec["arch_key"],
            "optimizer": spec["optimizer"]["name"], "lr": spec["optimizer"]["lr"],
            "seed": seed, "iterations": iterations,
            "test_acc": last["test_acc"], "test_loss": last["test_loss"],
            "train_loss": last["train_loss"], "train_acc": last["train_acc"],
            "val_acc": last["val_acc"],
            "seconds_per_iter": seconds / iterations,
            "device": str(device), "device_name": device_name(device),
            "mlflow_run_id": tracker.run_id,
        }
        metrics["images_per_sec"] = bs / metrics["seconds_per_iter"]
        out_dir = Path(spec["output_dir"])
        write_outputs(out_dir, spec, metrics, curve)
        tracker.log_artifacts([out_dir / "config.json", out_dir / "metrics.json"])
        status = "FINISHED"
        return metrics
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def write_outputs(out_dir: Path, spec: dict, metrics: dict, curve: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [",".join(CURVE_COLUMNS)]
    rows += [",".join("" if row[c] is None else repr(row[c]) for c in CURVE_COLUMNS)
             for row in curve]
    _atomic_write(out_dir / "curve.csv", "\n".join(rows) + "\n")
    _atomic_write(out_dir / "config.json", json.dumps(spec, indent=2) + "\n")
    # metrics.json last: its presence (with the run hash) marks the run as done.
    _atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    ckpt.atomic_write(path, text.encode())
