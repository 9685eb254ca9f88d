"""What a run is: the names, keys, defaults and allowed values of a run spec, the rules that
check one, and its identity.

This module is the one definition of these facts. The trainer checks a spec with
`check_spec`; `pipeline.config` checks params.yaml with the same rules (`check_optimizer`,
`check_schedule`, `check_training`, on the key paths of params.yaml). It imports neither
torch nor anything outside the standard library, so validating is instant and works without
the training stack.

Run identity (`run_hash`): a run is identified by everything that can change its result and
by nothing else. In the identity: dataset, model, the data's checksum and source, the
optimizer, every hyperparameter and VSGD's implementation, the schedule, batch size, seed,
the training keys that change what is computed (`validation_size`, `eval_every`,
`test_limit` and `eval_test`, which decide which points the curve has and what they are
measured on, `eval_batch_size`, `precision`, `denormals`, `compile`, `channels_last`,
`device`, `deterministic`) and the code version. Not in it: the run's name and
locations (`output_dir`, `checkpoint`, `data.dir`, `data.uri`), the tracking settings, the
stage that asked for it (`stage`: who asked does not change what is computed), and the
keys in `BOOKKEEPING`, which only change how often things are logged or saved (a resumed run
ends bit-identical whatever they are). The code version is a hash of the modules that compute
a result, `RESULT_MODULES` (the optimizer, the models, augmentation, and `vsgd.engine`: the
training step and evaluation); tracking, checkpoint, storage, download and CLI code are not
part of it. A change there keeps every finished result. A spec's own `code_version` key (the
launcher's, which `pipeline.train` compares with its own to name a stale image) is not in the
identity either: the code version enters the hash through `run_hash`'s `code` argument.
"""

import hashlib
import importlib.util
import re
from pathlib import Path

from .checker import MISSING, Checker, Range, View, is_finite, join, kind, number_text
from .data.registry import DATASETS as _DATASET_INFO
from .files import canonical_json

EX_CONFIG = 78  # sysexits.h EX_CONFIG; the Kubernetes podFailurePolicy fails fast on it

DATASETS = tuple(_DATASET_INFO)
MODELS = ("vgg16", "vgg19", "convmixer_256_8", "resnext18")
# The grid's architecture families; params.yaml's protocol maps each to a model per dataset.
ARCHS = ("vgg", "convmixer", "resnext")
SOURCES = ("official", "synthetic")
# fp32: strict float32, TF32 off (the paper's RTX 2080 Ti has none); tf32: TF32 for float32
# matmuls and convolutions; bf16: bf16 autocast, TF32 off for what stays float32.
PRECISIONS = ("fp32", "tf32", "bf16")
# flush: float denormals are zero on CPU, in every thread of a run (vsgd.engine.set_denormals):
# a CPU step slows down severalfold once activations or optimizer state underflow into them;
# keep: IEEE denormals. CUDA kernels keep their own behaviour either way.
DENORMALS = ("flush", "keep")
AUTO_BOOL = ("auto", True, False)
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
SCHEDULE_KEYS = ("iterations", "step_size", "gamma")


# A run's seed goes to torch.manual_seed and torch.Generator.manual_seed, which take
# [-2**63, 2**64), and, times 1_000_003 plus the epoch, seeds each epoch's permutation
# (vsgd.engine.epoch_permutation), which must stay below 2**64 for every epoch a run reaches
# (with up to 2**63 - 1 iterations: seeds below about 9.2e12). [0, 2**32) is inside both, and
# is numpy's seed range (np.random.seed, RandomState), the tightest of the generators a seed
# is commonly handed to (a model or an imported optimizer may seed numpy with it): a seed
# the grid accepts is one every consumer accepts. It keeps a Job's seed label short, too.
SEED = (0, 2**32 - 1)

POSITIVE = Range(0.0, low_open=True)
NON_NEGATIVE = Range(0.0)
UNIT = Range(0.0, 1.0, high_open=True)  # [0, 1): momentum, Adam's betas
TAU = Range(0.5, 1.0, low_open=True)  # VSGD's kappa_1, kappa_2 in (0.5, 1]
BETAS = "betas"  # a pair of numbers in UNIT
# Which of VSGD's implementations runs the update (vsgd/optim.py): `auto` lets the optimizer
# choose (multi-tensor where every parameter is on one device type, today's behaviour),
# `single` the single-tensor path, `foreach` the multi-tensor path, `fused` the compiled one.
# single and foreach give the same bits; fused agrees to float rounding. A choice, not a
# hyperparameter: never tuned (`tunable`).
VSGD_IMPLEMENTATIONS = ("auto", "single", "foreach", "fused")

# An optimizer named by import path (vsgd.imported_optimizers) carries these in its spec
# section: the path and the distribution that provides it, both part of the run identity.
IMPORTED_CLASS = "class"
IMPORTED_PACKAGE = "package"

# Constructor arguments of each optimizer and their allowed values.
OPTIMIZERS = {
    "sgd": {"lr": POSITIVE, "momentum": UNIT, "weight_decay": NON_NEGATIVE},
    "adam": {"lr": POSITIVE, "betas": BETAS, "eps": POSITIVE, "weight_decay": NON_NEGATIVE},
    "adamw": {"lr": POSITIVE, "betas": BETAS, "eps": POSITIVE, "weight_decay": NON_NEGATIVE},
    "vsgd": {
        "lr": POSITIVE,
        "ghattg": POSITIVE,
        "ps": POSITIVE,
        "tau1": TAU,
        "tau2": TAU,
        "weight_decay": NON_NEGATIVE,
        "eps": POSITIVE,
        "implementation": VSGD_IMPLEMENTATIONS,
    },
}


def tunable(name: str) -> tuple:
    """The arguments of built-in optimizer `name` a grid may list: its numbers (a choice such
    as VSGD's `implementation` decides how the update is computed, not what is tuned)."""
    return tuple(key for key, rule in OPTIMIZERS[name].items() if not isinstance(rule, tuple))


# Training keys: default and what is allowed ("int>=N", a tuple of choices, or DEVICE_RE).
TRAINING = {
    "eval_every": (500, "int>=1"),
    "checkpoint_every": (1000, "int>=1"),
    "log_every": (50, "int>=1"),
    "beta1_every": (100, "int>=1"),  # the authors log beta1 every 100 iterations
    "eval_batch_size": (1000, "int>=1"),
    "validation_size": (0, "int>=0"),
    "test_limit": (0, "int>=0"),
    # false: the test set is never evaluated (tuning runs); needs validation_size > 0.
    "eval_test": (True, (True, False)),
    "precision": ("fp32", PRECISIONS),
    # Changes bits (a denormal computed as zero), as precision does: identity.
    "denormals": ("flush", DENORMALS),
    "compile": ("auto", AUTO_BOOL),
    "channels_last": ("auto", AUTO_BOOL),
    "device": ("auto", DEVICE_RE),
    # true: deterministic kernels on CUDA (cuDNN, cuBLAS, torch.compile's), so a resumed run
    # recomputes the same bits; false: the fastest kernels (cuDNN benchmarking), which may
    # round differently from one process to the next. CPU kernels are deterministic either way.
    "deterministic": (True, (True, False)),
}
TRAINING_DEFAULTS = {key: default for key, (default, _) in TRAINING.items()}
# Training keys that only change what is logged or how often state is saved: not identity.
BOOKKEEPING = ("log_every", "checkpoint_every", "beta1_every")

REQUIRED = (
    "name",
    "run_hash",
    "dataset",
    "arch",
    "arch_key",
    "data",
    "optimizer",
    "schedule",
    "batch_size",
    "seed",
    "output_dir",
)
# Top-level spec keys and `data` keys that say where things are, not what is computed.
LOCATIONS = ("name", "run_hash", "output_dir", "checkpoint", "tracking")
# The code version the launcher built the spec with: recorded, not identity (see run_hash).
CODE_VERSION_KEY = "code_version"
# The pipeline stage that asked for the run (`pipeline.grid`: the tune stage's grid points or
# the final grid), for the MLflow tag `stage`; optional (older specs have none).
STAGE_KEY = "stage"
STAGES = ("tune", "train")
# Top-level keys recorded with a run that are neither locations nor identity.
RECORDED = (CODE_VERSION_KEY, STAGE_KEY)
DATA_LOCATIONS = ("dir", "uri")
# The modules whose code computes a result (paths relative to the package).
RESULT_MODULES = ("optim.py", "models", "data/augment.py", "engine.py")


class ConfigError(ValueError):
    """Invalid configuration (params.yaml, a CLI flag, a run spec); `problems` holds one
    line per problem, each with its key path and what is allowed."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self):
        n = len(self.problems)
        if n == 1:
            return f"invalid configuration: {self.problems[0]}"
        head = f"invalid configuration ({n} problems):"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


# ---------------------------------------------------------------------------------------------
# identity


def identity(spec: dict) -> dict:
    """The part of `spec` that determines its result (see the module docstring)."""
    out = {k: v for k, v in spec.items() if k not in LOCATIONS and k not in RECORDED}
    if isinstance(spec.get("data"), dict):
        out["data"] = {k: v for k, v in spec["data"].items() if k not in DATA_LOCATIONS}
    if isinstance(spec.get("training"), dict):
        training = {**TRAINING_DEFAULTS, **spec["training"]}
        out["training"] = {k: v for k, v in training.items() if k not in BOOKKEEPING}
    return out


def run_hash(spec: dict, code: str | None = None) -> str:
    """sha256 (first 16 hex) of the spec's identity plus the code version (`code`, default
    this installation's `code_version()`)."""
    ident = {**identity(spec), "code_version": code or code_version()}
    return hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:16]


_CODE_VERSIONS: dict = {}


def code_version(root=None) -> str:
    """sha256 over the files of `RESULT_MODULES` under `root` (default: this package),
    sorted by path; each path is hashed with its contents, so a rename is a new version.
    Found without importing the modules (which import torch)."""
    root = Path(root) if root else Path(importlib.util.find_spec("vsgd").origin).parent
    if root not in _CODE_VERSIONS:
        files = []
        for entry in RESULT_MODULES:
            path = root / entry
            files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
        digest = hashlib.sha256()
        for path in sorted(files):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
        _CODE_VERSIONS[root] = digest.hexdigest()
    return _CODE_VERSIONS[root]


# ---------------------------------------------------------------------------------------------
# the rules


def check_spec(spec: dict) -> list[str]:
    """Every problem of a resolved run spec (missing keys, unknown names, bad values); []
    when valid. Training keys it lacks take `TRAINING_DEFAULTS`."""
    if not isinstance(spec, dict):
        return [f"the spec must be a JSON object, got {kind(spec)}"]
    c = Checker()
    for key in REQUIRED:
        if key not in spec:
            c.problem(f"{key}: missing")
    s = View(spec)
    c.choice(s["dataset"], "dataset", DATASETS)
    c.choice(s["arch"], "arch", MODELS)
    c.choice(s["arch_key"], "arch_key", ARCHS)
    data = s["data"]
    if data is not MISSING and not (isinstance(data, dict) and data.get("dir")):
        c.problem("data.dir: missing (the prepared dataset directory)")
    c.integer(s, "batch_size", "batch_size", minimum=1)
    c.integer(s, "seed", "seed", *SEED)
    if CODE_VERSION_KEY in spec:
        c.string(spec[CODE_VERSION_KEY], CODE_VERSION_KEY)
    if STAGE_KEY in spec:
        c.choice(spec[STAGE_KEY], STAGE_KEY, STAGES)
    check_schedule(c, s["schedule"], "schedule")
    opt = s["optimizer"]
    if opt is not MISSING and not isinstance(opt, dict):
        c.problem(f"optimizer: expected a mapping, got {kind(opt)}")
    elif opt is not MISSING and "name" not in opt:
        c.problem("optimizer.name: missing")
    elif opt is not MISSING and IMPORTED_CLASS in opt:
        # Named by import path (vsgd.imported_optimizers): building it is the check, when the
        # run starts; here only the form.
        c.string(opt["name"], "optimizer.name")
        c.string(opt[IMPORTED_CLASS], f"optimizer.{IMPORTED_CLASS}")
        c.string(opt.get(IMPORTED_PACKAGE, MISSING), f"optimizer.{IMPORTED_PACKAGE}")
        # Its hyperparameters' types are the constructor's business, but a NaN or infinity
        # (JSON can carry them) is never a setting.
        check_finite(
            c,
            {k: v for k, v in opt.items() if k not in ("name", IMPORTED_CLASS, IMPORTED_PACKAGE)},
            "optimizer",
        )
        if opt["name"] in OPTIMIZERS:
            c.problem(
                f"optimizer.name: {opt['name']!r} is a built-in; an imported "
                f"optimizer needs a key of its own"
            )
    elif opt is not MISSING and c.choice(opt["name"], "optimizer.name", tuple(OPTIMIZERS)):
        # Arguments the spec leaves out take the constructor's defaults.
        args = {k: v for k, v in opt.items() if k != "name"}
        check_optimizer(c, opt["name"], args, "optimizer", partial=True)
        opt.update(args)  # numbers YAML spelled as strings, coerced
    if "training" in spec:
        check_training(c, spec["training"], "training", partial=True)
        check_test_set_use(c, spec["training"])
    return c.problems


def check_test_set_use(c: "Checker", training) -> None:
    """A run that never evaluates the test set (`eval_test: false`) reports its validation
    accuracy instead, so it needs a validation split."""
    if (
        isinstance(training, dict)
        and training.get("eval_test") is False
        and training.get("validation_size", TRAINING_DEFAULTS["validation_size"]) == 0
    ):
        c.problem(
            "training.eval_test: false needs training.validation_size > 0 (a run "
            "that never sees the test set reports val_acc)"
        )


def check_finite(c: "Checker", value, path: str) -> bool:
    """Every number inside `value` (nested lists and mappings included) is finite: for
    values of types only the code they are handed to knows, such as an imported optimizer's
    hyperparameters. Reported at each number's own key path."""
    ok, pending = True, [(value, path)]
    while pending:  # a stack, not recursion: nesting depth is the input's
        value, path = pending.pop()
        if isinstance(value, dict):
            pending += reversed([(v, join(path, k)) for k, v in value.items()])
        elif isinstance(value, (list, tuple)):
            pending += reversed([(v, f"{path}[{i}]") for i, v in enumerate(value)])
        elif (
            isinstance(value, (int, float)) and not isinstance(value, bool) and not is_finite(value)
        ):
            ok = c.problem(f"{path}: {number_text(value)} is not a finite number")
    return ok


def check_schedule(c: "Checker", schedule, path: str, partial: bool = False) -> None:
    """StepLR: `iterations` and `step_size` integers >= 1, `gamma` in (0, 1]."""
    schedule = c.mapping(
        schedule, path, required=() if partial else SCHEDULE_KEYS, optional=SCHEDULE_KEYS
    )
    if schedule is None:
        return
    for key in ("iterations", "step_size"):
        c.integer(schedule, key, f"{path}.{key}", minimum=1)
    c.number(schedule, "gamma", f"{path}.gamma", Range(0.0, 1.0, low_open=True))


def check_optimizer(
    c: "Checker", name: str, args, path: str, partial: bool = False, extra: tuple = ()
) -> None:
    """The constructor arguments of optimizer `name`: every one present (unless `partial`),
    none unknown, each within its range. Keys in `extra` are allowed and left to the
    caller (params.yaml's `lr_grid`)."""
    rules = OPTIMIZERS[name]
    args = c.mapping(
        args, path, required=() if partial else tuple(rules), optional=tuple(rules) + tuple(extra)
    )
    if args is None:
        return
    for key, rule in rules.items():
        if rule is BETAS:
            betas = args[key]
            if betas is MISSING:
                continue
            if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
                c.problem(f"{path}.{key}: expected a list of two numbers in {UNIT}, got {betas!r}")
                continue
            betas = args[key] = list(betas)
            for i in range(2):
                c.number(betas, i, f"{path}.{key}[{i}]", UNIT)
        elif isinstance(rule, tuple):
            c.choice(args[key], f"{path}.{key}", rule)
        else:
            c.number(args, key, f"{path}.{key}", rule)


def check_training(c: "Checker", training, path: str, partial: bool = False) -> None:
    """Training keys: all present (unless `partial`), none unknown, each allowed."""
    t = c.mapping(
        training, path, required=() if partial else tuple(TRAINING), optional=tuple(TRAINING)
    )
    if t is None:
        return
    for key, (_, rule) in TRAINING.items():
        if isinstance(rule, str):
            c.integer(t, key, f"{path}.{key}", minimum=int(rule[-1]))
        elif isinstance(rule, tuple):
            c.choice(t[key], f"{path}.{key}", rule)
        elif t[key] is not MISSING and not (isinstance(t[key], str) and rule.match(t[key])):
            c.problem(
                f"{path}.{key}: {t[key]!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps"
            )
