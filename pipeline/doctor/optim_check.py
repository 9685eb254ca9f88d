"""VSGD's three paths on this machine's device against the float64 reference, and bfloat16
parameters with float32 state through a state-dict round trip (`vsgd.optim`).

Paths: single-tensor (`foreach=False`), multi-tensor (the default) and fused (`fused=True`),
each in float32 on the device for a few hundred steps of fixed gradients (one parameter
misses its gradient once, so step counts differ), against the single-tensor path in float64
on the CPU fed the same gradients. Reported per path: the largest absolute difference of a
parameter element, and the largest relative one (to the largest magnitude of that parameter
in the reference).
"""

import io

import torch

from vsgd import VSGD

HYPER = {"lr": 0.01, "weight_decay": 0.01}
PATHS = {"single": {"foreach": False}, "default": {}, "fused": {"fused": True}}
# float32 against float64 over a few hundred steps: rounding of ~1e-7 per operation, a step
# of at most ~lr per element; 1e-4 of the parameter's scale is far above that and far below
# a wrong formula or a state mixed up between parameters.
TOLERANCE = 1e-4
MISSING = (2, 1)  # (step, parameter) without a gradient


def _initial(shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _gradients(shapes, steps):
    """The gradients of every step, drawn again for every path (not all kept in memory)."""
    gen = torch.Generator().manual_seed(1)
    for k in range(steps):
        yield k, [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _train(shapes, steps, device, dtype, **kw) -> list[torch.Tensor]:
    params = [p.to(device, dtype).requires_grad_() for p in _initial(shapes)]
    opt = VSGD(params, **HYPER, **kw)
    for k, grads in _gradients(shapes, steps):
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (k, i) == MISSING else g.to(device, dtype)
        opt.step()
    return [p.detach().to("cpu", torch.float64) for p in params]


def compare_paths(device, shapes, steps, fused: bool = True, log=print) -> dict:
    """Per path `{max_abs, max_rel, ok}` against the float64 CPU reference; a path left out
    (`fused` False) is `{skipped: why}`."""
    reference = _train(shapes, steps, "cpu", torch.float64, foreach=False)
    out = {}
    for name, kw in PATHS.items():
        if name == "fused" and not fused:
            out[name] = {"skipped": "compiling the fused step costs tens of seconds on a CPU"}
            continue
        got = _train(shapes, steps, device, torch.float32, **kw)
        max_abs = max(float((a - r).abs().max()) for a, r in zip(got, reference))
        max_rel = max(
            float((a - r).abs().max() / r.abs().max().clamp_min(1e-30))
            for a, r in zip(got, reference)
        )
        out[name] = {"max_abs": max_abs, "max_rel": max_rel, "ok": max_rel <= TOLERANCE}
        log(
            f"  VSGD {name:<7} float32 on {device} vs float64: max abs {max_abs:.2e}, "
            f"max rel {max_rel:.2e}"
        )
    return out


def _round_trip(obj):
    """Through bytes and back, as the trainer's checkpoints (vsgd.checkpoint)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)


def bf16_round_trip(device, shapes, steps: int = 3, fused: bool = True) -> dict:
    """Per path: bfloat16 parameters keep float32 state, which a state-dict round trip (with
    the parameters) gives back bit for bit, and the resumed optimizer continues exactly as an
    uninterrupted one. `{ok, detail}` per path."""
    out = {}
    for name, kw in PATHS.items():
        if name == "fused" and not fused:
            out[name] = {"skipped": "compiling the fused step costs tens of seconds on a CPU"}
            continue
        grads = [g for _, g in _gradients(shapes, 2 * steps)]

        def train(opt, params, gs):
            for step in gs:
                for p, g in zip(params, step):
                    p.grad = g.to(device, torch.bfloat16)
                opt.step()

        straight = [p.to(device, torch.bfloat16).requires_grad_() for p in _initial(shapes)]
        straight_opt = VSGD(straight, **HYPER, **kw)
        train(straight_opt, straight, grads)

        first = [p.to(device, torch.bfloat16).requires_grad_() for p in _initial(shapes)]
        opt = VSGD(first, **HYPER, **kw)
        train(opt, first, grads[:steps])
        saved = _round_trip({"params": [p.detach() for p in first], "opt": opt.state_dict()})
        resumed = [p.to(device).requires_grad_() for p in saved["params"]]
        resumed_opt = VSGD(resumed, **HYPER, **kw)
        resumed_opt.load_state_dict(saved["opt"])
        problems = []
        for p, q in zip(first, resumed):
            for key in ("mu", "bg", "bhg"):
                state = resumed_opt.state[q][key]
                if state.dtype != torch.float32:
                    problems.append(f"state {key} is {state.dtype} after loading")
                elif not torch.equal(state, opt.state[p][key]):
                    problems.append(f"state {key} differs after the round trip")
        train(resumed_opt, resumed, grads[steps:])
        for p, q in zip(straight, resumed):
            if q.dtype != torch.bfloat16 or not torch.equal(p.detach(), q.detach()):
                problems.append("the resumed parameters differ from the uninterrupted ones")
                break
        out[name] = {
            "ok": not problems,
            "detail": "; ".join(sorted(set(problems))) or "float32 state, bit-exact resume",
        }
    return out
