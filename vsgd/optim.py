"""VSGD: Variational Stochastic Gradient Descent (Chen, Kuzina, Esmaeili, Tomczak, arXiv 2404.06549).

Per element, with the parameter's own step count ``t`` (steps on which it had a gradient),
``2a = 2*ps + 1 + 1e-4``, ``2b0_g = 2*ps``, ``2b0_ghat = 2*ghattg*ps`` and state ``mu``,
``2b_g``, ``2b_ghat`` starting at zero (Algorithm 1 as the authors implement it)::

    p        <- p * (1 - lr*weight_decay)                         # decoupled weight decay
    s_g, s_h  = 2b0_g/(2a-1), 2b0_ghat/(2a-1)     if t == 1
              = 2b_g/2a,      2b_ghat/2a          otherwise
    mu'       = (g*s_g + mu*s_h) / (s_g + s_h)
    m2        = s_g*s_h/(s_g + s_h) + mu'^2
    2b_g     <- lerp(2b_g,    2b0_g    + m2 - 2*mu'*mu + mu^2, t^-tau1)
    2b_ghat  <- lerp(2b_ghat, 2b0_ghat + m2 - 2*g*mu'  + g^2,  t^-tau2)
    mu       <- mu'
    p        <- p - lr * mu' / (sqrt(m2) + eps)

Three implementations of that update share the functional entry point :func:`vsgd`:

* ``_single_tensor_vsgd``: one parameter at a time (``foreach=False``).
* ``_multi_tensor_vsgd`` (the default): on CPU it walks the parameters in cache-sized blocks:
  a block is a slice of one large tensor, or many small tensors packed into one flat buffer
  (gather with ``torch.cat``, scatter with ``torch._foreach_copy_``), and every op of the update
  runs on the whole block with ``out=`` into a few reused scratch buffers.  The naive update
  creates ~20 full-size temporaries per parameter per step, i.e. ~20 trips through DRAM plus
  page faults; blocking keeps the temporaries in cache so each element crosses DRAM once.  On
  other devices it runs the same op sequence as ``torch._foreach_*`` ops over whole lists.
  Elementwise ops give the same bits wherever an element sits in a tensor, so both are
  bit-exact with the single-tensor path.
* ``_fused_vsgd`` (``fused=True``): one ``torch.compile``'d graph per (device, dtype) group that
  reads and writes every element once.  Same formulas, but the compiler may reassociate
  scalar factors, so it matches the other paths to float rounding, not bit for bit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["VSGD", "vsgd", "beta1_summary"]

# Parameters with this dtype keep their state (and do their arithmetic) in float32.
_LOW_PRECISION = (torch.float16, torch.bfloat16)

# The tensors of a parameter's state (besides the int ``step``).
_STATE_TENSORS = ("mu", "bg", "bhg")

# Bytes per array in one block of the CPU multi-tensor path (256K float32 elements). A block
# has 9 such arrays (5 inputs + 4 scratch), ~9 MiB, which stays in L2/L3 across its ~20 ops,
# while each op is long enough that per-op dispatch stays small. 0.5-2 MiB measured within ~15%
# of each other on the benchmark's parameter sets; 128 KiB was ~2x slower on VGG16.
_BLOCK_BYTES = 1024 * 1024

# Elements read by beta1_summary at most: larger models are subsampled with a fixed stride.
_BETA1_SAMPLE = 1 << 20


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class VSGD(Optimizer):
    """Variational Stochastic Gradient Descent.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate ``eta`` (>= 0).
        ghattg: ``K_g``, prior ratio Var(ghat_t - g_t) / Var(g_t - g_{t-1}) (> 0).
        ps: ``gamma``, prior strength (> 0).
        tau1: ``kappa_1``; ``2b_g`` is updated with step size ``t**-tau1``. The paper's
            Robbins-Monro condition requires ``0.5 < tau1 <= 1``.
        tau2: ``kappa_2``; the same for ``2b_ghat`` (``0.5 < tau2 <= 1``).
        weight_decay: decoupled (AdamW-style) weight decay: ``p *= 1 - lr*weight_decay``.
        eps: added to ``sqrt(E[g^2])`` in the denominator (>= 0).
        foreach: ``True`` or ``None`` (default) use the multi-tensor path when all parameters
            are on one device type, ``False`` the single-tensor path.
        fused: ``True`` uses a ``torch.compile``'d update (CPU and CUDA). It compiles once per
            parameter layout and process (tens of seconds cold on CPU, a few with a warm inductor
            cache) and then runs near memory bandwidth. Agrees with the other paths to float
            rounding. Not combinable with ``foreach=True``.
        maximize: maximise the objective instead of minimising it.

    State per parameter: ``step`` (int, the number of steps on which that parameter had a
    gradient) and exactly three tensors ``mu``, ``bg`` (``2b_g``) and ``bhg`` (``2b_ghat``). A
    parameter whose ``.grad`` is ``None`` is left untouched and its step count does not advance.

    Mixed precision: float16/bfloat16 parameters keep their state in float32 and the update is
    computed in float32; only the final parameter value is rounded to the parameter's dtype.
    All other dtypes compute in their own precision (float64 stays float64 throughout).
    ``load_state_dict`` keeps it so: the state comes back with exactly the saved bits.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        ghattg: float = 30.0,
        ps: float = 1e-8,
        tau1: float = 0.81,
        tau2: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
    ):
        _validate(lr=lr, ghattg=ghattg, ps=ps, tau1=tau1, tau2=tau2,
                  weight_decay=weight_decay, eps=eps)
        if fused and foreach:
            raise ValueError("VSGD: `fused=True` and `foreach=True` are mutually exclusive")
        defaults = dict(lr=lr, ghattg=ghattg, ps=ps, tau1=tau1, tau2=tau2,
                        weight_decay=weight_decay, eps=eps, foreach=foreach, fused=fused,
                        maximize=maximize)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate(**{k: group[k] for k in ("lr", "ghattg", "ps", "tau1", "tau2",
                                                "weight_decay", "eps")})
        # Reused block buffers of the CPU multi-tensor path, keyed by (device, dtype). Not
        # optimizer state: never saved, rebuilt on demand.
        self._scratch: dict = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._scratch = {}
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("maximize", False)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, except that the state tensors get the state dtype.

        torch casts every floating-point state tensor but ``step`` to its parameter's dtype,
        which would store float16/bfloat16 parameters' float32 state rounded to 16 bits and
        change every update after a resume. Overriding ``_process_value_according_to_param_policy``
        does not help: ``load_state_dict`` calls it as ``Optimizer._process_...``. So the state
        tensors cross torch's loader wrapped in ``_Uncast`` (it passes non-tensors through as
        they are) and are then placed as torch places them, on the parameter's device, but in
        ``_state_dtype``.
        The hooks are added per call so that they run after all user pre-hooks and before all
        user post-hooks: those see plain tensors, as with any optimizer.
        """
        pre = self.register_load_state_dict_pre_hook(_wrap_state)
        post = self.register_load_state_dict_post_hook(_unwrap_state, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _init_group(self, group, params, grads, mus, bgs, bhgs, steps) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("VSGD does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("VSGD does not support complex parameters")
            state = self.state[p]
            if len(state) == 0:
                dtype = _state_dtype(p.dtype)
                state["step"] = 0
                for name in _STATE_TENSORS:
                    state[name] = torch.zeros_like(p, dtype=dtype,
                                                   memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            mus.append(state["mu"])
            bgs.append(state["bg"])
            bhgs.append(state["bhg"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, mus, bgs, bhgs, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, mus, bgs, bhgs, steps)
            if not params:
                continue
            vsgd(params, grads, mus, bgs, bhgs, steps,
                 lr=group["lr"], ghattg=group["ghattg"], ps=group["ps"],
                 tau1=group["tau1"], tau2=group["tau2"], weight_decay=group["weight_decay"],
                 eps=group["eps"], maximize=group["maximize"], foreach=group["foreach"],
                 fused=group["fused"], scratch=self._scratch)
        return loss

    @torch.no_grad()
    def beta1(self) -> list[Tensor]:
        """Adaptive momentum ``2b_ghat / (2b_g + 2b_ghat)`` per parameter that has state.

        It is the weight of the previous estimate in ``mu' = beta1*mu + (1-beta1)*g`` on the
        next step (the paper's link to Adam's ``beta1``). One fresh tensor per parameter, in
        the order of ``param_groups``.
        """
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    out.append(state["bhg"] / (state["bg"] + state["bhg"]))
        return out


class _Uncast:
    """A saved state tensor on its way through ``Optimizer.load_state_dict``, uncast."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


def _wrap_state(optimizer: VSGD, state_dict: dict[str, Any]) -> dict[str, Any]:
    # New dicts throughout: the caller's state_dict is left as it was.
    state = {}
    for key, st in state_dict["state"].items():
        if isinstance(st, dict):
            st = {k: _Uncast(v) if k in _STATE_TENSORS and isinstance(v, Tensor) else v
                  for k, v in st.items()}
        state[key] = st
    return {**state_dict, "state": state}


def _unwrap_state(optimizer: VSGD) -> None:
    for param, st in optimizer.state.items():
        if not isinstance(st, dict):
            continue
        for k, v in st.items():
            if not isinstance(v, _Uncast):
                continue
            if not isinstance(param, Tensor):
                # State of an id missing from param_groups: torch keeps it as saved.
                st[k] = v.tensor
            elif param.is_floating_point():
                # One cast at most, from the saved dtype straight to the state dtype (a no-op
                # for float32 state of a low-precision parameter).
                st[k] = v.tensor.to(device=param.device, dtype=_state_dtype(param.dtype))
            else:
                st[k] = v.tensor.to(device=param.device)


@torch.no_grad()
def beta1_summary(optimizer: VSGD) -> dict[str, float]:
    """Mean, median and the 10/25/75/90% quantiles (`q10`, `q25`, `q75`, `q90`) of the
    adaptive momentum over all parameter elements with state.

    Cheap enough to log every hundred steps: at most ~1M elements are read, with a fixed
    stride per parameter when the model is larger, and moved off the device in one transfer.
    Every quantile is an element of the sample (the lower one between two, as
    `Tensor.median`), so the median is the same value the median always was. Returns NaNs
    before the first step.
    """
    at = {"q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9}
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"]
              if optimizer.state.get(p)]
    total = sum(s["bg"].numel() for s in states)
    if total == 0:
        return {key: float("nan") for key in ("mean", *at)}
    stride = max(1, math.ceil(total / _BETA1_SAMPLE))
    parts = []
    for s in states:
        bg, bhg = s["bg"].reshape(-1)[::stride], s["bhg"].reshape(-1)[::stride]
        parts.append(bhg / (bg + bhg))
    values = torch.cat(parts).to("cpu", torch.float64)
    levels = torch.tensor(list(at.values()), dtype=torch.float64)
    quantiles = torch.quantile(values, levels, interpolation="lower").tolist()
    return {"mean": values.mean().item(), **dict(zip(at, quantiles))}


def _validate(**hyper) -> None:
    rules = {
        "lr": (lambda v: v >= 0.0, ">= 0"),
        "ghattg": (lambda v: v > 0.0, "> 0"),
        "ps": (lambda v: v > 0.0, "> 0"),
        "tau1": (lambda v: 0.5 < v <= 1.0, "in (0.5, 1] (the paper's Robbins-Monro condition)"),
        "tau2": (lambda v: 0.5 < v <= 1.0, "in (0.5, 1] (the paper's Robbins-Monro condition)"),
        "weight_decay": (lambda v: v >= 0.0, ">= 0"),
        "eps": (lambda v: v >= 0.0, ">= 0"),
    }
    for name, value in hyper.items():
        ok, rule = rules[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not ok(value):
            raise ValueError(f"VSGD: invalid {name}={value!r}; must be a finite number {rule}")


class _Consts:
    """The scalars of one update, computed in Python float64 so no float32 constant leaks in."""

    __slots__ = ("first", "a2", "b0g", "b0h", "sg1", "sh1", "rho1", "rho2", "lr", "decay",
                 "eps")

    def __init__(self, step, *, lr, ghattg, ps, tau1, tau2, weight_decay, eps):
        self.first = step == 1
        self.a2 = 2.0 * ps + 1.0 + 1e-4
        self.b0g = 2.0 * ps
        self.b0h = 2.0 * ghattg * ps
        # Variances at t == 1 come from the prior (the state is still zero).
        self.sg1 = self.b0g / (self.a2 - 1.0)
        self.sh1 = self.b0h / (self.a2 - 1.0)
        self.rho1 = float(step) ** -tau1
        self.rho2 = float(step) ** -tau2
        self.lr = lr
        self.decay = 1.0 - lr * weight_decay
        self.eps = eps


def vsgd(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    bgs: list[Tensor],
    bhgs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    ghattg: float,
    ps: float,
    tau1: float,
    tau2: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    scratch: dict | None = None,
) -> None:
    """Functional VSGD: update ``params`` and the state lists in place.

    ``steps[i]`` is parameter i's step count *including* this step (1 on its first update).
    ``scratch`` is an optional dict the CPU multi-tensor path keeps its block buffers in
    between calls; without it they are allocated per call.
    """
    if fused and foreach:
        raise ValueError("VSGD: `fused=True` and `foreach=True` are mutually exclusive")
    if foreach is None and not fused:
        foreach = (len({p.device.type for p in params}) == 1
                   and all(type(p) in (Tensor, torch.nn.Parameter) for p in params))
    hyper = dict(lr=lr, ghattg=ghattg, ps=ps, tau1=tau1, tau2=tau2,
                 weight_decay=weight_decay, eps=eps)
    if fused:
        _fused_vsgd(params, grads, mus, bgs, bhgs, steps, maximize=maximize, **hyper)
    elif foreach:
        _multi_tensor_vsgd(params, grads, mus, bgs, bhgs, steps, maximize=maximize,
                           scratch=scratch, **hyper)
    else:
        _single_tensor_vsgd(params, grads, mus, bgs, bhgs, steps, maximize=maximize, **hyper)


# --------------------------------------------------------------------------------------------
# The update as a fixed sequence of tensor ops. The single-tensor path and the CPU blocks of the
# multi-tensor path both run exactly this sequence, which makes them bit-exact.


def _update_(p, g, mu, bg, bhg, w, b, m, e, c: _Consts) -> Tensor:
    """One VSGD update of same-shaped tensors, all in the state dtype.

    ``g`` may be negated already (maximize); ``w, b, m, e`` are scratch of the same shape.
    Updates ``p``, ``bg``, ``bhg`` in place and returns ``b`` holding the new ``mu``: the caller
    stores it (``mu`` must keep the old value until ``bg`` is updated).
    """
    # mu' = (g*s_g + mu*s_h)/(s_g + s_h) = lerp(mu, g, s_g/(s_g + s_h)): one op instead of four.
    if c.first:
        torch.lerp(mu, g, c.sg1 / (c.sg1 + c.sh1), out=b)
        torch.mul(b, b, out=m)
        m.add_(c.sg1 * c.sh1 / (c.sg1 + c.sh1))
    else:
        # s_g = 2b_g/2a and s_h = 2b_ghat/2a: the factor 1/2a cancels in the weight and stays
        # only in sigma^2 = s_g*s_h/(s_g + s_h) = w * 2b_ghat / 2a.
        torch.add(bg, bhg, out=w)
        torch.div(bg, w, out=w)
        torch.lerp(mu, g, w, out=b)
        torch.mul(b, b, out=m)
        m.addcmul_(w, bhg, value=1.0 / c.a2)
    # m = E[g^2] = sigma^2 + mu'^2
    torch.add(m, c.b0g, out=e)
    e.addcmul_(b, mu, value=-2.0)
    e.addcmul_(mu, mu)
    bg.lerp_(e, c.rho1)
    torch.add(m, c.b0h, out=e)
    e.addcmul_(g, b, value=-2.0)
    e.addcmul_(g, g)
    bhg.lerp_(e, c.rho2)
    torch.sqrt(m, out=e)
    e.add_(c.eps)
    if c.decay != 1.0:
        p.mul_(c.decay)
    p.addcdiv_(b, e, value=-c.lr)
    return b


def _single_tensor_vsgd(params, grads, mus, bgs, bhgs, steps, *, maximize, **hyper) -> None:
    for p, g, mu, bg, bhg, step in zip(params, grads, mus, bgs, bhgs, steps):
        _update_one(p, g, mu, bg, bhg, _Consts(step, **hyper), maximize)


def _update_one(p, g, mu, bg, bhg, c: _Consts, maximize) -> None:
    """``_update_`` on one parameter of any layout, with fresh scratch."""
    dtype = mu.dtype
    g = g.to(dtype)
    if maximize:
        g = torch.neg(g)
    work = p if p.dtype == dtype else p.to(dtype)
    w, b, m, e = (torch.empty_like(mu) for _ in range(4))
    mu.copy_(_update_(work, g, mu, bg, bhg, w, b, m, e, c))
    if work is not p:
        p.copy_(work)


# --------------------------------------------------------------------------------------------
# Multi-tensor path.


def _multi_tensor_vsgd(params, grads, mus, bgs, bhgs, steps, *, maximize, scratch=None,
                       blocked=None, **hyper) -> None:
    """Group by (device, dtype, step) and update each group in blocks (CPU) or with foreach ops.

    Parameters of one group normally share one step count; a parameter that missed some
    gradients gets its own group, because the step sizes ``t**-tau`` are per parameter.
    ``blocked`` forces the strategy (default: blocks on CPU, foreach ops elsewhere).
    """
    groups = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype, steps[i])].append(i)
    for (device, dtype, step), idx in groups.items():
        c = _Consts(step, **hyper)
        lists = [[seq[i] for i in idx] for seq in (params, grads, mus, bgs, bhgs)]
        use_blocks = device.type == "cpu" if blocked is None else blocked
        if use_blocks:
            _blocked_update(*lists, c, maximize, scratch)
        else:
            _foreach_update(*lists, c, maximize)


def _flat(t: Tensor) -> Tensor | None:
    """1-D view of ``t`` in memory order, or None if its elements are not one dense run."""
    if t.is_contiguous():
        return t.view(-1)
    # Dense in another dimension order (channels_last, transposed): permute to that order.
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def _blocked_update(params, grads, mus, bgs, bhgs, c: _Consts, maximize, scratch) -> None:
    """Run ``_update_`` on cache-sized blocks of flat views, reusing a fixed set of buffers."""
    sdtype = mus[0].dtype
    block = max(1024, _BLOCK_BYTES // mus[0].element_size())
    key = (mus[0].device, sdtype, block)
    bufs = None if scratch is None else scratch.get(key)
    if bufs is None:
        # 4 work buffers + 5 for packed inputs (p, g, mu, bg, bhg).
        bufs = torch.empty((9, block), dtype=sdtype, device=mus[0].device)
        if scratch is not None:
            scratch[key] = bufs

    # Plan: big tensors are split into block-sized slices updated in place; small ones are
    # packed together (up to one block) into the buffers.
    pack: list[tuple] = []
    packed = 0

    def flush():
        nonlocal packed
        if pack:
            _packed_block(pack, packed, bufs, c, maximize)
            pack.clear()
            packed = 0

    for p, g, mu, bg, bhg in zip(params, grads, mus, bgs, bhgs):
        views = [_flat(t) for t in (p, g, mu, bg, bhg)]
        if any(v is None for v in views) or len({t.stride() for t in (p, g, mu, bg, bhg)}) != 1:
            # Odd layouts (overlapping, or grad strided unlike the param): per-tensor update.
            _update_one(p, g, mu, bg, bhg, c, maximize)
            continue
        n = views[0].numel()
        if n == 0:
            continue
        if n > block // 2 and p.dtype == g.dtype == sdtype:
            for lo in range(0, n, block):
                _direct_block([v[lo:lo + block] for v in views], bufs, c, maximize)
            continue
        for lo in range(0, n, block):
            piece = [v[lo:lo + block] for v in views]
            if packed + piece[0].numel() > block:
                flush()
            pack.append(piece)
            packed += piece[0].numel()
    flush()


def _direct_block(views, bufs, c, maximize) -> None:
    p, g, mu, bg, bhg = views
    n = p.numel()
    w, b, m, e, gbuf = (bufs[i, :n] for i in range(5))
    if maximize:
        g = torch.neg(g, out=gbuf)
    mu.copy_(_update_(p, g, mu, bg, bhg, w, b, m, e, c))


def _packed_block(pieces, n, bufs, c, maximize) -> None:
    w, b, m, e, P, G, MU, BG, BH = (bufs[i, :n] for i in range(9))
    ps, gs, mus, bgs, bhgs = zip(*pieces)
    torch.cat(ps, out=P)
    torch.cat(gs, out=G)
    torch.cat(mus, out=MU)
    torch.cat(bgs, out=BG)
    torch.cat(bhgs, out=BH)
    if maximize:
        G.neg_()
    new_mu = _update_(P, G, MU, BG, BH, w, b, m, e, c)
    sizes = [t.numel() for t in ps]
    for dst, src in ((ps, P), (mus, new_mu), (bgs, BG), (bhgs, BH)):
        torch._foreach_copy_(list(dst), list(src.split(sizes)))


def _foreach_update(params, grads, mus, bgs, bhgs, c: _Consts, maximize) -> None:
    """``_update_`` as ``torch._foreach_*`` ops over whole lists (non-CPU devices).

    Op for op the same sequence as ``_update_``, with out-of-place foreach ops where
    ``_update_`` writes into scratch (the caching allocator makes those cheap on GPUs).
    """
    sdtype = mus[0].dtype
    work = params if params[0].dtype == sdtype else [p.to(sdtype) for p in params]
    grads = [g.to(sdtype) for g in grads] if grads[0].dtype != sdtype else list(grads)
    if maximize:
        grads = torch._foreach_neg(grads)
    if c.first:
        b = torch._foreach_lerp(mus, grads, c.sg1 / (c.sg1 + c.sh1))
        m = torch._foreach_mul(b, b)
        torch._foreach_add_(m, c.sg1 * c.sh1 / (c.sg1 + c.sh1))
    else:
        w = torch._foreach_add(bgs, bhgs)
        w = torch._foreach_div(bgs, w)
        b = torch._foreach_lerp(mus, grads, w)
        m = torch._foreach_mul(b, b)
        torch._foreach_addcmul_(m, w, bhgs, value=1.0 / c.a2)
    e = torch._foreach_add(m, c.b0g)
    torch._foreach_addcmul_(e, b, mus, value=-2.0)
    torch._foreach_addcmul_(e, mus, mus)
    torch._foreach_lerp_(bgs, e, c.rho1)
    e = torch._foreach_add(m, c.b0h)
    torch._foreach_addcmul_(e, grads, b, value=-2.0)
    torch._foreach_addcmul_(e, grads, grads)
    torch._foreach_lerp_(bhgs, e, c.rho2)
    e = torch._foreach_sqrt(m)
    torch._foreach_add_(e, c.eps)
    if c.decay != 1.0:
        torch._foreach_mul_(work, c.decay)
    torch._foreach_addcdiv_(work, b, e, value=-c.lr)
    torch._foreach_copy_(mus, b)
    if work is not params:
        torch._foreach_copy_(params, work)


# --------------------------------------------------------------------------------------------
# Fused path: one compiled graph per (device, dtype, step-group) parameter layout.


def _fused_kernel(params, grads, mus, bgs, bhgs, scalars: Tensor, maximize: bool) -> None:
    # Hyperparameters and step sizes arrive as one float64 tensor so that changing them (LR
    # schedules, t**-tau) never triggers a recompile.
    (first, inv_a2, b0g, b0h, sg1, sh1, rho1, rho2, lr, decay, eps) = scalars.unbind()
    for p, g, mu, bg, bhg in zip(params, grads, mus, bgs, bhgs):
        dtype = mu.dtype
        g = g.to(dtype)
        if maximize:
            g = -g
        sg = torch.where(first > 0, sg1.to(dtype), bg * inv_a2.to(dtype))
        sh = torch.where(first > 0, sh1.to(dtype), bhg * inv_a2.to(dtype))
        r = 1.0 / (sg + sh)
        new_mu = (g * sg + mu * sh) * r
        m2 = sg * sh * r + new_mu * new_mu
        new_bg = b0g + m2 - 2.0 * new_mu * mu + mu * mu
        new_bhg = b0h + m2 - 2.0 * g * new_mu + g * g
        bg.copy_(torch.lerp(bg, new_bg, rho1.to(dtype)))
        bhg.copy_(torch.lerp(bhg, new_bhg, rho2.to(dtype)))
        mu.copy_(new_mu)
        new_p = p.to(dtype) * decay.to(dtype) - lr.to(dtype) * new_mu / (m2.sqrt() + eps.to(dtype))
        p.copy_(new_p)


_compiled_kernel = None


def _fused_vsgd(params, grads, mus, bgs, bhgs, steps, *, maximize, **hyper) -> None:
    global _compiled_kernel
    if _compiled_kernel is None:
        # dynamic=False: parameter shapes never change, and static shapes give the fastest
        # kernels. Guards cache one graph per parameter layout for the whole process.
        _compiled_kernel = torch.compile(_fused_kernel, fullgraph=True, dynamic=False)
    groups = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype, steps[i])].append(i)
    for (device, _dtype, step), idx in groups.items():
        c = _Consts(step, **hyper)
        # Made on the CPU and copied without waiting (`torch.tensor(..., device=cuda)` copies
        # and then waits for the device to finish all queued work): on CUDA from pinned
        # memory, whose caching allocator keeps the block until the copy has run.
        cuda = device.type == "cuda"
        scalars = torch.tensor(
            [float(c.first), 1.0 / c.a2, c.b0g, c.b0h, c.sg1, c.sh1, c.rho1, c.rho2, c.lr,
             c.decay, c.eps], dtype=torch.float64, pin_memory=cuda).to(device, non_blocking=cuda)
        lists = [[seq[i] for i in idx] for seq in (params, grads, mus, bgs, bhgs)]
        _compiled_kernel(*lists, scalars, maximize)
