"""VSGD optimizer: the paper's math, path equivalence, and torch.optim behaviour."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from vsgd import VSGD
from vsgd.optim import _BLOCK_BYTES, _multi_tensor_vsgd, beta1_summary

PATHS = [
    pytest.param(dict(foreach=False), id="single"),
    pytest.param(dict(foreach=True), id="foreach"),
]

# Shapes covering packed small tensors, a tensor split over several blocks (float32 and
# float64) and odd sizes that do not fill a vector register.
BIG = _BLOCK_BYTES // 4 + 1000
SHAPES = [(7,), (3, 3, 5, 5), (33, 17), (BIG,), (1,)]


class Reference:
    """The VSGD update (the authors' Algorithm 1) written out once, per parameter, with no
    shortcuts."""

    def __init__(
        self, lr=0.1, ghattg=30.0, ps=1e-8, tau1=0.81, tau2=0.9, weight_decay=0.0, eps=1e-8
    ):
        self.h = dict(lr=lr, ghattg=ghattg, ps=ps, tau1=tau1, tau2=tau2, wd=weight_decay, eps=eps)
        self.state = {}

    def step(self, p, g):
        h = self.h
        st = self.state.setdefault(
            id(p),
            dict(t=0, mu=torch.zeros_like(p), bg=torch.zeros_like(p), bhg=torch.zeros_like(p)),
        )
        a2 = 2 * h["ps"] + 1 + 1e-4
        b0g, b0h = 2 * h["ps"], 2 * h["ghattg"] * h["ps"]
        st["t"] += 1
        t = st["t"]
        p.mul_(1 - h["lr"] * h["wd"])
        if t == 1:
            sg, sh = b0g / (a2 - 1), b0h / (a2 - 1)
        else:
            sg, sh = st["bg"] / a2, st["bhg"] / a2
        mu_old = st["mu"]
        mu = (g * sg + mu_old * sh) / (sg + sh)
        m2 = sg * sh / (sg + sh) + mu**2
        bg_new = b0g + m2 - 2 * mu * mu_old + mu_old**2
        bhg_new = b0h + m2 - 2 * g * mu + g**2
        rho1, rho2 = t ** -h["tau1"], t ** -h["tau2"]
        st["bg"] = (1 - rho1) * st["bg"] + rho1 * bg_new
        st["bhg"] = (1 - rho2) * st["bhg"] + rho2 * bhg_new
        st["mu"] = mu
        p.sub_(h["lr"] * mu / (m2.sqrt() + h["eps"]))


def _params(dtype=torch.float64, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def _grads(params, steps, seed=1, missing=()):
    """Per step a list of gradients; (step, index) pairs in ``missing`` get None."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            None if (k, i) in missing else torch.randn(p.shape, generator=gen, dtype=p.dtype)
            for i, p in enumerate(params)
        ]
        for k in range(steps)
    ]


def _train(opt, params, grads, before_step=None):
    for k, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        if before_step:
            before_step(k)
        opt.step()


def _assert_equal(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        assert x.dtype == y.dtype
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("kw", PATHS)
def test_matches_reference_float64(kw):
    hyper = dict(lr=0.05, ghattg=10.0, ps=1e-6, tau1=0.7, tau2=0.95, weight_decay=0.1, eps=1e-6)
    params = _params()
    ref_params = [p.detach().clone() for p in params]
    missing = {(2, 1), (3, 1), (4, 0)}
    grads = _grads(params, steps=7, missing=missing)
    opt = VSGD(params, **hyper, **kw)
    _train(opt, params, grads)
    ref = Reference(**hyper)
    for gs in grads:
        for p, g in zip(ref_params, gs):
            if g is not None:
                ref.step(p, g)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
        st, rst = opt.state[p], ref.state[id(r)]
        assert st["step"] == rst["t"]
        for name in ("mu", "bg", "bhg"):
            torch.testing.assert_close(st[name], rst[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_foreach_is_bit_exact_with_single_tensor(dtype):
    runs = []
    for foreach in (False, True):
        params = _params(dtype)
        # A channels_last parameter (dense, not contiguous) and a transposed one whose
        # gradient is laid out differently from it.
        extra = _params(dtype, shapes=[(4, 3, 5, 5), (6, 9)], seed=2)
        params.append(extra[0].detach().to(memory_format=torch.channels_last).requires_grad_())
        params.append(extra[1].detach().t().requires_grad_())
        grads = _grads(params, steps=5, missing={(1, 0), (3, 3)})
        for gs in grads:
            gs[5] = gs[5].contiguous(memory_format=torch.channels_last)
        opt = VSGD(params, weight_decay=0.01, maximize=True, foreach=foreach)
        _train(opt, params, grads)
        runs.append((params, opt))
    (ps, single), (pf, multi) = runs
    _assert_equal([p.detach() for p in ps], [p.detach() for p in pf])
    for a, b in zip(ps, pf):
        _assert_equal(
            [single.state[a][k] for k in ("mu", "bg", "bhg")],
            [multi.state[b][k] for k in ("mu", "bg", "bhg")],
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_foreach_op_path_is_bit_exact_with_single_tensor(dtype):
    # The torch._foreach_* variant of the multi-tensor path (used off CPU), run on CPU.
    def run(blocked):
        params = _params(dtype, shapes=[(5, 4), (BIG,), (3,)])
        state = [
            [
                torch.zeros(p.shape, dtype=torch.float32 if dtype == torch.float16 else dtype)
                for p in params
            ]
            for _ in range(3)
        ]
        for k, gs in enumerate(_grads(params, steps=4)):
            _multi_tensor_vsgd(
                [p.detach() for p in params],
                gs,
                *state,
                [k + 1] * 3,
                lr=0.1,
                ghattg=30.0,
                ps=1e-8,
                tau1=0.81,
                tau2=0.9,
                weight_decay=0.05,
                eps=1e-8,
                maximize=False,
                blocked=blocked,
            )
        return [p.detach() for p in params] + [t for s in state for t in s]

    _assert_equal(run(blocked=True), run(blocked=False))


def test_missing_grad_leaves_param_and_step_alone():
    a, b = _params(shapes=[(4,), (3,)])
    opt = VSGD([a, b])
    ga = [torch.randn(4, dtype=torch.float64) for _ in range(3)]
    gb = torch.randn(3, dtype=torch.float64)
    a.grad, b.grad = ga[0], gb
    opt.step()
    b_after, bstate = b.detach().clone(), copy.deepcopy(opt.state[b])
    for g in ga[1:]:
        a.grad, b.grad = g, None
        opt.step()
    assert torch.equal(b.detach(), b_after)
    assert opt.state[b]["step"] == 1 and opt.state[a]["step"] == 3
    for k in ("mu", "bg", "bhg"):
        assert torch.equal(opt.state[b][k], bstate[k])
    # b's next update is its second step (t = 2), exactly as if it had been alone.
    b.grad, a.grad = gb * 2, None
    opt.step()
    alone = _params(shapes=[(4,), (3,)])[1]
    solo = VSGD([alone])
    for g in (gb, gb * 2):
        alone.grad = g.clone()
        solo.step()
    assert torch.equal(b.detach(), alone.detach())


@pytest.mark.parametrize("kw", PATHS)
def test_weight_decay_is_decoupled(kw):
    # With zero gradients mu stays 0, so only the decay p *= 1 - lr*wd acts.
    (p,) = _params(shapes=[(10,)])
    p0 = p.detach().clone()
    opt = VSGD([p], lr=0.1, weight_decay=0.5, **kw)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    torch.testing.assert_close(p.detach(), p0 * 0.95**3, rtol=1e-15, atol=0)


@pytest.mark.parametrize("kw", PATHS)
def test_param_groups_behave_like_separate_optimizers(kw):
    a, b = _params(shapes=[(6,), (5, 2)])
    a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
    grads = _grads([a, b], steps=4)
    opt = VSGD(
        [
            {"params": [a]},
            {"params": [b], "lr": 0.01, "weight_decay": 0.3, "tau1": 1.0, "ghattg": 3.0},
        ],
        lr=0.2,
        **kw,
    )
    _train(opt, [a, b], grads)
    opt_a = VSGD([a2], lr=0.2, **kw)
    opt_b = VSGD([b2], lr=0.01, weight_decay=0.3, tau1=1.0, ghattg=3.0, **kw)
    for gs in grads:
        a2.grad, b2.grad = gs[0].clone(), gs[1].clone()
        opt_a.step()
        opt_b.step()
    _assert_equal([a.detach(), b.detach()], [a2.detach(), b2.detach()])


@pytest.mark.parametrize("kw", PATHS)
def test_lr_scheduler_sets_the_step_size(kw):
    params, manual = _params(), _params()
    grads = _grads(params, steps=6)
    opt = VSGD(params, lr=0.1, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    ref = VSGD(manual, lr=0.1, **kw)
    _train(ref, manual, grads, before_step=lambda k: ref.param_groups[0].__setitem__("lr", lrs[k]))
    _assert_equal([p.detach() for p in params], [p.detach() for p in manual])


def test_closure_is_evaluated_with_grad_and_returned():
    w = torch.ones(3, requires_grad=True)
    opt = VSGD([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 3.0
    assert torch.all(w.detach() < 1.0)


@pytest.mark.parametrize("kw", PATHS)
def test_maximize_equals_minimizing_the_negated_gradient(kw):
    up, down = _params(), _params()
    grads = _grads(up, steps=4)
    _train(VSGD(up, maximize=True, **kw), up, grads)
    _train(VSGD(down, **kw), down, [[-g for g in gs] for gs in grads])
    _assert_equal([p.detach() for p in up], [p.detach() for p in down])


def test_zero_grad_then_step_changes_nothing():
    params = _params()
    opt = VSGD(params)
    _train(opt, params, _grads(params, steps=2))
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    opt.step()
    _assert_equal([p.detach() for p in params], before)
    assert all(opt.state[p]["step"] == 2 for p in params)


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        VSGD(emb.parameters()).step()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-0.1),
        dict(lr=float("nan")),
        dict(ghattg=0.0),
        dict(ps=0.0),
        dict(ps=-1.0),
        dict(tau1=0.5),
        dict(tau1=1.01),
        dict(tau2=0.2),
        dict(weight_decay=-1e-4),
        dict(eps=-1.0),
        dict(lr="0.1"),
        dict(foreach=True, fused=True),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="VSGD"):
        VSGD([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_group_hyperparameters_raise_value_error():
    with pytest.raises(ValueError, match="tau2"):
        VSGD([{"params": [torch.zeros(2, requires_grad=True)], "tau2": 2.0}])


@pytest.mark.parametrize("kw", PATHS)
def test_state_dict_round_trip_continues_bit_exactly(kw):
    grads = _grads(_params(), steps=6, missing={(4, 2)})
    straight = _params()
    _train(VSGD(straight, weight_decay=0.01, **kw), straight, grads)

    first = _params()
    opt = VSGD(first, weight_decay=0.01, **kw)
    _train(opt, first, grads[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = VSGD(resumed, weight_decay=0.01, **kw)
    opt2.load_state_dict(saved["opt"])
    _train(opt2, resumed, grads[3:])
    _assert_equal([p.detach() for p in straight], [p.detach() for p in resumed])


@pytest.mark.parametrize("kw", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state(kw, dtype):
    low = _params(torch.float32, shapes=[(8, 3), (5,)])
    high = [p.detach().clone().requires_grad_() for p in low]
    low = [p.detach().to(dtype).requires_grad_() for p in low]
    opt = VSGD(low, weight_decay=0.1, **kw)
    grads = _grads(high, steps=1)
    _train(opt, low, [[g.to(dtype) for g in gs] for gs in grads])
    assert all(opt.state[p][k].dtype == torch.float32 for p in low for k in ("mu", "bg", "bhg"))
    # One step equals the float32 update of the same values, rounded once at the end.
    high = [p.detach().to(dtype).float().requires_grad_() for p in high]
    _train(
        VSGD(high, weight_decay=0.1, **kw),
        high,
        [[g.to(dtype).float() for g in gs] for gs in grads],
    )
    _assert_equal([p.detach() for p in low], [p.detach().to(dtype) for p in high])


def test_beta1_accessors():
    params = _params(torch.float32, shapes=[(50,), (20, 3), (4,)])
    opt = VSGD(params)
    assert opt.beta1() == []
    assert math.isnan(beta1_summary(opt)["mean"])
    grads = _grads(params, steps=5, missing={(k, 2) for k in range(5)})
    _train(opt, params, grads)
    betas = opt.beta1()
    assert [b.shape for b in betas] == [params[0].shape, params[1].shape]
    expected = [
        opt.state[p]["bhg"] / (opt.state[p]["bg"] + opt.state[p]["bhg"]) for p in params[:2]
    ]
    _assert_equal(betas, expected)
    flat = torch.cat([b.reshape(-1) for b in betas]).double()
    assert ((flat > 0) & (flat < 1)).all()
    summary = beta1_summary(opt)
    assert {k: summary[k] for k in ("mean", "median")} == pytest.approx(
        {"mean": flat.mean().item(), "median": flat.median().item()}, rel=1e-6
    )


def test_converges_on_noisy_quadratic():
    gen = torch.Generator().manual_seed(0)
    curvature = torch.logspace(-1, 1, 50, dtype=torch.float64)
    x = torch.full((50,), 3.0, dtype=torch.float64, requires_grad=True)
    opt = VSGD([x], lr=0.05)

    def loss():
        return 0.5 * (curvature * x.detach() ** 2).sum().item()

    start = loss()
    for _ in range(1500):
        x.grad = curvature * x.detach() + 0.5 * torch.randn(50, generator=gen, dtype=torch.float64)
        opt.step()
    assert loss() < 1e-2 * start


@pytest.mark.parametrize("kw", PATHS)
def test_trains_a_tiny_mlp(kw):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, :1] * x[:, 1:2] > 0).long().squeeze(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = VSGD(model.parameters(), lr=0.01, **kw)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_deepcopy_continues_identically():
    params = _params(torch.float32)
    opt = VSGD(params)
    grads = _grads(params, steps=3)
    _train(opt, params, grads[:1])
    params2, opt2 = copy.deepcopy((params, opt))
    _train(opt, params, grads[1:])
    _train(opt2, params2, grads[1:])
    _assert_equal([p.detach() for p in params], [p.detach() for p in params2])
