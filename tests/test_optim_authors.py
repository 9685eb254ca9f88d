"""VSGD against golden values from the authors' own implementation (an oracle independent of
the in-repo reference in test_optim.py).

tests/data/vsgd_authors_golden.json holds five float64 steps of the authors' ``VSGD``
(github.com/generativeai-tue/vsgd, src/vsgd.py; commit, license and inputs in its ``source``
header), made by tests/data/make_vsgd_authors_golden.py, for two cases: their defaults, and
weight decay with a parameter that has no gradient on one step. Each case was run twice:

* ``float64_scalar_state``: their class with its scalar state (2a, 2b0_g, 2b0_ghat, t) in
  float64. This is their update rule; this repository must match it to float64 rounding.
* ``as_published``: their class as published, whose scalar state is float32 whatever the
  parameter dtype. The float32 ``2a = 1.00010002`` is 1.0001000166, so ``2a - 1`` (the
  step-1 prior variances' denominator) is 3.4e-5 too small relatively; after five steps the
  parameters differ from the float64 rule by up to ~5e-6. This repository computes those
  scalars in float64 on purpose (vsgd/optim.py, ``_Consts``), so it matches the published
  code only to that float32 rounding.

The fused path is not run here: it needs torch.compile (tens of seconds cold on CPU);
test_optim_compile.py ties it to the single-tensor path at rtol=1e-12.
"""

import json
from pathlib import Path

import pytest
import torch

from vsgd import VSGD

GOLDEN = json.loads((Path(__file__).parent / "data" / "vsgd_authors_golden.json").read_text())

PATHS = [
    pytest.param(dict(foreach=False), id="single"),
    pytest.param(dict(foreach=True), id="foreach"),
]
CASES = [pytest.param(case, id=case["name"]) for case in GOLDEN["cases"]]


def f64(value):
    return torch.tensor(value, dtype=torch.float64)


def run_steps(case, path):
    """This repository's VSGD on the golden inputs; yields (step number, params, optimizer)."""
    inputs = GOLDEN["inputs"]
    params = {k: f64(v) for k, v in inputs["initial_params"].items()}
    opt = VSGD(list(params.values()), **case["hyperparameters"], **path)
    for t, grads in enumerate(inputs["grads"], start=1):
        for k, p in params.items():
            skipped = t in case["no_grad_on_steps"].get(k, [])
            p.grad = None if skipped else f64(grads[k])
        opt.step()
        yield t, params, opt


def max_param_error(case, variant, path):
    worst = 0.0
    for t, params, _ in run_steps(case, path):
        expected = case["steps"][variant][t - 1]["params"]
        worst = max(worst, *((params[k] - f64(v)).abs().max().item() for k, v in expected.items()))
    return worst


def test_golden_file_names_its_source_and_inputs():
    source = GOLDEN["source"]
    assert source["repository"] == "https://github.com/generativeai-tue/vsgd"
    assert len(source["commit"]) == 40 and source["path"] == "src/vsgd.py"
    assert source["class"] == "VSGD" and source["license"].startswith("MIT")
    assert GOLDEN["dtype"] == "float64"
    assert len(GOLDEN["inputs"]["grads"]) == 5
    for case in GOLDEN["cases"]:
        assert set(case["steps"]) == {"as_published", "float64_scalar_state"}
        assert all(len(steps) == 5 for steps in case["steps"].values())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_vsgd_matches_the_authors_update_rule_step_by_step(case, path):
    for t, params, opt in run_steps(case, path):
        expected = case["steps"]["float64_scalar_state"][t - 1]
        for k, value in expected["params"].items():
            torch.testing.assert_close(
                params[k],
                f64(value),
                rtol=1e-12,
                atol=1e-14,
                msg=lambda m, t=t, k=k: f"step {t}, {k}: {m}",
            )
        # Per-parameter step counts: a parameter without a gradient neither decays nor
        # advances its t (the t**-tau step sizes), in their code and in ours.
        assert set(expected["state"]) == {k for k, p in params.items() if opt.state.get(p)}
        for k, st in expected["state"].items():
            ours = opt.state[params[k]]
            assert ours["step"] == st["step"], (t, k)
            for name in ("mu", "bg", "bhg"):
                torch.testing.assert_close(
                    ours[name],
                    f64(st[name]),
                    rtol=1e-12,
                    atol=1e-14,
                    msg=lambda m, t=t, k=k, name=name: f"step {t}, {k}.{name}: {m}",
                )


@pytest.mark.xfail(
    strict=True,
    reason=(
        "the published code keeps 2a, 2b0 and t as float32 0-dim tensors even for float64 "
        "parameters (2a - 1 = 1.00016594e-4 instead of 1.0002e-4); this repository computes them "
        "in float64, so it differs by up to ~5e-6 after five steps"
    ),
)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_vsgd_matches_the_authors_implementation_step_by_step(case, path):
    assert max_param_error(case, "as_published", path) <= 1e-14


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_vsgd_differs_from_the_published_code_only_by_its_float32_constants(case, path):
    # Measured: 4.75e-6 after five steps, nearly all of it from the float32 2a (the float32
    # prior scales and t**-tau add ~1e-8). A change of the rule itself moves the parameters
    # further: tau1 0.81 -> 0.8 by 1.1e-4, weight_decay 0.05 -> 0.049 by 1.2e-3.
    assert max_param_error(case, "as_published", path) < 1e-5
