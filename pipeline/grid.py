"""params -> the run grid: one resolved spec per (dataset, arch, optimizer, lr, seed).

A spec is everything one training run needs (docs/ARCHITECTURE.md, "Resolved run spec");
its `run_hash` (`vsgd.spec.run_hash`: what changes the result, nothing else) identifies the
result. A run writes it to `results/store/<run_hash>/`, where it stays whatever the grid
becomes; `results/runs/<name>/` shows the current grid's runs (`pipeline.results`).
"""

import functools
import json
from pathlib import Path

from vsgd.spec import OPTIMIZERS, ConfigError, run_hash
from vsgd.tracking import tracking_uri

from .config import resolve_run

RESULTS_DIR = "results/runs"     # the current grid, one directory per run name
STORE_DIR = "results/store"      # every finished result, by run hash
CHECKPOINT_DIR = "checkpoints"


def expand(params: dict) -> list[dict]:
    """Every run of the grid, lr grids included, in dataset/arch/optimizer/lr/seed order."""
    specs = []
    for dataset in params["datasets"]:
        for arch in params["archs"]:
            for optimizer in params["optimizers"]:
                grid = resolve_run(params, dataset, arch, optimizer)["optimizer"]["lr_grid"]
                for lr in grid or [None]:
                    for seed in params["seeds"]:
                        specs.append(build_spec(params, dataset, arch, optimizer, seed, lr))
    _refuse_duplicates(specs)
    return specs


def _refuse_duplicates(specs: list[dict]) -> None:
    """Two grid points with one identity would be one run reported twice."""
    first, problems = {}, []
    for spec in specs:
        other = first.setdefault(spec["run_hash"], spec)
        if other is not spec:
            problems.append(f"grid: {other['name']} and {spec['name']} are the same run "
                            "(identical settings); list each seed and lr once")
    if problems:
        raise ConfigError(problems)


def build_spec(params: dict, dataset: str, arch_key: str, optimizer: str, seed: int,
               lr: float | None = None) -> dict:
    """The resolved spec of one run; `lr` replaces the optimizer's lr (an lr-grid point)."""
    run = resolve_run(params, dataset, arch_key, optimizer)
    # Floats throughout, so `lr: 1` and `lr: 1.0` in params.yaml are the same run.
    args = {key: _floats(run["optimizer"][key]) for key in OPTIMIZERS[optimizer]}
    if lr is not None:
        args["lr"] = float(lr)
    data_dir = f"{params['data']['root']}/prepared/{dataset}"
    checksum = data_checksum(data_dir)
    remote = (params["storage"]["remote"] or "").rstrip("/")
    spec = {
        "dataset": dataset,
        "arch_key": arch_key,
        "arch": run["model"],
        "data": {"dir": data_dir, "checksum": checksum, "source": params["data"]["source"],
                 "uri": _dataset_uri(data_dir, remote, checksum)},
        "optimizer": {"name": optimizer, **args},
        "schedule": {"iterations": int(run["schedule"]["iterations"]),
                     "step_size": int(run["schedule"]["step_size"]),
                     "gamma": float(run["schedule"]["gamma"])},
        "batch_size": int(run["batch_size"]),
        "seed": int(seed),
        "training": dict(params["training"]),
        "tracking": {"uri": tracking_uri(params["tracking"]["uri"]),
                     "experiment": params["tracking"]["experiment"]},
    }
    spec["run_hash"] = run_hash(spec)
    lr_part = f"-lr{args['lr']:g}" if run["optimizer"]["lr_grid"] else ""
    spec["name"] = (f"{dataset}-{run['model']}-{optimizer}{lr_part}-s{seed}-"
                    f"{spec['run_hash'][:8]}")
    spec["output_dir"] = f"{STORE_DIR}/{spec['run_hash']}"
    spec["checkpoint"] = (f"{remote}/checkpoints/{spec['run_hash']}" if remote
                          else f"{CHECKPOINT_DIR}/{spec['run_hash']}")
    return dict(sorted(spec.items(), key=lambda kv: _ORDER.index(kv[0])))


@functools.lru_cache(maxsize=None)
def _dataset_uri(data_dir: str, remote: str, checksum: str | None) -> str | None:
    """Where a pod stages the dataset from: its `.dir` object in the DVC remote under
    `storage.remote` (md5s of every file, so computed once per prepared dataset; the
    checksum is part of the cache key so a re-prepared dataset is hashed again)."""
    if not remote or checksum is None:
        return None
    from .storage import dataset_uri   # boto3 only when a remote is configured
    return dataset_uri(data_dir, remote)


_ORDER = ("name", "run_hash", "dataset", "arch_key", "arch", "data", "optimizer", "schedule",
          "batch_size", "seed", "training", "output_dir", "checkpoint", "tracking")


def data_checksum(data_dir: str) -> str | None:
    """The prepared dataset's checksum from its manifest; None before `prepare` ran."""
    try:
        return json.loads((Path(data_dir) / "manifest.json").read_text())["checksum"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def _floats(value):
    if isinstance(value, list):
        return [float(v) for v in value]
    return float(value)
