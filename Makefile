# The two entry points of the README:
#   make repro   set everything up, then run the whole pipeline (dvc repro) on params.yaml
#   make test    set everything up, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# dvc runs each stage's `python -m pipeline ...` with the `python` found on PATH: the venv's
# must come first, or the stages run under a Python without the project's dependencies.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench clean-venv

setup: $(STAMP)

# pip 23 (bundled with Python 3.11) backtracks for 40+ minutes on dvc-s3/aiobotocore/boto3;
# a current pip resolves the pinned set in seconds, so upgrade it first.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U "pip>=25"
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[pipeline,bench,dev]"
	touch $(STAMP)

repro: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
