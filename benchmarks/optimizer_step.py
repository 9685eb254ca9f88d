"""Time ``optimizer.step()`` alone on the paper's parameter sets (gradients already present).

    python benchmarks/optimizer_step.py [--sets vgg16,convmixer_256_8] [--rounds 9]
                                        [--steps 5] [--device cpu] [--no-fused] [--threads N]

All optimizers step the same parameter tensors with fixed random gradients, each with its own
state. Rows are timed interleaved (round r times every row once, ``--steps`` steps each) and the
table shows the median over rounds, so load from other processes hits all rows alike. Also
shown: the ratio to Adam(foreach), the optimizer state size, and the minor page faults per step
(CPU; fresh full-size temporaries show up there). Compiled (``fused``) rows report their
one-time first-step cost separately.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from vsgd import VSGD


class AuthorsLoopVSGD(torch.optim.Optimizer):
    """VSGD written the way the authors' reference code is: a per-parameter loop of tensor
    expressions, each creating fresh temporaries. Per-parameter step count."""

    def __init__(
        self, params, lr=0.1, ghattg=30.0, ps=1e-8, tau1=0.81, tau2=0.9, weight_decay=0.0, eps=1e-8
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                tau1=tau1,
                tau2=tau2,
                weight_decay=weight_decay,
                eps=eps,
                pa2=2 * ps + 1 + 1e-4,
                pbg2=2 * ps,
                pbhg2=2 * ghattg * ps,
            ),
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(
                        step=0,
                        mug=torch.zeros_like(p),
                        bg=torch.zeros_like(p),
                        bhg=torch.zeros_like(p),
                    )
                state["step"] += 1
                t, g = state["step"], p.grad
                pa2, pbg2, pbhg2 = group["pa2"], group["pbg2"], group["pbhg2"]
                if t == 1:
                    sg, shg = pbg2 / (pa2 - 1), pbhg2 / (pa2 - 1)
                else:
                    sg, shg = state["bg"] / pa2, state["bhg"] / pa2
                mug_prev = state["mug"]
                mug = (g * sg + mug_prev * shg) / (sg + shg)
                mug_sq = sg * shg / (sg + shg) + mug**2
                bg2 = pbg2 + mug_sq - 2 * mug * mug_prev + mug_prev**2
                bhg2 = pbhg2 + mug_sq - 2 * g * mug + g**2
                rho1, rho2 = t ** -group["tau1"], t ** -group["tau2"]
                state["bg"] = state["bg"] * (1 - rho1) + bg2 * rho1
                state["bhg"] = state["bhg"] * (1 - rho2) + bhg2 * rho2
                state["mug"] = mug
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(group["lr"] * mug / (mug_sq.sqrt() + group["eps"]))


def parameter_set(name: str, device: str) -> list[torch.Tensor]:
    from vsgd.models import build_model

    gen = torch.Generator().manual_seed(0)
    params = []
    for p in build_model(name, num_classes=100, image_size=32).parameters():
        t = p.detach().to(device)
        t.grad = torch.randn(p.shape, generator=gen).to(device)
        params.append(t)
    return params


def rows(params, device: str, fused: bool):
    out = {
        "VSGD single-tensor": VSGD(params, lr=1e-3, foreach=False),
        "VSGD multi-tensor (default)": VSGD(params, lr=1e-3),
        "VSGD authors' loop": AuthorsLoopVSGD(params, lr=1e-3),
        "Adam foreach": torch.optim.Adam(params, lr=1e-3, foreach=True),
        "AdamW foreach": torch.optim.AdamW(params, lr=1e-3, foreach=True),
        "SGD momentum foreach": torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True),
    }
    if fused:
        out["VSGD fused (compiled)"] = VSGD(params, lr=1e-3, fused=True)
        out["Adam fused"] = torch.optim.Adam(params, lr=1e-3, fused=True)
        out["AdamW fused"] = torch.optim.AdamW(params, lr=1e-3, fused=True)
    return out


def state_bytes(opt) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_set(name: str, args) -> list[str]:
    params = parameter_set(name, args.device)
    numel = sum(p.numel() for p in params)
    opts = rows(params, args.device, args.fused)
    first_step = {}
    for label, opt in opts.items():
        sync(args.device)
        t0 = time.perf_counter()
        opt.step()
        sync(args.device)
        first_step[label] = time.perf_counter() - t0
        for _ in range(2):
            opt.step()
    times = {label: [] for label in opts}
    faults = {label: [] for label in opts}
    for _ in range(args.rounds):
        for label, opt in opts.items():
            sync(args.device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            sync(args.device)
            times[label].append((time.perf_counter() - t0) / args.steps * 1e3)
            faults[label].append(
                (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps
            )
    base = statistics.median(times["Adam foreach"])
    lines = [
        f"\n{name}: {numel / 1e6:.2f}M parameters in {len(params)} tensors, "
        f"{args.device}, {args.rounds} rounds x {args.steps} steps\n",
        "| optimizer | step ms (median) | min | x Adam(foreach) | state MB | "
        "page faults/step | first step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in opts:
        med = statistics.median(times[label])
        lines.append(
            f"| {label} | {med:.2f} | {min(times[label]):.2f} | {med / base:.2f} | "
            f"{state_bytes(opts[label]) / 2**20:.0f} | "
            f"{statistics.median(faults[label]):.0f} | {first_step[label]:.2f} |"
        )
    if args.fused:
        ratio = statistics.median(times["VSGD fused (compiled)"]) / statistics.median(
            times["Adam fused"]
        )
        lines.append(f"\nVSGD fused / Adam fused = {ratio:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="vgg16,convmixer_256_8")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)"
    )
    parser.add_argument(
        "--no-fused",
        dest="fused",
        action="store_false",
        help="skip the compiled rows (they compile for ~30-60 s on CPU)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    print(f"torch {torch.__version__}, {device_name}, {torch.get_num_threads()} threads")
    for name in args.sets.split(","):
        print("\n".join(bench_set(name, args)), flush=True)


if __name__ == "__main__":
    main()
