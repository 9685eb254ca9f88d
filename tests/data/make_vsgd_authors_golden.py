"""Write tests/data/vsgd_authors_golden.json: VSGD steps computed by the authors' own code.

Not part of the test suite (tests/test_optim_authors.py only reads the JSON). The authors' file
is MIT-licensed but is not vendored into this repository; export it outside the tree and pass
its path::

    git --git-dir=<mirror of github.com/generativeai-tue/vsgd> show \\
        ab7a2f5384a98a4bfc52979ff88be812a43b23d6:src/vsgd.py > /tmp/authors_vsgd/vsgd.py
    .venv/bin/python tests/data/make_vsgd_authors_golden.py /tmp/authors_vsgd/vsgd.py

The file's git blob hash is checked, so the JSON always describes the same source.

Everything runs in float64 so the comparison can be tight. The authors' optimizer keeps its
scalar state (``pa2``, ``pbg2``, ``pbhg2``, ``step``) as default-dtype (float32) 0-dim
tensors whatever the parameter dtype, so ``2a``, ``2b0``, ``2a - 1`` and ``t**-tau`` enter the
float64 update rounded to float32. Each case is therefore recorded twice:

* ``as_published``: their class exactly as published.
* ``float64_scalar_state``: their class unchanged, with the state their ``_init_group`` would
  create put in place before the first step, the same values but as float64 0-dim tensors
  (their ``_init_group`` only initialises an empty state). This isolates the update rule from
  the float32 constants.
"""

import argparse
import datetime
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

REPOSITORY = "https://github.com/generativeai-tue/vsgd"
COMMIT = "ab7a2f5384a98a4bfc52979ff88be812a43b23d6"
PATH = "src/vsgd.py"
BLOB = "d7dcdea4b68b4dd79a80540a80ba768dd25f39c3"  # git hash-object of PATH at COMMIT
LICENSE = "MIT (LICENSE at the same commit: Copyright (c) 2024 Generativ/e AI group at the TU/e)"

SHAPES = {"weight": [3, 4], "bias": [4], "scale": []}
STEPS = 5
SEED = 20240409

# Their class defaults (and configs/train/optimizer/vsgd.yaml: lr 0.1, weight_decay 0.0).
DEFAULTS = dict(lr=0.1, ghattg=30.0, ps=1e-8, tau1=0.81, tau2=0.9, weight_decay=0.0, eps=1e-8)

CASES = [
    dict(name="defaults", hyperparameters=DEFAULTS, skip={}),
    # Weight decay, and a parameter without a gradient on one step: its step count (and its
    # decay) must pause, per parameter, in both implementations.
    dict(
        name="weight_decay_and_a_skipped_step",
        hyperparameters={**DEFAULTS, "weight_decay": 0.05},
        skip={"bias": [3]},
    ),
]


def git_blob_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def load_authors(path: Path):
    data = path.read_bytes()
    if git_blob_hash(data) != BLOB:
        sys.exit(f"{path} is not {PATH} at {COMMIT} (git blob {BLOB})")
    spec = importlib.util.spec_from_file_location("authors_vsgd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, data


def inputs():
    gen = torch.Generator().manual_seed(SEED)
    start = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    # Gradient scales vary over the steps so the variance estimates have something to track.
    scales = [1.0, 0.5, 2.0, 1.0, 0.25]
    grads = [
        {
            k: scales[t] * torch.randn(s, generator=gen, dtype=torch.float64)
            for k, s in SHAPES.items()
        }
        for t in range(STEPS)
    ]
    return start, grads


def float64_state(p, h):
    # Their _init_group's initial state, with the scalars in float64 instead of float32.
    f64 = dict(dtype=torch.float64)
    return {
        "mug": torch.zeros_like(p),
        "bg": torch.zeros_like(p),
        "bhg": torch.zeros_like(p),
        "pa2": torch.tensor(2.0 * h["ps"] + 1.0 + 1e-4, **f64),
        "pbg2": torch.tensor(2.0 * h["ps"], **f64),
        "pbhg2": torch.tensor(2.0 * h["ghattg"] * h["ps"], **f64),
        "step": torch.tensor(0.0, **f64),
    }


def run(authors, case, start, grads, scalar_state):
    h = case["hyperparameters"]
    params = {k: v.clone() for k, v in start.items()}
    opt = authors.VSGD(list(params.values()), **h)
    if scalar_state == "float64":
        for p in params.values():
            opt.state[p] = float64_state(p, h)
    steps = []
    for t, gs in enumerate(grads, start=1):
        for k, p in params.items():
            p.grad = None if t in case["skip"].get(k, []) else gs[k].clone()
        opt.step()
        record = {"params": {}, "state": {}}
        for k, p in params.items():
            record["params"][k] = p.tolist()
            st = opt.state[p]
            if st:
                # Their names -> this repository's: mug -> mu, bg -> bg, bhg -> bhg.
                record["state"][k] = {
                    "step": int(st["step"].item()),
                    "mu": st["mug"].tolist(),
                    "bg": st["bg"].tolist(),
                    "bhg": st["bhg"].tolist(),
                }
        steps.append(record)
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "authors_file",
        type=Path,
        help=f"{PATH} of {REPOSITORY} at {COMMIT}, exported outside this tree",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("vsgd_authors_golden.json")
    )
    parser.add_argument(
        "--fetched",
        default=datetime.date.today().isoformat(),
        help="date the authors' repository was fetched (YYYY-MM-DD)",
    )
    args = parser.parse_args()
    authors, data = load_authors(args.authors_file)
    torch.set_default_dtype(torch.float32)  # their scalar state uses the default dtype
    start, grads = inputs()
    golden = {
        "source": {
            "repository": REPOSITORY,
            "commit": COMMIT,
            "path": PATH,
            "class": "VSGD",
            "git_blob": BLOB,
            "sha256": hashlib.sha256(data).hexdigest(),
            "license": LICENSE,
            "fetched": args.fetched,
            "generated_with": f"torch {torch.__version__}, tests/data/make_vsgd_authors_golden.py",
            "weight_decay": "decoupled (AdamW-style): param *= 1 - lr*weight_decay before the "
            "update, only on steps where the parameter has a gradient",
            "state_names": {"mug": "mu", "bg": "bg", "bhg": "bhg", "step": "step"},
            "scalar_state": {
                "as_published": "pa2, pbg2, pbhg2, step are float32 0-dim tensors, so 2a, "
                "2b0, 2a - 1 and t**-tau reach the float64 update rounded "
                "to float32",
                "float64_scalar_state": "the same class, its initial state placed before the "
                "first step with those four scalars in float64",
            },
        },
        "dtype": "float64",
        "inputs": {
            "seed": SEED,
            "shapes": SHAPES,
            "initial_params": {k: v.tolist() for k, v in start.items()},
            "grads": [{k: v.tolist() for k, v in gs.items()} for gs in grads],
        },
        "cases": [
            {
                "name": case["name"],
                "hyperparameters": case["hyperparameters"],
                "no_grad_on_steps": case["skip"],
                "steps": {
                    variant: run(authors, case, start, grads, dtype)
                    for variant, dtype in (
                        ("as_published", "float32"),
                        ("float64_scalar_state", "float64"),
                    )
                },
            }
            for case in CASES
        ],
    }
    text = json.dumps(golden, indent=1)
    # One line per innermost list of numbers, so a weight row reads as a row.
    text = re.sub(
        r"\[[^\[\]{}]*\]",
        lambda m: " ".join(m.group().split()).replace("[ ", "[").replace(" ]", "]"),
        text,
    )
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
