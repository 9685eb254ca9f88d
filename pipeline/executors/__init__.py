"""Executors: local processes (`local`) or Kubernetes Jobs (`kubernetes`), behind one
interface (`base.Executor`); `get_executor` gives the one params.yaml asks for. The stage
never asks which kind it has."""

from ..params_check import local_settings
from ..storage import run_env
from .base import Executor, RunOutcome, spec_path, write_spec
from .kubernetes import KubernetesExecutor
from .local import LocalExecutor, visible_gpus

__all__ = [
    "Executor",
    "KubernetesExecutor",
    "LocalExecutor",
    "RunOutcome",
    "get_executor",
    "spec_path",
    "write_spec",
]


def get_executor(params: dict) -> Executor:
    kind = params["executor"]["kind"]
    if kind == "local":
        local = local_settings(params)
        return LocalExecutor(
            max_parallel=params["executor"]["max_parallel"],
            run_env=lambda spec: run_env(params, spec),
            gpus=local["gpus"],
            runs_per_gpu=local["runs_per_gpu"],
            # This machine's GPUs, asked only when a run may use one (it imports torch).
            machine_gpus=visible_gpus,
        )
    if kind == "kubernetes":
        return KubernetesExecutor(params)
    raise ValueError(f"unknown executor.kind {kind!r}")
