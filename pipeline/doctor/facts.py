"""The facts of this machine that decide whether and how the protocol runs here: Python,
the installed versions of the pipeline's stack, what `training.precision` sets on this
machine, and which device each of the protocol's device settings resolves to."""

import importlib.metadata
import os
import platform
import sys
import warnings

import torch

from vsgd import engine

# The pipeline's stack, by distribution name, and when a missing one is a problem: the
# tracking store (mlflow), the Kubernetes executor (kubernetes), the remote store (boto3);
# dvc runs the stages (`dvc repro`) but no `python -m pipeline` command needs it.
PACKAGES = ("numpy", "dvc", "mlflow", "kubernetes", "boto3")

# What `training.precision` means (vsgd.engine.set_float32_precision and the autocast of
# vsgd.engine.build).
PRECISION_MEANING = {
    "fp32": "strict float32: TF32 off for float32 matmuls and cuDNN convolutions (the paper's "
    "RTX 2080 Ti has no TF32; PyTorch would use it for convolutions on Ampere and later)",
    "tf32": "TF32 for float32 matmuls and cuDNN convolutions (inputs rounded to 10 mantissa "
    "bits; Ampere and later, compute capability >= 8.0)",
    "bf16": "bfloat16 autocast for the forward pass; what stays float32 is strict (TF32 off); "
    "VSGD keeps float32 state",
}


def python_facts() -> dict:
    return {
        "version": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def package_versions() -> dict:
    """Installed version of each of PACKAGES (None: not installed), read from the
    distributions' metadata: importing mlflow or kubernetes costs seconds."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def precision_facts(precision: str, cuda: dict) -> dict:
    """What `training.precision` sets in this process (the flags as torch reports them after
    `vsgd.engine.set_float32_precision`) and what that means on this machine's devices."""
    engine.set_float32_precision(precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; we read both
        flags = {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "autocast": "bfloat16" if precision == "bf16" else None,
        }
    gpus = cuda.get("gpus") or []
    if not gpus:
        here = "no GPU: on the CPU the TF32 flags change nothing" + (
            "; bfloat16 autocast runs, slower than float32 on most CPUs"
            if precision == "bf16"
            else ""
        )
    elif precision == "tf32" and not all(g["tf32"] for g in gpus):
        here = "a GPU without TF32 (compute capability < 8.0) here: it computes as fp32"
    elif precision == "bf16" and not all(g["bf16"] for g in gpus):
        here = "a GPU without native bfloat16 (compute capability < 8.0) here: emulated, slow"
    else:
        here = "as intended on every GPU here"
    return {
        "setting": precision,
        "meaning": PRECISION_MEANING[precision],
        "flags": flags,
        "here": here,
    }


def cuda_works(cuda: dict) -> bool:
    return bool(cuda.get("available")) and all(g["tiny_op"]["ok"] for g in cuda["gpus"])


def device_problems(key: str, device: str, cuda: dict) -> tuple[list[str], str]:
    """Problems with a device setting (`training.device`, `timing.device`) on this machine,
    and where it resolves to (engine.resolve_device's rule, with the probe's facts)."""
    # A GPU that fails its first operation is a problem of its own (the report's), whichever
    # setting would use it.
    if device == "auto":
        if cuda.get("available"):
            return [], "cuda"
        if torch.backends.mps.is_available():
            return [], "mps"
        return [], "cpu"
    if device == "cpu":
        return [], "cpu"
    if device == "mps":
        if torch.backends.mps.is_available():
            return [], "mps"
        return [f"{key}: 'mps' but MPS is not available here; allowed: auto, cpu, cuda"], "mps"
    # cuda or cuda:N
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if not cuda.get("available"):
        return [f"{key}: {device!r} but CUDA is not available here ({cuda.get('error')})"], device
    if index >= cuda["device_count"]:
        return [
            f"{key}: {device!r} but this machine has {cuda['device_count']} GPU(s) "
            f"(cuda:0 to cuda:{cuda['device_count'] - 1})"
        ], device
    return [], device
