"""Load `params.yaml`, apply a preset and `--set key=value` overrides, validate everything.

Validation collects every problem before failing, each with its key path and what is allowed,
so one run of `python -m pipeline validate` shows all there is to fix. What a run may be
(names, optimizer hyperparameters, training keys, their allowed values) is the library's
`vsgd.spec`; this module checks what is about params.yaml itself (presets, protocol, grid,
experiments, timing, data, executor, tracking, storage) and calls `vsgd.spec`'s rules for
the rest.
Nothing here imports torch for the built-in optimizers: validating must be instant. An
optimizer named by import path (`optimizer.<key>.class`, `vsgd.imported_optimizers`) is
imported and built once on a dummy parameter, which is the only way to know that its
constructor takes the hyperparameters and accepts their values. A tracking URI is checked
against MLflow's own registry of tracking stores, which imports mlflow (about a second and
a half, only when a URI is set): the alternative is a run that finds out minutes later and
trains untracked.

The params file, and every `--set` value, is read through a bounded YAML loader
(`read_yaml`, `parse_yaml`): a file beyond `MAX_PARAMS_BYTES`, or YAML whose aliases expand
to more than `MAX_YAML_NODES` nodes, is refused before anything walks it.
"""

import copy
import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from vsgd.data.registry import DATASETS as DATASET_INFO
from vsgd.spec import IMPORTED_CLASS as CLASS_KEY
from vsgd.spec import (ARCHS, DATASETS, DEVICE_RE, EX_CONFIG, MISSING, MODELS, OPTIMIZERS,
                       SEED, SOURCES, TRAINING, Checker, ConfigError, Range, check_finite,
                       check_optimizer, check_schedule, check_training, kind)

from .redact import redact

__all__ = ["ARCHS", "DATASETS", "EX_CONFIG", "MODELS", "OPTIMIZERS", "ConfigError",
           "load_params", "optimizer_names", "parse_overrides", "resolve_run", "validate"]

OPTIMIZER_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")   # a run name part and a label value

TOP_LEVEL = ("preset", "presets", "datasets", "archs", "optimizers", "seeds", "protocol",
             "optimizer", "experiments", "tune", "training", "timing", "data", "executor",
             "tracking", "storage")
TUNE = ("enabled", "budget", "validation_size", "seed")
TIMING = ("steps", "warmup", "rounds", "device")
EXECUTORS = ("local", "kubernetes")

# A params file is read whole and parsed before validation can say anything about it, so it
# is bounded: 256 KiB is 30 times today's params.yaml, and the pure-Python YAML parser reads
# even the densest file of that size in a few seconds (about 15 s per MiB of `[0,0,...]` on
# a 2-core Xeon).
MAX_PARAMS_BYTES = 256 * 1024
# YAML aliases share one node among all the places that name it; every later walk (the
# preset merge, validation, a problem line's repr, the run hash's JSON) sees the expanded
# tree, which nested aliases make exponentially large ("billion laughs"). Written out, a node
# costs at least a byte (`{a,b}` is five nodes in five bytes), so this many nodes is as much
# as any file within MAX_PARAMS_BYTES can hold without aliases: aliases may abbreviate a
# document, never make it larger than a file of the size bound could be.
MAX_YAML_NODES = MAX_PARAMS_BYTES


def load_params(path="params.yaml", overrides=(), *, build_imported=True) -> dict:
    """Resolved and validated params: file <- preset <- overrides (later wins).

    The returned dict has the selected preset merged in and no `presets` key. Raises
    `ConfigError` listing every problem. `build_imported=False`, for commands that build no
    optimizer (prepare, aggregate, gc, jobs), checks an imported optimizer's entry without
    importing it (its import path's form only): importing torch costs seconds per stage.
    """
    raw = read_yaml(Path(path))
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {kind(raw)}"])
    parsed = parse_overrides(overrides)
    problems = []
    # Overrides go in twice: before the preset (so `--set preset=tiny` or a change inside
    # `presets` selects it) and after it (so `--set` beats what the preset sets).
    for key, value in parsed:
        _set(raw, key, value, problems)
    params = apply_preset(raw, problems)
    for key, value in parsed:
        if key != "preset" and not key.startswith("presets."):
            _set(params, key, value, problems)
    if not problems:
        problems = validate(params, build_imported=build_imported)
    if problems:
        raise ConfigError(problems)
    return params


def parse_overrides(overrides) -> list[tuple[str, object]]:
    """`["a.b=1", "c=[0, 1]"]` -> `[("a.b", 1), ("c", [0, 1])]`; values are YAML."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            parsed.append((key.strip(), parse_yaml(text, f"override {item!r}")))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return parsed


def apply_preset(raw: dict, problems: list) -> dict:
    params = {k: copy.deepcopy(v) for k, v in raw.items() if k != "presets"}
    name = raw.get("preset")
    presets = raw.get("presets") or {}
    if name is None:
        return params
    if not isinstance(presets, dict) or name not in presets:
        allowed = ", ".join(["null"] + sorted(presets) if isinstance(presets, dict) else ["null"])
        problems.append(f"preset: unknown preset {name!r}; allowed: {allowed}")
        return params
    overlay = presets[name]
    if not isinstance(overlay, dict):
        problems.append(f"presets.{name}: expected a mapping of params keys to values")
        return params
    return _merge(params, overlay)


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
    custom = tuple(k for k, v in (section or {}).items() if isinstance(v, dict)
                   and CLASS_KEY in v and k not in OPTIMIZERS) if isinstance(section, dict) \
        else ()
    return tuple(OPTIMIZERS) + custom


def is_imported(params: dict, name: str) -> bool:
    return name in optimizer_names(params) and name not in OPTIMIZERS


def tuned_cells(params: dict) -> list[tuple[str, str, str]]:
    """The (dataset, arch, optimizer) cells whose hyperparameters the tune stage chooses:
    those with a non-empty `grid`, unless `tune.enabled` is false (then all are pinned)."""
    if not params["tune"]["enabled"]:
        return []
    return [cell for cell in _cells(params) if resolve_run(params, *cell)["optimizer"]["grid"]]


# ---------------------------------------------------------------------------------------------
# validation


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
        if all([c.integer(seeds, i, f"seeds[{i}]", *SEED) for i in range(len(seeds))]) \
                and len(set(seeds)) != len(seeds):
            c.problem(f"seeds: duplicates in {seeds!r}; each seed is one run per cell, "
                      "list it once")
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
    protocol = c.mapping(p["protocol"], "protocol", optional=DATASETS,
                         required=_valid_names(p["datasets"], DATASETS))
    if protocol is None:
        return
    archs = _valid_names(p["archs"], ARCHS)
    for ds in protocol:
        base = f"protocol.{ds}"
        entry = c.mapping(protocol[ds], base, required=("models", "batch_size", "schedule"))
        if entry is None:
            continue
        models = c.mapping(entry["models"], f"{base}.models", required=archs, optional=ARCHS)
        for arch in models or ():
            c.choice(models[arch], f"{base}.models.{arch}", MODELS)
        batch = c.mapping(entry["batch_size"], f"{base}.batch_size", required=archs,
                          optional=ARCHS)
        for arch in batch or ():
            c.integer(batch, arch, f"{base}.batch_size.{arch}", minimum=1)
        check_schedule(c, entry["schedule"], f"{base}.schedule")


def _check_optimizers(c, p, build_imported=True):
    raw = p["optimizer"] if isinstance(p["optimizer"], dict) else {}
    names = optimizer_names({"optimizer": raw})
    for key, entry in raw.items():
        if key in OPTIMIZERS and isinstance(entry, dict) and CLASS_KEY in entry:
            c.problem(f"optimizer.{key}.{CLASS_KEY}: {key} is a built-in optimizer; give an "
                      f"imported one a key of its own (e.g. optimizer.my_{key})")
        elif key not in OPTIMIZERS and not OPTIMIZER_KEY.match(str(key)):
            c.problem(f"optimizer.{key}: not a built-in ({', '.join(OPTIMIZERS)}); an imported "
                      f"optimizer's key must be lowercase letters, digits and '_' (at most 32, "
                      f"starting with a letter)")
        elif key not in OPTIMIZERS and not (isinstance(entry, dict) and CLASS_KEY in entry):
            c.problem(f"optimizer.{key}: unknown optimizer; allowed: "
                      f"{', '.join(OPTIMIZERS)}, or an imported one: "
                      f"{{{CLASS_KEY}: module:Class, lr: ..., ...}}")
    section = c.mapping(p["optimizer"], "optimizer", optional=names + tuple(
                            k for k in raw if k not in names),
                        required=_valid_names(p["optimizers"], names))
    used = set(_valid_names(p["optimizers"], names))
    for name in [n for n in section or () if n in names]:
        if name in OPTIMIZERS:
            _check_optimizer_args(c, name, section[name], f"optimizer.{name}", partial=False)
        elif name in used:   # imported and built only when the grid uses it
            _check_imported(c, section[name], f"optimizer.{name}", build=build_imported)


def _check_imported(c, entry, path, base=None, build=True):
    """An imported optimizer's entry (merged over `base`, its `optimizer:` entry, for an
    experiment's override): the class imports and is an optimizer, every hyperparameter and
    grid key is a constructor argument, and the pinned values and every grid value build."""
    from vsgd import imported_optimizers
    full = {**(base or {}), **entry}
    grid = full.get("grid")
    if grid is not None and not isinstance(grid, dict):
        c.problem(f"{path}.grid: expected a mapping of hyperparameters to lists of values, "
                  f"got {grid!r}")
        grid = None
    grid = {k: v for k, v in (grid or {}).items() if c.list_of(v, f"{path}.grid.{k}")}
    pinned = {k: v for k, v in full.items() if k not in (CLASS_KEY, "grid")}
    # What the constructor accepts is its own business (it is built below), but NaN and
    # infinities are never a setting: many constructors compare `0 <= lr`, which NaN passes
    # as False and infinity as True.
    check_finite(c, {k: v for k, v in entry.items() if k not in (CLASS_KEY, "grid")}, path)
    check_finite(c, grid, f"{path}.grid")
    values = [(path, pinned)] + [(f"{path}.grid.{key}[{i}]", {**pinned, key: value})
                                 for key, vs in grid.items() for i, value in enumerate(vs)]
    for key, vs in grid.items():
        if len({repr(v) for v in vs}) != len(vs):
            c.problem(f"{path}.grid.{key}: values must be unique, got {vs!r}")
    if not build:
        if not imported_optimizers.IMPORT_PATH.match(str(full.get(CLASS_KEY))):
            c.problem(f"{path}.{CLASS_KEY}: {full.get(CLASS_KEY)!r} is not an import path; "
                      "allowed: module:Class, e.g. torch.optim:RAdam")
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
    grid = c.mapping(args["grid"], f"{path}.grid", optional=tuple(OPTIMIZERS[name]))
    for key in grid or ():
        values = grid[key]
        if key not in OPTIMIZERS[name] or not c.list_of(values, f"{path}.grid.{key}"):
            continue
        # Each value goes through the argument's own rule, at the argument's key path.
        for i, value in enumerate(values):
            probe, sub = {key: value}, Checker()
            check_optimizer(sub, name, probe, f"{path}.grid.{key}[{i}]", partial=True)
            c.problems += [p.replace(f"{path}.grid.{key}[{i}].{key}",
                                     f"{path}.grid.{key}[{i}]") for p in sub.problems]
            values[i] = probe[key]
        spelled = [repr(tuple(v)) if isinstance(v, list) else repr(float(v))
                   if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v)
                   for v in values]
        if len(set(spelled)) != len(spelled):
            c.problem(f"{path}.grid.{key}: values must be unique (1 and 1.0 are one run), "
                      f"got {values!r}")


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
        exp = c.mapping(exp, path, required=("match",),
                        optional=("optimizer", "batch_size", "schedule"))
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
                _check_optimizer_args(c, target, exp["optimizer"], f"{path}.optimizer",
                                      partial=True)
            elif target in names and isinstance(exp["optimizer"], dict):
                _check_imported(c, exp["optimizer"], f"{path}.optimizer",
                                base=p["optimizer"][target], build=build_imported)
            elif c.mapping(exp["optimizer"], f"{path}.optimizer",
                           optional=("lr", "weight_decay", "grid")) is not None:
                # Without match.optimizer only the arguments every optimizer has apply.
                _check_optimizer_args(c, "sgd", exp["optimizer"], f"{path}.optimizer",
                                      partial=True)


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
                c.problem(f"training.{key}: set by the pipeline (the tune stage's runs never "
                          "evaluate the test set, the grid's always do); remove it")


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
        c.problem(f"timing.device: {device!r} is not a device; allowed: auto, cpu, cuda, "
                  "cuda:N, mps")


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
    if mirror not in (None, MISSING) and not (isinstance(mirror, str) and
                                              re.match(r"^(https?|file)://", mirror)):
        c.problem(f"data.mirror: {mirror!r} is not a URL; allowed: null or http(s)://... "
                  "or file://...")
    sizes = c.mapping(d["synthetic_sizes"], "data.synthetic_sizes", required=("train", "test"))
    if sizes is not None:
        for key in ("train", "test"):
            c.integer(sizes, key, f"data.synthetic_sizes.{key}", minimum=1)


def _check_small_sections(c, p):
    e = c.mapping(p["executor"], "executor", required=("kind", "max_parallel"),
                  optional=("kubernetes",))
    if e is not None:
        c.choice(e["kind"], "executor.kind", EXECUTORS)
        # null: the executor's own default (one at a time; on Kubernetes with a Kueue
        # queue, every run: admission is the queue's job).
        if e["max_parallel"] is not None:
            c.integer(e, "max_parallel", "executor.max_parallel", minimum=1)
        # The Kubernetes executor owns its section; a local run with none set needs no Job
        # template, so it is not checked then.
        if e["kind"] == "kubernetes" or e["kubernetes"] not in (None, MISSING, {}):
            from . import k8s_config
            c.problems.extend(k8s_config.validate(p.data))
    t = c.mapping(p["tracking"], "tracking", required=("uri", "experiment"))
    if t is not None:
        _check_tracking(c, t["uri"])
        c.string(t["experiment"], "tracking.experiment")
    s = c.mapping(p["storage"], "storage", required=("remote", "endpoint_url"))
    if s is not None:
        remote, endpoint = s["remote"], s["endpoint_url"]
        if remote not in (None, MISSING) and not (isinstance(remote, str)
                                                  and remote.startswith("s3://")):
            c.problem(f"storage.remote: {remote!r}; allowed: null or s3://bucket/prefix")
        if endpoint not in (None, MISSING) and not (isinstance(endpoint, str) and
                                                    re.match(r"^https?://", endpoint)):
            c.problem(f"storage.endpoint_url: {endpoint!r}; allowed: null or "
                      "http(s)://host:port")
    if p["preset"] not in (None, MISSING) and not isinstance(p["preset"], str):
        c.problem(f"preset: expected a preset name or null, got {p['preset']!r}")


TRACKING_ENV = "MLFLOW_TRACKING_URI (environment variable, overrides tracking.uri)"


def _check_tracking(c, configured):
    """`tracking.uri`: null (untracked, unless the environment names one) or a URI MLflow has
    a tracking store for; and the URI the runs will use (vsgd.tracking.tracking_uri: the
    environment's, else this one) must work here: an SQLite database needs a directory it
    can be created in. Found now, not after a run's first minutes of retries."""
    if configured is not None and not c.string(configured, "tracking.uri"):
        return
    # Imported here, as mlflow below: both belong to the tracking stack (vsgd.tracking
    # imports filelock), which validating must not need: the launcher validates with
    # whatever `python` it finds, and its tests run one with PyYAML alone. Without them
    # nothing tracks here (the trainer says so and trains untracked).
    try:
        from vsgd.tracking import tracking_uri
    except ImportError:
        return
    overriding = tracking_uri(None)   # the environment's URI, when one is set
    if configured is None and overriding is None:
        return   # untracked: nothing to ask MLflow about
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        from mlflow.utils.uri import (_DATABRICKS_UNITY_CATALOG_SCHEME,
                                      _OSS_UNITY_CATALOG_SCHEME, get_uri_scheme)
    except ImportError:
        return
    # MLflow's own registry of tracking stores (built-in and plugins), less its scheme-less
    # entry (a bare path becomes a file store directory; here it is nearly always a URI
    # mistyped, `mlflow.db` for `sqlite:///mlflow.db`) and Unity Catalog's (whose store this
    # client refuses to build).
    usable = [s for s in _tracking_store_registry._registry
              if s and s not in (_DATABRICKS_UNITY_CATALOG_SCHEME, _OSS_UNITY_CATALOG_SCHEME)]

    def problem(uri, check_files):
        allowed = (f"allowed: null, or a URI with a scheme MLflow tracks to "
                   f"({', '.join(usable)}), e.g. sqlite:///mlflow.db or http://host:5000")
        try:
            # A bare "databricks" is the default profile's workspace (MLflow's special case).
            scheme = uri if uri == "databricks" else get_uri_scheme(uri)
        except MlflowException as exc:
            return f"{uri!r} is not a tracking URI ({exc.message}); {allowed}"
        if scheme not in usable:
            return f"{uri!r} has {f'scheme {scheme!r}' if scheme else 'no scheme'}; {allowed}"
        if scheme in ("http", "https") and not _url_host(uri):
            return f"{uri!r} names no host; {allowed}"
        if scheme == "sqlite" and check_files:
            return _sqlite_problem(uri)
        return None

    # The file's value is checked in form always; its files only when it is the one in use.
    # A URI may carry a password (http://user:password@host): masked in what is shown.
    if configured is not None and (found := problem(configured, overriding is None)):
        c.problem(redact(f"tracking.uri: {found}"))
    if overriding is not None and (found := problem(overriding, True)):
        c.problem(redact(f"{TRACKING_ENV}: {found}"))


def _url_host(uri: str) -> str | None:
    try:
        return urlsplit(uri).hostname
    except ValueError:   # a malformed port or IPv6 address
        return None


def _sqlite_problem(uri: str) -> str | None:
    """An SQLite tracking store's file: SQLAlchemy's reading of the URI (what MLflow hands
    it), relative to the current directory as SQLite opens it; the file need not exist, but
    its directory must, and must take a new file (SQLite creates the database and its
    journal there)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        database = make_url(uri).database
    except ArgumentError as exc:
        return f"{uri!r} is not an SQLite URI ({exc})"
    if database in (None, "", ":memory:"):
        return (f"{uri!r} is an in-memory database, gone with each run's process; allowed: "
                "sqlite:///PATH (relative to the current directory) or sqlite:////ABSOLUTE")
    path = Path(database)
    directory = path.parent
    if not directory.is_dir():
        return (f"{uri!r}: the database's directory {str(directory)!r} does not exist "
                f"(relative paths are from the current directory, {Path.cwd()}); create it "
                "or name another")
    if path.exists() and not path.is_file():
        return f"{uri!r}: {str(path)!r} exists and is not a file"
    try:
        # The real test: permission bits do not tell (root, read-only mounts, /proc).
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return (f"{uri!r}: cannot create the database in {str(directory)!r} "
                f"({exc.strerror or exc}); name a writable directory")
    return None


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
    for ds, arch, opt in _cells(params):
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
        every = len(opts) == len(_valid_names(params["optimizers"], optimizer_names(params)))
        which = "" if every else f" (runs with {', '.join(opts)}, see experiments)"
        c.problem(f"protocol.{ds}.batch_size.{arch}: {batch} is larger than the {train} "
                  f"training images of {ds}{which}")


def _cells(params):
    names = [_valid_names(params.get(k), allowed) for k, allowed in
             (("datasets", DATASETS), ("archs", ARCHS),
              ("optimizers", optimizer_names(params)))]
    return [(d, a, o) for d in names[0] for a in names[1] for o in names[2]]


def _valid_names(names, allowed):
    if not isinstance(names, list):
        return ()
    return tuple(n for n in names if isinstance(n, str) and n in allowed)


def _merge(base: dict, overlay: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `overlay` replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set(tree: dict, dotted: str, value, problems: list):
    """Set `a.b.0.c` in place; missing (or null) mappings on the way are created."""
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        key = int(part) if isinstance(node, list) and part.isdigit() else part
        if isinstance(node, list) and not (isinstance(key, int) and key < len(node)):
            problems.append(f"override {dotted}: {'.'.join(parts[:i])} has no item {part}")
            return
        if not isinstance(node, (dict, list)):
            problems.append(f"override {dotted}: {'.'.join(parts[:i])} is not a mapping")
            return
        if i == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def read_yaml(path) -> object:
    """A YAML file's data, read through the bounds (`MAX_PARAMS_BYTES`, `MAX_YAML_NODES`);
    anything in the way (no such file, a directory, no permission, not UTF-8, not YAML) is
    a ConfigError naming the file."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError([f"{path}: is a directory; expected a YAML file"])
        with open(path, "rb") as f:
            # One byte past the bound tells "too large" without reading more of a huge file
            # (or of an endless one: a FIFO, /dev/zero).
            data = f.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read it: {exc.strerror or exc}"]) from None
    if len(data) > MAX_PARAMS_BYTES:
        size = path.stat().st_size if path.is_file() else None
        raise ConfigError([f"{path}: {f'{size} bytes' if size else 'endless'}; allowed: at "
                           f"most {MAX_PARAMS_BYTES} bytes ({MAX_PARAMS_BYTES // 1024} KiB)"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start}: "
                           f"{data[exc.start:exc.start + 1]!r}); save it as UTF-8"]) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> object:
    """YAML text as data, through the same bounds as a file; `source` names it in problems."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PARAMS_BYTES:
        raise ConfigError([f"{source}: more than {MAX_PARAMS_BYTES} bytes of YAML; allowed: "
                           f"at most {MAX_PARAMS_BYTES} ({MAX_PARAMS_BYTES // 1024} KiB)"])
    try:
        return yaml.load(text, Loader=BoundedLoader)
    except ConfigError as exc:
        raise ConfigError([f"{source}: {p}" for p in exc.problems]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    except RecursionError:
        # PyYAML composes nested collections recursively.
        raise ConfigError([f"{source}: nested too deeply to be params"]) from None
    except (ValueError, OverflowError) as exc:
        # Scalars YAML's patterns match but Python cannot build: a 5000-digit integer, the
        # date 2024-13-45.
        reason = str(exc).split(";")[0]   # not Python's advice on raising its own limit
        raise ConfigError([f"{source}: a value YAML cannot represent here: {reason}"]) from None


class BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a document whose aliases expand to more than
    `MAX_YAML_NODES` nodes, or that contains itself (an alias inside its own anchor), before
    anything is built from it. The composer already shares an aliased node; the count walks
    each distinct node once, so checking an alias bomb costs what its text does."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root):
    """Count `root`'s nodes as every later walk will see them, each alias expanded."""
    sizes = {}          # id(node) -> its node count with aliases expanded
    entered = set()     # nodes whose children are being counted: an alias to one is a cycle
    pending = [(root, False)]
    while pending:      # depth-first, iteratively: the nesting depth is the document's
        node, children_done = pending.pop()
        if children_done:
            entered.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > MAX_YAML_NODES:
                raise ConfigError([f"more than {MAX_YAML_NODES} values with its aliases "
                                   f"expanded (line {node.start_mark.line + 1}); allowed: "
                                   f"at most {MAX_YAML_NODES}: write the values out, or "
                                   "alias less"])
            continue
        if id(node) in sizes:
            continue
        if id(node) in entered:
            raise ConfigError([f"an alias at line {node.start_mark.line + 1} refers to a "
                               "node that contains it (an endless value)"])
        entered.add(id(node))
        pending.append((node, True))
        pending.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []


def add_params_arguments(parser) -> None:
    """`--params` and `--set`, as every command that reads params.yaml takes them."""
    parser.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="the params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this call, e.g. optimizer.vsgd.lr=0.05 or "
                             "'seeds=[0,1,2]' (YAML value; repeatable)")
