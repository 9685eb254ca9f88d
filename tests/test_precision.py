"""`training.precision`: fp32 is strict float32 (TF32 off for matmuls and cuDNN, as on the
paper's RTX 2080 Ti), tf32 turns TF32 on, bf16 autocasts and keeps the rest strict. Building
a run sets the process-wide flags (checked on CPU); on a GPU the fp32 flags really give
float32 matmuls and tf32 does not."""

import pytest
import torch
from conftest import run_spec

from vsgd import trainer
from vsgd.spec import PRECISIONS, check_spec

# precision -> (float32 matmul precision, cuBLAS TF32, cuDNN TF32)
EXPECTED = {
    "fp32": ("highest", False, False),
    "tf32": ("high", True, True),
    "bf16": ("highest", False, False),
}


def flags():
    return (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )


def set_flags(matmul, cublas, cudnn):
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cuda.matmul.allow_tf32 = cublas
    torch.backends.cudnn.allow_tf32 = cudnn


@pytest.fixture(autouse=True)
def _restore_flags():
    """The flags are process-wide: leave them as they were for the other tests."""
    before = flags()
    yield
    set_flags(*before)


def test_precisions_allowed():
    assert PRECISIONS == ("fp32", "tf32", "bf16")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_building_a_run_sets_the_tf32_flags(data_root, tmp_path, precision):
    spec = run_spec(data_root, tmp_path, precision=precision)
    assert check_spec(spec) == []
    expected = EXPECTED[precision]
    # Start from the opposite setting, so each flag must be set by the build.
    set_flags("highest" if expected[1] else "high", not expected[1], not expected[2])
    run, _ = trainer.setup(spec)
    assert flags() == expected
    with run.autocast():
        assert torch.is_autocast_enabled("cpu") == (precision == "bf16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_matmul_on_the_gpu_is_strict_and_tf32_is_not(data_root, tmp_path):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2048, 2048, generator=gen, dtype=torch.float64) for _ in range(2))
    reference = a @ b
    errors = {}
    for precision in ("fp32", "tf32"):
        trainer.setup(run_spec(data_root, tmp_path, precision=precision, device="cuda"))
        product = (a.float().cuda() @ b.float().cuda()).double().cpu()
        errors[precision] = ((product - reference).norm() / reference.norm()).item()
    assert errors["fp32"] < 1e-5, errors
    assert errors["tf32"] > 1e-4, errors
