"""Checks that make a run fail with 78 at once rather than train the wrong thing or waste a
retry: the spec's run hash is recomputed with this installation's code (a mismatch is a
stale image, `StaleImage`), and with `VSGD_REQUIRE_CUDA=1` (a Job that requests a GPU) CUDA
must be available."""

import os

from vsgd.spec import TRAINING_DEFAULTS, ConfigError, code_version, run_hash

from .contract import CUDA_DRIVER, REQUIRE_CUDA_ENV, STALE_IMAGE


class StaleImage(ConfigError):
    """The spec's run hash was computed with other code than this installation's."""

    def __str__(self):
        return self.problems[0]


def check_code(spec: dict) -> None:
    """The spec's run hash is the one this installation computes: else the image is stale
    (StaleImage), or the spec was changed after it was built (ConfigError)."""
    ours, expected = run_hash(spec), spec["run_hash"]
    if ours == expected:
        return
    theirs, here = spec.get("code_version"), code_version()
    if theirs == here:
        raise ConfigError(
            [
                f"run_hash: {expected} is not the hash of this spec ({ours}, with "
                f"the same code version {here[:12]}): the spec was changed after "
                "it was built; build it again"
            ]
        )
    raise StaleImage(
        [
            f"{STALE_IMAGE}: the spec was built by code version "
            f"{theirs[:12] if theirs else 'unknown'} (run hash {expected}), this image has code "
            f"version {here[:12]} (run hash {ours}): it would not train the run its hash names. "
            "Rebuild and push the image (`make image`) from the launcher's checkout, then start "
            "the run again"
        ]
    )


def check_cuda(spec: dict) -> None:
    """With REQUIRE_CUDA_ENV=1 (the Job requests a GPU), CUDA must be available and the
    spec must not ask for another device: a pod that would train on its CPU fails at once."""
    if os.environ.get(REQUIRE_CUDA_ENV) != "1":
        return
    problems = []
    device = {**TRAINING_DEFAULTS, **(spec.get("training") or {})}["device"]
    if device in ("cpu", "mps"):
        problems.append(
            f"training.device: {device!r}, but the Job requests a GPU "
            f"({REQUIRE_CUDA_ENV}=1): set training.device to auto or cuda, or "
            "request no GPU"
        )
    import torch

    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        problems.append(
            "GPU requested but CUDA is not available: driver/device plugin (the node needs "
            f"an NVIDIA driver {CUDA_DRIVER} for the image's CUDA 13.0, and the NVIDIA device "
            "plugin or the GPU Operator must give this pod its nvidia.com/gpu; check "
            "`nvidia-smi` on the node and `kubectl describe node`; PyTorch "
            f"{torch.__version__} here is {built})"
        )
    if problems:
        raise ConfigError(problems)
