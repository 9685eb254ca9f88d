"""Orchestration of the VSGD reproduction: params.yaml -> run grid -> executors -> tables."""

import importlib.util

# `pip install .` is the optimizer library alone; the pipeline's stack is an extra. Say so
# instead of failing later on the first missing import.
if importlib.util.find_spec("yaml") is None:
    raise ImportError(
        "the reproduction pipeline needs its extra: "
        "pip install 'vsgd-repro[pipeline]' (in a checkout: pip install "
        "'.[pipeline]')"
    )
