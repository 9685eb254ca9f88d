"""params -> the runs: the tune stage's grid points and the final grid, one resolved spec
per run.

A spec is everything one training run needs (docs/ARCHITECTURE.md, "Resolved run spec");
its `run_hash` (`vsgd.spec.run_hash`: what changes the result, nothing else) identifies the
result. A run writes it to `results/store/<run_hash>/`, where it stays whatever the grid
becomes; `results/runs/<name>/` shows the current grid's runs (`pipeline.results`).
"""

import functools
import itertools
import json
from pathlib import Path

from vsgd.imported_optimizers import CLASS_KEY, PACKAGE_KEY, provider
from vsgd.spec import OPTIMIZERS, STAGE_KEY, ConfigError, code_version, run_hash, tunable
from vsgd.tracking import tracking_uri

from .cells import resolve_run, tuned_cells
from .storage import dataset_uri

RESULTS_DIR = "results/runs"  # the current grid, one directory per run name
STORE_DIR = "results/store"  # every finished result, by run hash
CHECKPOINT_DIR = "checkpoints"


def expand(params: dict, selection: dict | None = None) -> list[dict]:
    """The final runs: every dataset x arch x optimizer x seed, in that order.

    A tuned cell (`pipeline.cells.tuned_cells`) trains the values the tune stage chose,
    `selection[(dataset, arch, optimizer)]` (see `pipeline.tune.load_selection`); a cell
    whose every grid point diverged (selection None) has no final runs. Without a selection
    for a tuned cell, raises ConfigError: the tune stage has to run first.
    """
    tuned = set(tuned_cells(params))
    missing = sorted(cell for cell in tuned if cell not in (selection or {}))
    if missing:
        raise ConfigError(
            [
                f"tune: no selection for {'/'.join(missing[0])}"
                f"{f' and {len(missing) - 1} more cells' if len(missing) > 1 else ''}"
                "; run the tune stage first (`dvc repro` or `python -m pipeline "
                "tune`)"
            ]
        )
    specs = []
    for dataset in params["datasets"]:
        for arch in params["archs"]:
            for optimizer in params["optimizers"]:
                cell = (dataset, arch, optimizer)
                values = selection[cell] if cell in tuned else {}
                if values is None:
                    continue
                for seed in params["seeds"]:
                    specs.append(build_spec(params, dataset, arch, optimizer, seed, values))
    _refuse_duplicates(specs)
    return specs


def tuning_specs(params: dict) -> list[dict]:
    """The tune stage's runs: one per grid point of every tuned cell."""
    specs = []
    for cell in tuned_cells(params):
        grid = resolve_run(params, *cell)["optimizer"]["grid"]
        for point in grid_points(grid):
            specs.append(build_spec(params, *cell, params["tune"]["seed"], point, tuning=True))
    _refuse_duplicates(specs)
    return specs


def grid_points(grid: dict) -> list[dict]:
    """{"lr": [a, b], "momentum": [c]} -> [{"lr": a, "momentum": c}, {"lr": b, ...}]: the
    product of the values, in the order params.yaml lists them."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


def _refuse_duplicates(specs: list[dict]) -> None:
    """Two grid points with one identity would be one run reported twice."""
    first, problems = {}, []
    for spec in specs:
        other = first.setdefault(spec["run_hash"], spec)
        if other is not spec:
            problems.append(
                f"grid: {other['name']} and {spec['name']} are the same run "
                "(identical settings); list each seed and lr once"
            )
    if problems:
        raise ConfigError(problems)


def build_spec(
    params: dict,
    dataset: str,
    arch_key: str,
    optimizer: str,
    seed: int,
    values: dict | None = None,
    tuning: bool = False,
) -> dict:
    """The resolved spec of one run; `values` replace optimizer arguments (a tuned or a
    grid point's values). A tuning run (`tuning`) trains at `tune.budget` of the iterations
    (StepLR milestones scaled alike) on the training split minus `tune.validation_size`
    images, and never evaluates the test set. Its `stage` is "tune" for a tuning run, else
    "train" (the final grid, a run by hand)."""
    run = resolve_run(params, dataset, arch_key, optimizer)
    # Floats throughout, so `lr: 1` and `lr: 1.0` in params.yaml are the same run; a choice
    # (VSGD's `implementation`) as written.
    if optimizer in OPTIMIZERS:
        given, numbers = run["optimizer"], tunable(optimizer)
        args = {k: _floats(given[k]) if k in numbers else given[k] for k in OPTIMIZERS[optimizer]}
        args.update({key: _floats(value) for key, value in (values or {}).items()})
    else:
        args = _imported_args(run["optimizer"], values)
    schedule = {
        "iterations": int(run["schedule"]["iterations"]),
        "step_size": int(run["schedule"]["step_size"]),
        "gamma": float(run["schedule"]["gamma"]),
    }
    training = dict(params["training"])
    if tuning:
        budget = float(params["tune"]["budget"])
        schedule["iterations"] = max(1, round(schedule["iterations"] * budget))
        schedule["step_size"] = max(1, round(schedule["step_size"] * budget))
        training.update(validation_size=int(params["tune"]["validation_size"]), eval_test=False)
    data_dir = f"{params['data']['root']}/prepared/{dataset}"
    checksum = data_checksum(data_dir)
    remote = (params["storage"]["remote"] or "").rstrip("/")
    spec = {
        "dataset": dataset,
        "arch_key": arch_key,
        "arch": run["model"],
        "data": {
            "dir": data_dir,
            "checksum": checksum,
            "source": params["data"]["source"],
            "uri": _dataset_uri(data_dir, remote, checksum),
        },
        "optimizer": {"name": optimizer, **args},
        "schedule": schedule,
        "batch_size": int(run["batch_size"]),
        "seed": int(seed),
        "training": training,
        "tracking": {
            "uri": tracking_uri(params["tracking"]["uri"]),
            "experiment": params["tracking"]["experiment"],
            "system_metrics": params["tracking"].get("system_metrics", "auto"),
        },
    }
    spec["run_hash"] = run_hash(spec)
    # Which stage the run is for, for the MLflow tag: bookkeeping, not identity.
    spec[STAGE_KEY] = "tune" if tuning else "train"
    # The code the hash was computed with: a pod whose code differs (a stale image) names
    # both versions instead of training a run that is not the one its hash says.
    spec["code_version"] = code_version()
    point = "".join(f"-{key}{_short(args[key])}" for key in values or {}) if tuning else ""
    spec["name"] = (
        f"{'tune-' if tuning else ''}{dataset}-{run['model']}-{optimizer}{point}"
        f"-s{seed}-{spec['run_hash'][:8]}"
    )
    spec["output_dir"] = f"{STORE_DIR}/{spec['run_hash']}"
    spec["checkpoint"] = (
        f"{remote}/checkpoints/{spec['run_hash']}"
        if remote
        else f"{CHECKPOINT_DIR}/{spec['run_hash']}"
    )
    return dict(sorted(spec.items(), key=lambda kv: _ORDER.index(kv[0])))


def _imported_args(entry: dict, values: dict | None) -> dict:
    """An imported optimizer's spec section: its import path, the distribution providing it
    (both part of the run identity) and its hyperparameters as written, except that `lr` is
    a float (1 and 1.0 are one run); other values keep their type: a constructor may want an
    int."""
    args = {k: v for k, v in entry.items() if k not in (CLASS_KEY, "grid")}
    args.update(values or {})
    if isinstance(args.get("lr"), (int, float)) and not isinstance(args["lr"], bool):
        args["lr"] = float(args["lr"])
    return {CLASS_KEY: entry[CLASS_KEY], PACKAGE_KEY: provider(entry[CLASS_KEY]), **args}


@functools.cache
def _dataset_uri(data_dir: str, remote: str, checksum: str | None) -> str | None:
    """Where a pod stages the dataset from: its `.dir` object in the DVC remote under
    `storage.remote` (md5s of every file, so computed once per prepared dataset; the
    checksum is part of the cache key so a re-prepared dataset is hashed again)."""
    if not remote or checksum is None:
        return None
    return dataset_uri(data_dir, remote)


_ORDER = (
    "name",
    "run_hash",
    STAGE_KEY,
    "dataset",
    "arch_key",
    "arch",
    "data",
    "optimizer",
    "schedule",
    "batch_size",
    "seed",
    "training",
    "output_dir",
    "checkpoint",
    "tracking",
    "code_version",
)


def data_checksum(data_dir: str) -> str | None:
    """The prepared dataset's checksum from its manifest; None before `prepare` ran."""
    try:
        return json.loads((Path(data_dir) / "manifest.json").read_text())["checksum"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def _short(value) -> str:
    return "_".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def _floats(value):
    if isinstance(value, list):
        return [float(v) for v in value]
    return float(value)
