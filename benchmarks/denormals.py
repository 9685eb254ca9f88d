"""Float denormals on CPU: the training step with them kept and flushed to zero
(`training.denormals`), with denormals planted in its gradients or in its weights and
optimizer state.

    python benchmarks/denormals.py [--arch convmixer_256_8] [--batch 32] [--fraction 0.1]
                                   [--gradient-scale 1e-36] [--optimizers sgd,adam,vsgd]
                                   [--steps 2] [--rounds 3] [--threads N] [--json rows.json]

A CPU run slows down when values underflow into denormals (below 2**-126, about 1.2e-38, in
float32): x86 CPUs compute with them through a microcode assist, and a convolution or matmul
with denormal inputs runs many times slower. In a run they take hundreds of steps to appear
(a VSGD ConvMixer run at lr 0.1 had some 10^5 denormal elements in the gradients leaving its
GELUs by step 30: a small incoming gradient times GELU's small slope), so this benchmark
plants them, after one step of each optimizer:

- `gradients`: the backward pass starts from the loss's gradient times `--gradient-scale`,
  so that the activations' and weights' gradients, and what the optimizer makes of them,
  reach denormal magnitudes;
- `weights`: `--fraction` of the elements of every weight and optimizer state tensor set to a
  denormal of the same sign (2**-130, made from its bits), so the activations and gradients
  computed from them underflow too;
- `clean`: nothing planted (flushing should cost nothing there).

Rows, per optimizer and plant: the whole training step (`vsgd.engine.train_step`: batch
gather, augmentation, forward, backward, update), timed with denormals kept and flushed
(`vsgd.engine.set_denormals`). Every timed block starts from the same weights and state,
restored before it: a flushed step writes zeros where the denormals were. Rows and modes take
turns for `--rounds` rounds; the table shows the median ms per step and keep / flush.
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vsgd import engine  # noqa: E402
from vsgd.data import prepare  # noqa: E402
from vsgd.data.prepared import load_prepared  # noqa: E402
from vsgd.spec import TRAINING_DEFAULTS  # noqa: E402

OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "adam": {"name": "adam", "lr": 0.001},
    "vsgd": {"name": "vsgd", "lr": 0.1, "ghattg": 30.0, "ps": 1e-8, "tau1": 0.81, "tau2": 0.9},
}
MODES = ("keep", "flush")
PLANTS = ("clean", "gradients", "weights")
# 2**-130: a float32 denormal (2**(-149 + 19)), written as bits so no arithmetic flushes it.
DENORMAL_BITS = 1 << 19


def denormal_like(t: torch.Tensor) -> torch.Tensor:
    """2**-130 with `t`'s signs (under `keep`: the product is exact, not flushed)."""
    tiny = torch.full(t.shape, DENORMAL_BITS, dtype=torch.int32).view(torch.float32)
    return torch.where(t < 0, -tiny, tiny)


def weights_and_state(run) -> list[torch.Tensor]:
    """The model's weights and the optimizer's float state tensors (not its step counts)."""
    state = [v for s in run.optimizer.state.values() for v in s.values()]
    return [p.data for p in run.model.parameters()] + [
        v for v in state if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
    ]


def plant(run, fraction: float, gen: torch.Generator) -> int:
    """`fraction` of every float weight's and optimizer state tensor's elements set to a
    denormal; how many were set."""
    engine.set_denormals("keep")
    planted = 0
    with torch.no_grad():
        for t in weights_and_state(run):
            mask = torch.rand(t.shape, generator=gen) < fraction
            t.copy_(torch.where(mask, denormal_like(t), t))
            planted += int(mask.sum())
    return planted


def count_denormals(run) -> int:
    """Denormal elements in the float32 weights and optimizer state, read from their bits."""
    tensors = [t for t in weights_and_state(run) if t.dtype == torch.float32]
    exponent = 0x7F800000
    return sum(
        int(((t.view(torch.int32) & exponent).eq(0) & (t.view(torch.int32) & 0x7FFFFF).ne(0)).sum())
        for t in tensors
    )


class ScaledBackward(torch.autograd.Function):
    """The identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class GradientsScaled(torch.nn.Module):
    """`model` whose backward pass starts from the loss's gradient times `scale`."""

    def __init__(self, model, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return ScaledBackward.apply(self.model(x), self.scale)


def snapshot(run) -> dict:
    return copy.deepcopy({"model": run.model.state_dict(), "opt": run.optimizer.state_dict()})


def restore(run, saved: dict) -> None:
    """Weights and optimizer state as saved (copied: a step updates the state in place)."""
    engine.set_denormals("keep")  # copies, no arithmetic; still, nothing flushed on the way
    saved = copy.deepcopy(saved)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["opt"])


def build(name, args, data):
    spec = {
        "dataset": "cifar100",
        "arch": args.arch,
        "optimizer": OPTIMIZERS[name],
        "batch_size": args.batch,
        "seed": 0,
        "schedule": {"iterations": 10**6, "step_size": 10**6, "gamma": 0.5},
    }
    training = {**TRAINING_DEFAULTS, "device": "cpu", "compile": False, "test_limit": 1}
    run = engine.build(spec, training, data)
    state = engine.new_state(run)
    engine.train_step(run, state)  # the optimizer's state exists from here on
    return run, state


def time_block(run, state, saved, mode: str, steps: int, forward) -> float:
    restore(run, saved)
    run.forward = forward
    engine.set_denormals(mode)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.train_step(run, state)
    return (time.perf_counter() - t0) / steps * 1e3


def measure(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"train": max(4 * args.batch, 64), "test": 16}
        prepare("cifar100", "synthetic", tmp, synthetic_sizes=sizes)
        data = load_prepared(Path(tmp) / "prepared" / "cifar100")
        rows, runs = [], {}
        gen = torch.Generator().manual_seed(0)
        for name in args.optimizers:
            run, state = build(name, args, data)
            clean = snapshot(run)
            planted = plant(run, args.fraction, gen)
            rows += [
                {"optimizer": name, "plant": plant_name, "ms": {m: [] for m in MODES}}
                for plant_name in PLANTS
            ]
            rows[-1].update(planted=planted, denormals=count_denormals(run))
            scaled = GradientsScaled(run.model, args.gradient_scale)
            runs[name] = {
                "run": run,
                "state": state,
                "clean": (clean, run.model),
                "gradients": (clean, scaled),
                "weights": (snapshot(run), run.model),
            }
        for _ in range(args.rounds):
            for row in rows:
                r = runs[row["optimizer"]]
                saved, forward = r[row["plant"]]
                for mode in MODES:
                    row["ms"][mode].append(
                        time_block(r["run"], r["state"], saved, mode, args.steps, forward)
                    )
    for row in rows:
        row["median_ms"] = {m: statistics.median(row["ms"][m]) for m in MODES}
        row["keep_over_flush"] = row["median_ms"]["keep"] / row["median_ms"]["flush"]
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="convmixer_256_8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--fraction", type=float, default=0.1, help="`weights`: of each tensor's elements"
    )
    p.add_argument(
        "--gradient-scale",
        type=float,
        default=1e-36,
        help="`gradients`: the loss's gradient times this",
    )
    p.add_argument("--optimizers", default="sgd,adam,vsgd")
    p.add_argument("--steps", type=int, default=2, help="timed steps per block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    args.optimizers = args.optimizers.split(",")
    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown:
        p.error(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; {args.arch} batch {args.batch}; planted: "
        f"gradients x {args.gradient_scale:g}, {args.fraction:.0%} of weights and optimizer "
        f"state; median of {args.rounds} rounds of {args.steps} steps"
    )
    rows = measure(args)
    print("| optimizer | planted | keep ms/step | flush ms/step | keep / flush |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        ms = row["median_ms"]
        print(
            f"| {row['optimizer']} | {row['plant']} | {ms['keep']:.0f} | {ms['flush']:.0f} | "
            f"{row['keep_over_flush']:.2f} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
