"""The grid's cells as params.yaml defines them: the settings of one (dataset, arch,
optimizer) cell with its experiments applied (`resolve_run`), the optimizers a grid may list,
the cells whose hyperparameters the tune stage chooses, a dataset's split sizes. Read-only
queries of validated (or partly validated) params."""

from vsgd.data.registry import DATASETS as DATASET_INFO
from vsgd.spec import ARCHS, DATASETS, OPTIMIZERS
from vsgd.spec import IMPORTED_CLASS as CLASS_KEY


def resolve_run(params: dict, dataset: str, arch: str, optimizer: str) -> dict:
    """Settings of one grid cell: protocol and optimizer defaults, then matching experiments.

    Returns `{model, batch_size, schedule, optimizer}` where `optimizer` holds the
    constructor arguments plus `grid` (hyperparameter -> values to tune over; {} pins).
    """
    protocol = params["protocol"][dataset]
    run = {
        "model": protocol["models"][arch],
        "batch_size": protocol["batch_size"][arch],
        "schedule": dict(protocol["schedule"]),
        "optimizer": {"grid": {}, **params["optimizer"][optimizer]},
    }
    cell = {"dataset": dataset, "arch": arch, "optimizer": optimizer}
    for exp in params.get("experiments") or []:
        if all(cell.get(k) == v for k, v in (exp.get("match") or {}).items()):
            run["optimizer"].update(exp.get("optimizer") or {})
            run["schedule"].update(exp.get("schedule") or {})
            run["batch_size"] = exp.get("batch_size", run["batch_size"])
    return run


def dataset_sizes(params: dict, dataset: str) -> dict:
    data = params["data"]
    if data["source"] == "synthetic":
        return data["synthetic_sizes"]
    return DATASET_INFO[dataset].counts


def optimizer_names(params: dict) -> tuple:
    """The optimizers a grid may list: the built-ins, then the entries of `optimizer:` that
    name a class by import path (in their params.yaml order)."""
    section = params.get("optimizer") if isinstance(params, dict) else None
    custom = (
        tuple(
            k
            for k, v in (section or {}).items()
            if isinstance(v, dict) and CLASS_KEY in v and k not in OPTIMIZERS
        )
        if isinstance(section, dict)
        else ()
    )
    return tuple(OPTIMIZERS) + custom


def tuned_cells(params: dict) -> list[tuple[str, str, str]]:
    """The (dataset, arch, optimizer) cells whose hyperparameters the tune stage chooses:
    those with a non-empty `grid`, unless `tune.enabled` is false (then all are pinned)."""
    if not params["tune"]["enabled"]:
        return []
    return [cell for cell in grid_cells(params) if resolve_run(params, *cell)["optimizer"]["grid"]]


def grid_cells(params):
    names = [
        valid_names(params.get(k), allowed)
        for k, allowed in (
            ("datasets", DATASETS),
            ("archs", ARCHS),
            ("optimizers", optimizer_names(params)),
        )
    ]
    return [(d, a, o) for d in names[0] for a in names[1] for o in names[2]]


def valid_names(names, allowed):
    if not isinstance(names, list):
        return ()
    return tuple(n for n in names if isinstance(n, str) and n in allowed)
