"""VSGD with torch.compile: the compiled fused path, and training a compiled model.

Kept to two tiny graphs: compiling is the slow part of the optimizer suite.
"""

import torch
from torch import nn
from torch._dynamo.utils import counters

from vsgd import VSGD


def test_fused_matches_single_tensor_and_compiles_once():
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (3, 3, 2, 2)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(5)]
    lrs = [0.1, 0.1, 0.05, 0.05, 0.02]
    results = []
    graphs = []
    for kw in (dict(foreach=False), dict(fused=True)):
        params = [t.clone().requires_grad_() for t in start]
        opt = VSGD(params, weight_decay=0.1, **kw)
        for lr, gs in zip(lrs, grads):
            opt.param_groups[0]["lr"] = lr
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            graphs.append(counters["stats"]["unique_graphs"])
        results.append((params, opt))
    (single, s_opt), (fused, f_opt) = results
    for a, b in zip(single, fused):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)
        for k in ("mu", "bg", "bhg"):
            torch.testing.assert_close(f_opt.state[b][k], s_opt.state[a][k], rtol=1e-12, atol=1e-14)
    # Learning-rate changes and t**-tau move through a tensor: one graph for all steps.
    before, fused_graphs = graphs[len(lrs) - 1], graphs[len(lrs) :]
    assert fused_graphs[0] == before + 1
    assert fused_graphs[-1] == fused_graphs[0]


def test_compiled_model_trains_with_vsgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    compiled = torch.compile(model)
    opt = VSGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(opt.state[p]["step"] == 40 for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]
