# Training image: one run of the grid per container (`python -m pipeline.train --spec-json`),
# and the in-cluster launcher (k8s/components/launcher). Build it with
#   make image REGISTRY=registry.example.com/    (then `make push`)
# which tags it <registry>vsgd-repro:<project version>-<code hash> (`make image-ref`, from
# pipeline/image.py): the tag is the code, so the executor's default image is always the one
# holding the code it runs. Docker, podman or nerdctl: `make image DOCKER=podman`.
# For bit-for-bit reruns, pin the pushed image by its digest in params.yaml:
#   docker buildx imagetools inspect <ref>        (the registry's digest), or after a push
#   docker inspect --format '{{index .RepoDigests 0}}' <ref>
#   executor.kubernetes.image: registry.example.com/vsgd-repro@sha256:...
# The base already holds torch 2.14.1 + CUDA 13.0 + cuDNN 9 (torch 2.14.1+cu130, cuBLAS
# 13.1.1.3, cuDNN 9.24.0.43: the versions in requirements.lock), so pip only adds the rest.
# Pin the base by digest the same way:
#   docker buildx imagetools inspect pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# The base's Python is the system one (Ubuntu 24.04, PEP 668): this container is its only
# user, so installing into it is what we want.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Jobs run `python`; some bases only ship `python3`.
RUN command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python

# A C and C++ toolchain for torch.compile (`training.compile: auto` compiles on CUDA): Triton
# builds a small C launcher against Python.h at the first compiled CUDA step, and inductor's
# CPU code is C++. A `-runtime` base may have no compiler, or gcc without the libc headers,
# and then the first compiled step fails. g++ without recommends brings gcc and the libc and
# libstdc++ headers (already installed packages are left as they are); python3-dev only where
# the interpreter has no Python.h (a system Python: conda's has it), looked up where Triton
# looks (build.py reads Debian's posix_local scheme as posix_prefix).
RUN headers=$(python -c "import sysconfig as s; scheme = s.get_default_scheme(); print(s.get_paths('posix_prefix' if scheme == 'posix_local' else scheme)['include'])") \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
      $(test -f "$headers/Python.h" || echo python3-dev) \
 && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid/gid: the Job template's securityContext runs as 10001.
RUN groupadd --gid 10001 vsgd \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin vsgd \
 && install -d -o 10001 -g 10001 /scratch

WORKDIR /app

# Dependencies first (changes rarely): the project's requirements and its `pipeline` extra
# (the trainer's MLflow, S3, Kubernetes and data stack), resolved to the pinned versions of
# requirements.lock. torch==x also accepts the base's x+cu130 build. The extra's own
# self-references (vsgd-repro[...]) are left out: the project itself is installed below.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(r for r in p['dependencies'] + p['optional-dependencies']['pipeline'] if not r.startswith(p['name'])))" > /tmp/requirements.txt \
 && python -m pip install -c requirements.lock -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The toolchain check, with the torch and Triton the runs use: Triton's own C build (its
# compiler lookup, the libc and Python headers, a shared object linked) and torch.compile of a
# tiny function on CPU (inductor's C++ path, OpenMP). Without a GPU at build time it cannot
# prove the CUDA side: Triton's launcher built against cuda.h and linked to the driver's
# libcuda.so (mounted into the container only at run time), ptxas for the GPU's architecture,
# a compiled kernel running; the first compiled training step does that.
RUN cd / && export TRITON_CACHE_DIR=/tmp/toolchain-check TORCHINDUCTOR_CACHE_DIR=/tmp/toolchain-check \
 && python -c "\
import torch; \
from triton.runtime.build import compile_so_from_src; \
so = compile_so_from_src('#include <Python.h>' + chr(10) + 'int check(void) { return Py_IsInitialized(); }', 'toolchain_check'); \
compiled = torch.compile(lambda x: 2 * x + 1); \
x = torch.arange(4.0); \
assert torch.equal(compiled(x), 2 * x + 1), 'torch.compile computed another result'; \
print('C toolchain: Triton builds', so, 'and torch.compile runs on CPU')" \
 && rm -rf /tmp/toolchain-check

# What the build is of (`make image` passes both): the commit, `-dirty` with uncommitted
# changes, which the trainer records with each run; and the tag, which the check below
# recomputes from the installed code. Declared here, after the dependencies, so that a new
# commit does not rebuild their layer.
ARG GIT_COMMIT=unknown
ARG IMAGE_TAG=
ENV VSGD_GIT_COMMIT=$GIT_COMMIT \
    VSGD_IMAGE_TAG=$IMAGE_TAG

# The code last (changes often): a cheap layer without dependency resolution. /app/project
# is the project as the in-cluster launcher needs it: dvc.yaml, the default params.yaml (a
# start for the vsgd-params ConfigMap) and the code the stages declare as dependencies.
WORKDIR /app/project
COPY pyproject.toml README.md dvc.yaml params.yaml ./
COPY vsgd ./vsgd
COPY pipeline ./pipeline
# Packages of optimizers named by import path (pipeline/requirements-optimizers.txt, empty
# by default), with the lock's pins for whatever they share with the project (torch, numpy).
# Then the build-time check, from / so that only the installed package is seen (not these
# sources): the trainer imports, a Job renders from the packaged template through the executor's code
# path (schema.template_path -> render.load_template -> render.render_job), the published
# reference numbers load, and the installed code is the code IMAGE_TAG names (a build from
# another tree than the tag says fails here, not in the cluster).
RUN if grep -qvE '^[[:space:]]*(#|$)' pipeline/requirements-optimizers.txt; then \
      python -m pip install -c /app/requirements.lock -r pipeline/requirements-optimizers.txt; fi \
 && python -m pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && cd / && python -c "\
import os, vsgd, pipeline.train, pipeline.executors.kubernetes; \
from pipeline import aggregate, image; \
from pipeline.k8s import render, schema; \
assert not render.__file__.startswith('/app/'), render.__file__; \
tag, built = os.environ.get('VSGD_IMAGE_TAG'), image.image_tag(); \
assert not tag or built == tag, f'the installed code is {built}, not IMAGE_TAG {tag}'; \
params = {'storage': {'remote': 's3://vsgd/check'}}; \
spec = {'name': 'check', 'run_hash': '0123456789abcdef', 'dataset': 'cifar100', \
        'arch': 'vgg16', 'optimizer': {'name': 'vsgd'}, 'seed': 0}; \
job = render.render_job(spec, params, render.load_template(schema.template_path(params))); \
assert job['kind'] == 'Job' and schema.train_container(job)['args'][0] == '--spec-json', job; \
assert aggregate.load_references(); \
print('installed package renders Jobs:', schema.template_path(params), built)"

USER 10001:10001
WORKDIR /scratch
ENTRYPOINT ["python", "-m", "pipeline.train"]
CMD ["--help"]
