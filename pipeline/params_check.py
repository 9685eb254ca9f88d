"""Validation of params.yaml: every problem, each with its key path and what is allowed,
collected before failing, so one `python -m pipeline validate` shows all there is to fix.
What a run may be (names, optimizer hyperparameters, training keys, their allowed values) is
the library's `vsgd.spec`; this module checks what is about params.yaml itself (presets,
protocol, grid, experiments, timing, data, executor, tracking, storage) and calls
`vsgd.spec`'s rules for the rest.

Nothing here imports torch for the built-in optimizers: validating must be instant. An
optimizer named by import path (`optimizer.<key>.class`, `vsgd.imported_optimizers`) is
imported and built once on a dummy parameter, which is the only way to know that its
constructor takes the hyperparameters and accepts their values.
"""

import re

from vsgd import imported_optimizers
from vsgd.checker import MISSING, Checker, Range
from vsgd.spec import (
    ARCHS,
    DATASETS,
    DEVICE_RE,
    MODELS,
    OPTIMIZERS,
    SEED,
    SOURCES,
    TRAINING,
    check_finite,
    check_optimizer,
    check_schedule,
    check_training,
    tunable,
)
from vsgd.spec import IMPORTED_CLASS as CLASS_KEY
from vsgd.system_metrics import SETTINGS as SYSTEM_METRICS

from .cells import dataset_sizes, grid_cells, optimizer_names, resolve_run, tuned_cells, valid_names
from .k8s import schema as k8s_schema
from .tracking_check import check_tracking

OPTIMIZER_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # a run name part and a label value

TOP_LEVEL = (
    "preset",
    "presets",
    "datasets",
    "archs",
    "optimizers",
    "seeds",
    "protocol",
    "optimizer",
    "experiments",
    "tune",
    "training",
    "timing",
    "data",
    "executor",
    "tracking",
    "storage",
)
TUNE = ("enabled", "budget", "validation_size", "seed")
TIMING = ("steps", "warmup", "rounds", "device")
EXECUTORS = ("local", "kubernetes")
# `executor.local`: which GPUs the local executor hands out (all the machine shows it, none,
# or indices as this process numbers them) and how many runs share one GPU at once.
LOCAL_DEFAULTS = {"gpus": "all", "runs_per_gpu": 1}
LOCAL_GPUS_ALLOWED = "all, none, or a list of GPU indices, e.g. [0, 2]"


def validate(params: dict, build_imported: bool = True) -> list[str]:
    """Every problem of resolved params, in key order; empty when valid. Imported optimizers
    are imported and built unless `build_imported` is false (see `load_params`)."""
    c = Checker()
    p = c.mapping(params, "", required=TOP_LEVEL[2:], optional=("preset",))
    if p is None:
        return c.problems
    c.names(p["datasets"], "datasets", DATASETS)
    c.names(p["archs"], "archs", ARCHS)
    c.names(p["optimizers"], "optimizers", optimizer_names(params))
    if c.list_of(p["seeds"], "seeds"):
        seeds = p["seeds"]
        if all([c.integer(seeds, i, f"seeds[{i}]", *SEED) for i in range(len(seeds))]) and len(
            set(seeds)
        ) != len(seeds):
            c.problem(
                f"seeds: duplicates in {seeds!r}; each seed is one run per cell, list it once"
            )
    _check_protocol(c, p)
    _check_optimizers(c, p, build_imported)
    _check_experiments(c, p, build_imported)
    _check_tune(c, p)
    _check_training(c, p)
    _check_timing(c, p)
    _check_data(c, p)
    _check_small_sections(c, p)
    _check_cross(c, params)
    return c.problems


def _check_protocol(c, p):
    protocol = c.mapping(
        p["protocol"], "protocol", optional=DATASETS, required=valid_names(p["datasets"], DATASETS)
    )
    if protocol is None:
        return
    archs = valid_names(p["archs"], ARCHS)
    for ds in protocol:
        base = f"protocol.{ds}"
        entry = c.mapping(protocol[ds], base, required=("models", "batch_size", "schedule"))
        if entry is None:
            continue
        models = c.mapping(entry["models"], f"{base}.models", required=archs, optional=ARCHS)
        for arch in models or ():
            c.choice(models[arch], f"{base}.models.{arch}", MODELS)
        batch = c.mapping(entry["batch_size"], f"{base}.batch_size", required=archs, optional=ARCHS)
        for arch in batch or ():
            c.integer(batch, arch, f"{base}.batch_size.{arch}", minimum=1)
        check_schedule(c, entry["schedule"], f"{base}.schedule")


def _check_optimizers(c, p, build_imported=True):
    raw = p["optimizer"] if isinstance(p["optimizer"], dict) else {}
    names = optimizer_names({"optimizer": raw})
    for key, entry in raw.items():
        if key in OPTIMIZERS and isinstance(entry, dict) and CLASS_KEY in entry:
            c.problem(
                f"optimizer.{key}.{CLASS_KEY}: {key} is a built-in optimizer; give an "
                f"imported one a key of its own (e.g. optimizer.my_{key})"
            )
        elif key not in OPTIMIZERS and not OPTIMIZER_KEY.match(str(key)):
            c.problem(
                f"optimizer.{key}: not a built-in ({', '.join(OPTIMIZERS)}); an imported "
                f"optimizer's key must be lowercase letters, digits and '_' (at most 32, "
                f"starting with a letter)"
            )
        elif key not in OPTIMIZERS and not (isinstance(entry, dict) and CLASS_KEY in entry):
            c.problem(
                f"optimizer.{key}: unknown optimizer; allowed: "
                f"{', '.join(OPTIMIZERS)}, or an imported one: "
                f"{{{CLASS_KEY}: module:Class, lr: ..., ...}}"
            )
    section = c.mapping(
        p["optimizer"],
        "optimizer",
        optional=names + tuple(k for k in raw if k not in names),
        required=valid_names(p["optimizers"], names),
    )
    used = set(valid_names(p["optimizers"], names))
    for name in [n for n in section or () if n in names]:
        if name in OPTIMIZERS:
            _check_optimizer_args(c, name, section[name], f"optimizer.{name}", partial=False)
        elif name in used:  # imported and built only when the grid uses it
            _check_imported(c, section[name], f"optimizer.{name}", build=build_imported)


def _check_imported(c, entry, path, base=None, build=True):
    """An imported optimizer's entry (merged over `base`, its `optimizer:` entry, for an
    experiment's override): the class imports and is an optimizer, every hyperparameter and
    grid key is a constructor argument, and the pinned values and every grid value build."""
    full = {**(base or {}), **entry}
    grid = full.get("grid")
    if grid is not None and not isinstance(grid, dict):
        c.problem(
            f"{path}.grid: expected a mapping of hyperparameters to lists of values, got {grid!r}"
        )
        grid = None
    grid = {k: v for k, v in (grid or {}).items() if c.list_of(v, f"{path}.grid.{k}")}
    pinned = {k: v for k, v in full.items() if k not in (CLASS_KEY, "grid")}
    # What the constructor accepts is its own business (it is built below), but NaN and
    # infinities are never a setting: many constructors compare `0 <= lr`, which NaN passes
    # as False and infinity as True.
    check_finite(c, {k: v for k, v in entry.items() if k not in (CLASS_KEY, "grid")}, path)
    check_finite(c, grid, f"{path}.grid")
    values = [(path, pinned)] + [
        (f"{path}.grid.{key}[{i}]", {**pinned, key: value})
        for key, vs in grid.items()
        for i, value in enumerate(vs)
    ]
    for key, vs in grid.items():
        if len({repr(v) for v in vs}) != len(vs):
            c.problem(f"{path}.grid.{key}: values must be unique, got {vs!r}")
    if not build:
        if not imported_optimizers.IMPORT_PATH.match(str(full.get(CLASS_KEY))):
            c.problem(
                f"{path}.{CLASS_KEY}: {full.get(CLASS_KEY)!r} is not an import path; "
                "allowed: module:Class, e.g. torch.optim:RAdam"
            )
        return
    c.problems += imported_optimizers.check(path, full, grid_keys=tuple(grid), values=values)


def _check_optimizer_args(c, name, args, path, partial):
    """The optimizer's own arguments (the library's rules) plus params.yaml's `grid`: for
    any of those arguments, the values the tune stage tries, each checked by the same rule
    as the argument itself."""
    check_optimizer(c, name, args, path, partial=partial, extra=("grid",))
    if not isinstance(args, dict) or args.get("grid") is None:
        if isinstance(args, dict) and "grid" in args:
            args["grid"] = {}
        return
    grid = c.mapping(args["grid"], f"{path}.grid", optional=tunable(name))
    for key in grid or ():
        values = grid[key]
        if key not in tunable(name) or not c.list_of(values, f"{path}.grid.{key}"):
            continue
        # Each value goes through the argument's own rule, at the argument's key path.
        for i, value in enumerate(values):
            probe, sub = {key: value}, Checker()
            check_optimizer(sub, name, probe, f"{path}.grid.{key}[{i}]", partial=True)
            c.problems += [
                p.replace(f"{path}.grid.{key}[{i}].{key}", f"{path}.grid.{key}[{i}]")
                for p in sub.problems
            ]
            values[i] = probe[key]
        spelled = [
            repr(tuple(v))
            if isinstance(v, list)
            else repr(float(v))
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            else repr(v)
            for v in values
        ]
        if len(set(spelled)) != len(spelled):
            c.problem(
                f"{path}.grid.{key}: values must be unique (1 and 1.0 are one run), got {values!r}"
            )


def _check_experiments(c, p, build_imported=True):
    experiments = p["experiments"]
    if experiments is None:
        p["experiments"] = []
        return
    if experiments is MISSING or not c.list_of(experiments, "experiments", empty_ok=True):
        return
    names = optimizer_names({"optimizer": p["optimizer"]})
    allowed = {"dataset": DATASETS, "arch": ARCHS, "optimizer": names}
    for i, exp in enumerate(experiments):
        path = f"experiments[{i}]"
        exp = c.mapping(
            exp, path, required=("match",), optional=("optimizer", "batch_size", "schedule")
        )
        if exp is None:
            continue
        match = c.mapping(exp["match"], f"{path}.match", optional=tuple(allowed))
        for key in match or ():
            if key in allowed:
                c.choice(match[key], f"{path}.match.{key}", allowed[key])
        if "batch_size" in exp:
            c.integer(exp, "batch_size", f"{path}.batch_size", minimum=1)
        if "schedule" in exp:
            check_schedule(c, exp["schedule"], f"{path}.schedule", partial=True)
        if "optimizer" in exp:
            target = match["optimizer"] if match is not None else MISSING
            if target in OPTIMIZERS:
                _check_optimizer_args(
                    c, target, exp["optimizer"], f"{path}.optimizer", partial=True
                )
            elif target in names and isinstance(exp["optimizer"], dict):
                _check_imported(
                    c,
                    exp["optimizer"],
                    f"{path}.optimizer",
                    base=p["optimizer"][target],
                    build=build_imported,
                )
            elif (
                c.mapping(
                    exp["optimizer"], f"{path}.optimizer", optional=("lr", "weight_decay", "grid")
                )
                is not None
            ):
                # Without match.optimizer only the arguments every optimizer has apply.
                _check_optimizer_args(c, "sgd", exp["optimizer"], f"{path}.optimizer", partial=True)


# Training keys that the pipeline sets, not params.yaml: only the tune stage's runs skip the
# test set (pipeline.grid.build_spec).
PIPELINE_TRAINING = ("eval_test",)


def _check_training(c, p):
    t = p["training"]
    check_training(c, t, "training", partial=True)
    if isinstance(t, dict):
        for key in TRAINING:
            if key not in PIPELINE_TRAINING and key not in t:
                c.problem(f"training.{key}: missing")
        for key in PIPELINE_TRAINING:
            if key in t:
                c.problem(
                    f"training.{key}: set by the pipeline (the tune stage's runs never "
                    "evaluate the test set, the grid's always do); remove it"
                )


def _check_timing(c, p):
    """The timing stage: `steps` timed steps after `warmup` untimed ones, `rounds` times,
    on one device (the values `training.device` allows)."""
    t = c.mapping(p["timing"], "timing", required=TIMING)
    if t is None:
        return
    c.integer(t, "steps", "timing.steps", minimum=1)
    c.integer(t, "warmup", "timing.warmup", minimum=0)
    c.integer(t, "rounds", "timing.rounds", minimum=1)
    device = t["device"]
    if device is not MISSING and not (isinstance(device, str) and DEVICE_RE.match(device)):
        c.problem(
            f"timing.device: {device!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps"
        )


def _check_tune(c, p):
    t = c.mapping(p["tune"], "tune", required=TUNE)
    if t is None:
        return
    c.choice(t["enabled"], "tune.enabled", (True, False))
    c.number(t, "budget", "tune.budget", Range(0.0, 1.0, low_open=True))
    c.integer(t, "validation_size", "tune.validation_size", minimum=1)
    c.integer(t, "seed", "tune.seed", *SEED)


def _check_data(c, p):
    d = c.mapping(p["data"], "data", required=("source", "root", "mirror", "synthetic_sizes"))
    if d is None:
        return
    c.choice(d["source"], "data.source", SOURCES)
    c.string(d["root"], "data.root")
    mirror = d["mirror"]
    if mirror not in (None, MISSING) and not (
        isinstance(mirror, str) and re.match(r"^(https?|file)://", mirror)
    ):
        c.problem(
            f"data.mirror: {mirror!r} is not a URL; allowed: null or http(s)://... or file://..."
        )
    sizes = c.mapping(d["synthetic_sizes"], "data.synthetic_sizes", required=("train", "test"))
    if sizes is not None:
        for key in ("train", "test"):
            c.integer(sizes, key, f"data.synthetic_sizes.{key}", minimum=1)


def _check_small_sections(c, p):
    e = c.mapping(
        p["executor"],
        "executor",
        required=("kind", "max_parallel"),
        optional=("local", "kubernetes"),
    )
    if e is not None:
        c.choice(e["kind"], "executor.kind", EXECUTORS)
        _check_local(c, e["local"])
        # null: the executor's own default (one at a time; on Kubernetes with a Kueue
        # queue, every run: admission is the queue's job).
        if e["max_parallel"] is not None:
            c.integer(e, "max_parallel", "executor.max_parallel", minimum=1)
        # The Kubernetes executor owns its section; a local run with none set needs no Job
        # template, so it is not checked then.
        if e["kind"] == "kubernetes" or e["kubernetes"] not in (None, MISSING, {}):
            c.problems.extend(k8s_schema.validate(p.data))
    t = c.mapping(
        p["tracking"], "tracking", required=("uri", "experiment"), optional=("system_metrics",)
    )
    if t is not None:
        check_tracking(c, t["uri"])
        c.string(t["experiment"], "tracking.experiment")
        c.choice(t["system_metrics"], "tracking.system_metrics", SYSTEM_METRICS)
    s = c.mapping(p["storage"], "storage", required=("remote", "endpoint_url"))
    if s is not None:
        remote, endpoint = s["remote"], s["endpoint_url"]
        if remote not in (None, MISSING) and not (
            isinstance(remote, str) and remote.startswith("s3://")
        ):
            c.problem(f"storage.remote: {remote!r}; allowed: null or s3://bucket/prefix")
        if endpoint not in (None, MISSING) and not (
            isinstance(endpoint, str) and re.match(r"^https?://", endpoint)
        ):
            c.problem(f"storage.endpoint_url: {endpoint!r}; allowed: null or http(s)://host:port")
    if p["preset"] not in (None, MISSING) and not isinstance(p["preset"], str):
        c.problem(f"preset: expected a preset name or null, got {p['preset']!r}")


def local_settings(params: dict) -> dict:
    """`executor.local` with its defaults (the section absent or null: every default)."""
    return {**LOCAL_DEFAULTS, **((params.get("executor") or {}).get("local") or {})}


def _check_local(c, raw):
    """`executor.local`; whether the GPUs it lists exist is the executor's question, asked
    on the machine that runs the stage (validation may run elsewhere)."""
    local = (
        None if raw is None else c.mapping(raw, "executor.local", optional=tuple(LOCAL_DEFAULTS))
    )
    if local is None:
        return
    gpus = local["gpus"]
    if isinstance(gpus, list) and gpus:
        path = "executor.local.gpus"
        indices = [c.integer(gpus, i, f"{path}[{i}]", minimum=0) for i in range(len(gpus))]
        if all(indices) and len(set(gpus)) != len(gpus):
            c.problem(f"{path}: duplicates in {gpus!r}; list each GPU once")
    elif gpus is not MISSING and not (isinstance(gpus, str) and gpus in ("all", "none")):
        c.problem(f"executor.local.gpus: {gpus!r} is not allowed; allowed: {LOCAL_GPUS_ALLOWED}")
    c.integer(local, "runs_per_gpu", "executor.local.runs_per_gpu", minimum=1)


def _check_cross(c, params):
    """Checks across sections, on the grid as it will run (experiments applied).

    A section that is itself broken was reported above; the checks that would need it are
    skipped (the lookups fail) instead of piling follow-up errors on top.
    """
    broken = (KeyError, TypeError, ValueError, AttributeError)
    try:
        validation = int(params["training"]["validation_size"])
        tuned = set(tuned_cells(params))
        held_out = int(params["tune"]["validation_size"])
    except broken:
        return
    too_big = {}  # (dataset, arch, batch, train images) -> optimizers it applies to
    for ds, arch, opt in grid_cells(params):
        # The tuning runs hold out tune.validation_size images, the final runs
        # training.validation_size: each split must leave enough to train on.
        try:
            splits = [("training.validation_size", validation)]
            if (ds, arch, opt) in tuned:
                splits.append(("tune.validation_size", held_out))
            batch = resolve_run(params, ds, arch, opt)["batch_size"]
            for key, size in splits:
                train = dataset_sizes(params, ds)["train"] - size
                if train < 1:
                    c.problem(f"{key}: {size} leaves no training images of {ds}")
                    return
            # Reported once, for the smallest training split the cell's runs use.
            key, size = max(splits, key=lambda split: split[1])
            train = dataset_sizes(params, ds)["train"] - size
            if batch > train:
                too_big.setdefault((ds, arch, batch, train), []).append(opt)
        except broken:
            continue
    for (ds, arch, batch, train), opts in too_big.items():
        every = len(opts) == len(valid_names(params["optimizers"], optimizer_names(params)))
        which = "" if every else f" (runs with {', '.join(opts)}, see experiments)"
        c.problem(
            f"protocol.{ds}.batch_size.{arch}: {batch} is larger than the {train} "
            f"training images of {ds}{which}"
        )
