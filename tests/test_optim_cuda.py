"""VSGD on CUDA: the foreach-op path and the fused path against the single-tensor path."""

import pytest
import torch

from vsgd import VSGD

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [(64, 32), (7,), (3, 3, 5, 5), (300_000,)]


def _run(dtype, steps=5, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype).cuda().requires_grad_() for s in SHAPES]
    grads = [
        [torch.randn(s, generator=gen, dtype=dtype).cuda() for s in SHAPES] for _ in range(steps)
    ]
    opt = VSGD(params, weight_decay=0.01, **kw)
    for k, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if (k, i) == (2, 1) else g
        opt.step()
    return [p.detach() for p in params] + [
        opt.state[p][k] for p in params for k in ("mu", "bg", "bhg")
    ]


def test_foreach_matches_single_tensor_on_cuda():
    single = _run(torch.float64, foreach=False)
    multi = _run(torch.float64, foreach=True)
    for a, b in zip(single, multi):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)


def test_fused_matches_single_tensor_on_cuda():
    single = _run(torch.float32, foreach=False)
    fused = _run(torch.float32, fused=True)
    for a, b in zip(single, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_bfloat16_state_stays_float32_on_cuda():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(100, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    opt = VSGD([p])
    p.grad = torch.randn(100, generator=gen).to("cuda", torch.bfloat16)
    opt.step()
    assert opt.state[p]["mu"].dtype == torch.float32 and p.dtype == torch.bfloat16
