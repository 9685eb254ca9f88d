"""What this machine's CUDA is, asked in a child process with a time limit.

A broken driver can hang CUDA's initialisation or crash the process that tries it; the child
(`python -m pipeline.doctor.cuda_probe`) takes that risk, the doctor only reads its answer
(one JSON object on stdout) or says it had none within the limit. The child reports what
torch was built with, whether CUDA initialises, the driver, and per GPU its name, memory,
compute capability and the result of a real small matmul on it, checked against the CPU.

`probe_cuda(timeout)` is what the doctor calls; tests replace it with the facts of the
machine they pretend to be (a dict of the same form).
"""

import json
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

PROBE_MODULE = "pipeline.doctor.cuda_probe"
PROBE_TIMEOUT = 60.0  # seconds; CUDA's first initialisation on a large node takes a few
DRIVER_FILE = Path("/proc/driver/nvidia/version")


def probe_cuda(timeout: float = PROBE_TIMEOUT) -> dict:
    """The child's facts (see `probe`), or `available: False` with why none came back."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", PROBE_MODULE],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return _failed(
            f"the CUDA probe did not finish within {timeout:g} s: CUDA's initialisation hangs "
            "(check the driver: `nvidia-smi`)"
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return _failed(f"the CUDA probe exited with {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def _failed(error: str) -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "built_cuda": torch.version.cuda,
        "cudnn": None,
        "available": False,
        "error": error,
        "driver": driver_version(),
        "driver_cuda": None,
        "device_count": 0,
        "gpus": [],
    }


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (`580.65.06`), from the kernel module's file or
    `nvidia-smi`; None where there is neither."""
    try:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\w.-]*)", DRIVER_FILE.read_text())
        if found:
            return found.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out[0] if out else None
    return None


def probe() -> dict:
    """In the child: torch's build, CUDA's state, each GPU, a small matmul on each."""
    import torch

    facts = {
        "torch": torch.__version__,
        "built_cuda": torch.version.cuda,
        "cudnn": None,
        "available": False,
        "error": None,
        "driver": driver_version(),
        "driver_cuda": None,
        "device_count": 0,
        "gpus": [],
    }
    try:
        facts["cudnn"] = torch.backends.cudnn.version()
    except Exception as exc:  # noqa: BLE001 - a missing or broken cuDNN is a fact to report
        facts["cudnn"] = f"unavailable ({exc})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    facts["available"] = available
    if not available:
        said = [str(w.message) for w in caught if "CUDA" in str(w.message)]
        facts["error"] = (
            said[0]
            if said
            else "a CPU-only build of torch"
            if torch.version.cuda is None
            else "no CUDA device visible (driver not loaded, or CUDA_VISIBLE_DEVICES empty)"
        )
        return facts
    if hasattr(torch._C, "_cuda_getDriverVersion"):
        version = torch._C._cuda_getDriverVersion()  # e.g. 13000: the CUDA the driver supports
        facts["driver_cuda"] = f"{version // 1000}.{version % 1000 // 10}"
    facts["device_count"] = torch.cuda.device_count()
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = a @ a
    for index in range(facts["device_count"]):
        props = torch.cuda.get_device_properties(index)
        gpu = {
            "index": index,
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 2),
            "capability": f"{props.major}.{props.minor}",
            "bf16": props.major >= 8,
            "tf32": props.major >= 8,
        }
        start = time.perf_counter()
        try:
            on_gpu = a.to(f"cuda:{index}")
            got = (on_gpu @ on_gpu).cpu()
            torch.cuda.synchronize(index)
            error = float((got - expected).abs().max())
            gpu["tiny_op"] = {
                "ok": error < 1e-9,
                "max_error": error,
                "seconds": round(time.perf_counter() - start, 3),
            }
        except Exception as exc:  # noqa: BLE001 - a device that fails its first op is the finding
            gpu["tiny_op"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        facts["gpus"].append(gpu)
    return facts


if __name__ == "__main__":
    print(json.dumps(probe()))
