"""VSGD state across a checkpoint: save, load into a fresh model and optimizer, continue.

A resumed run must be bit-identical to an uninterrupted one on every path, and
float16/bfloat16 parameters must get their float32 state back (torch's ``load_state_dict``
casts floating-point state to the parameter's dtype unless the optimizer prevents it).
"""

import io

import pytest
import torch
from torch import nn

from vsgd import VSGD

STATE = ("mu", "bg", "bhg")
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
PATHS = [pytest.param(dict(foreach=False), id="single"), pytest.param(dict(), id="default")]


def _model(dtype, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    model.to(dtype)
    # A channels_last conv weight, as the trainer uses for conv nets.
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    return model


def _grads(model, steps, missing=()):
    """Per step one gradient per parameter (None for (step, index) in ``missing``)."""
    gen = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    return [
        [
            None
            if (k, i) in missing
            else torch.randn(p.shape, generator=gen)
            .to(p.dtype)
            .contiguous(
                memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format
            )
            for i, p in enumerate(params)
        ]
        for k in range(steps)
    ]


def _train(opt, model, grads):
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = None if g is None else g.clone()
        opt.step()


def _round_trip(obj):
    """Through bytes and back, as the trainer's checkpoints do (vsgd.checkpoint)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)


def _resume_matches_uninterrupted(dtype, kw, *, before=3, after=3, missing=()):
    hyper = dict(lr=0.05, weight_decay=0.01, **kw)
    straight = _model(dtype, seed=0)
    grads = _grads(straight, before + after, missing)
    straight_opt = VSGD(straight.parameters(), **hyper)
    _train(straight_opt, straight, grads)

    first = _model(dtype, seed=0)
    opt = VSGD(first.parameters(), **hyper)
    _train(opt, first, grads[:before])
    saved = _round_trip({"model": first.state_dict(), "optimizer": opt.state_dict()})
    resumed = _model(dtype, seed=1)  # other initial values: everything comes from the file
    resumed.load_state_dict(saved["model"])
    resumed_opt = VSGD(resumed.parameters(), **hyper)
    resumed_opt.load_state_dict(saved["optimizer"])

    state_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for p in resumed.parameters():
        st = resumed_opt.state[p]
        assert type(st["step"]) is int
        for k in STATE:
            assert st[k].dtype == state_dtype, (k, st[k].dtype)
            assert st[k].device == p.device
    # The loaded state holds exactly the saved bits (never rounded through the param dtype).
    for p, q in zip(first.parameters(), resumed.parameters()):
        for k in STATE:
            assert torch.equal(resumed_opt.state[q][k], opt.state[p][k])

    _train(resumed_opt, resumed, grads[before:])
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert q.dtype == p.dtype == dtype
        assert torch.equal(q.detach(), p.detach()), (q - p).abs().max()
        a, b = straight_opt.state[p], resumed_opt.state[q]
        assert a["step"] == b["step"]
        for k in STATE:
            assert b[k].dtype == a[k].dtype == state_dtype
            assert torch.equal(b[k], a[k]), (k, (b[k] - a[k]).abs().max())


@pytest.mark.parametrize("kw", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resume_from_checkpoint_is_bit_exact(dtype, kw):
    # The bias of the last layer misses a gradient before and one after the checkpoint, so its
    # step count differs from the others'.
    _resume_matches_uninterrupted(dtype, kw, missing={(1, 3), (4, 3)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_resume_from_checkpoint_is_bit_exact_fused(dtype):
    # One tiny graph per dtype (no missing gradients: those would add step groups, i.e. graphs).
    _resume_matches_uninterrupted(dtype, dict(fused=True), before=2, after=2)


def test_load_state_dict_leaves_the_state_dict_alone_and_hooks_see_tensors():
    model = _model(torch.bfloat16, seed=0)
    opt = VSGD(model.parameters())
    _train(opt, model, _grads(model, 2))
    saved = _round_trip(opt.state_dict())
    before = {i: {k: v for k, v in s.items()} for i, s in saved["state"].items()}

    fresh = _model(torch.bfloat16, seed=1)
    opt2 = VSGD(fresh.parameters())
    seen = {}

    def pre_hook(optimizer, state_dict):
        seen["pre"] = {type(v) for s in state_dict["state"].values() for v in s.values()}

    def post_hook(optimizer):
        seen["post"] = {optimizer.state[p][k].dtype for p in fresh.parameters() for k in STATE}

    opt2.register_load_state_dict_pre_hook(pre_hook)
    opt2.register_load_state_dict_post_hook(post_hook)
    opt2.load_state_dict(saved)
    assert seen == {"pre": {int, torch.Tensor}, "post": {torch.float32}}
    # The caller's dict is not modified.
    assert saved["state"].keys() == before.keys()
    for i, s in saved["state"].items():
        assert s.keys() == before[i].keys()
        assert all(s[k] is before[i][k] for k in s)
    # It can be loaded again, and the state survives a second round trip unchanged.
    third = _model(torch.bfloat16, seed=2)
    opt3 = VSGD(third.parameters())
    opt3.load_state_dict(_round_trip(opt2.state_dict()))
    for p, q in zip(model.parameters(), third.parameters(), strict=True):
        for k in STATE:
            assert opt3.state[q][k].dtype == torch.float32
            assert torch.equal(opt3.state[q][k], opt.state[p][k])
