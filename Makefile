# The two entry points of the README:
#   make repro   set everything up, then run the whole pipeline (dvc repro) on params.yaml
#   make test    set everything up, then run the test suite
# and the training image (Dockerfile):
#   make image [REGISTRY=registry.example.com/]   build <registry>vsgd-repro:<code version tag>
#   make push                                     build and push it
#   make image-ref                                print its reference
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# dvc runs each stage's `python -m pipeline ...` with the `python` found on PATH: the venv's
# must come first, or the stages run under a Python without the project's dependencies.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench clean-venv image push image-ref

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

# Lint, format and the architecture's import contracts first: they take seconds.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)

# The image's tag is the code it holds (pipeline/image.py: project version + content hash),
# so a dirty tree is fine: its tag names exactly what it builds. REGISTRY empty: a local name
# (kind: `kind load docker-image $(make -s image-ref)`). Evaluated when a recipe runs, after
# `setup` has made the venv.
DOCKER    ?= docker
REGISTRY  ?=
IMAGE_TAG  = $(shell $(BIN)/python -m pipeline image --tag)
IMAGE     ?= $(shell $(BIN)/python -m pipeline image --repository $(REGISTRY)vsgd-repro)
# Recorded by the trainer with each run; `-dirty` when the tree differs from the commit.
# Optional locks off: reading the status must not write the index.
GIT_COMMIT = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(if $(shell \
             GIT_OPTIONAL_LOCKS=0 git status --porcelain 2>/dev/null),-dirty)

image: setup
	$(DOCKER) build --build-arg GIT_COMMIT=$(GIT_COMMIT) --build-arg IMAGE_TAG=$(IMAGE_TAG) \
	  -t $(IMAGE) .

push: image
	$(DOCKER) push $(IMAGE)

image-ref: setup
	@echo $(IMAGE)
