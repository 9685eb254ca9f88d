"""Variational Stochastic Gradient Descent (Chen, Kuzina, Esmaeili, Tomczak; TMLR 2025).

`from vsgd import VSGD` is the optimizer. The package's other modules (models, data,
trainer) load on first use, so `vsgd.spec` (names, defaults, run identity) imports without
torch.
"""

__all__ = ["VSGD"]


def __getattr__(name):
    if name == "VSGD":
        from .optim import VSGD

        return VSGD
    raise AttributeError(f"module 'vsgd' has no attribute {name!r}")
