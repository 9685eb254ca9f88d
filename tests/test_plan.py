"""The planned runs: the numbers the docs give are the ones `pipeline.plan` computes from the
shipped params.yaml."""

import re
from pathlib import Path

import pytest
from conftest import fake_prepared

from pipeline.config import load_params
from pipeline.plan import PINNED, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "preset,pattern",
    [
        (None, r"trains the (\d+) tuning runs\s+and the (\d+) final runs of the paper's protocol"),
        (
            "tiny",
            r"preset=tiny` from a fresh clone \(prepare, (\d+) tuning runs of SGD and VSGD, "
            r"(\d+)\s+final runs",
        ),
    ],
)
def test_the_docs_run_counts_are_the_plans(tmp_path, preset, pattern):
    fake_prepared(tmp_path)
    docs = (ROOT / "docs" / "pipeline.md").read_text()
    tuning, final = (int(n) for n in re.search(pattern, docs).groups())
    params = load_params(
        ROOT / "params.yaml", [f"data.root={tmp_path}"] + ([f"preset={preset}"] if preset else [])
    )
    planned = plan(params, PINNED)
    assert (len(planned.tuning), len(planned.final)) == (tuning, final)
