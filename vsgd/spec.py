"""What a run is: the names, keys, defaults and allowed values of a run spec, the rules that
check one, and its identity.

This module is the one definition of these facts. The trainer checks a spec with
`check_spec`; `pipeline.config` checks params.yaml with the same rules (`check_optimizer`,
`check_schedule`, `check_training`, on the key paths of params.yaml). It imports neither
torch nor anything outside the standard library, so validating is instant and works without
the training stack.

Run identity (`run_hash`): a run is identified by everything that can change its result and
by nothing else. In the identity: dataset, model, the data's checksum and source, the
optimizer and every hyperparameter, the schedule, batch size, seed, the training keys that
change what is computed (`validation_size`, `eval_every`, `test_limit` and `eval_test`, which
decide which points the curve has and what they are measured on, `eval_batch_size`, `precision`,
`compile`, `channels_last`, `device`) and the code version. Not in it: the run's name and
locations (`output_dir`, `checkpoint`, `data.dir`, `data.uri`), the tracking settings, and the
keys in `BOOKKEEPING`, which only change how often things are logged or saved (a resumed run
ends bit-identical whatever they are). The code version is a hash of the modules that compute
a result, `RESULT_MODULES` (the optimizer, the models, augmentation, and `vsgd.engine`: the
training step and evaluation); tracking, checkpoint, storage, download and CLI code are not
part of it. A change there keeps every finished result. A spec's own `code_version` key (the
launcher's, which `pipeline.train` compares with its own to name a stale image) is not in the
identity either: the code version enters the hash through `run_hash`'s `code` argument.
"""

import difflib
import hashlib
import importlib.util
import re
from pathlib import Path

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
AUTO_BOOL = ("auto", True, False)
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
SCHEDULE_KEYS = ("iterations", "step_size", "gamma")


class Range:
    """An allowed interval of numbers; `str` gives it in interval notation."""

    def __init__(self, low=None, high=None, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __contains__(self, value):
        return not ((self.low is not None and (value <= self.low if self.low_open
                                               else value < self.low))
                    or (self.high is not None and (value >= self.high if self.high_open
                                                   else value > self.high)))

    def __str__(self):
        return (("(" if self.low_open or self.low is None else "[")
                + ("-inf" if self.low is None else f"{self.low:g}") + ", "
                + ("inf" if self.high is None else f"{self.high:g}")
                + (")" if self.high_open or self.high is None else "]"))


POSITIVE = Range(0.0, low_open=True)
NON_NEGATIVE = Range(0.0)
UNIT = Range(0.0, 1.0, high_open=True)          # [0, 1): momentum, Adam's betas
TAU = Range(0.5, 1.0, low_open=True)            # VSGD's kappa_1, kappa_2 in (0.5, 1]
BETAS = "betas"                                 # a pair of numbers in UNIT

# An optimizer named by import path (vsgd.imported_optimizers) carries these in its spec
# section: the path and the distribution that provides it, both part of the run identity.
IMPORTED_CLASS = "class"
IMPORTED_PACKAGE = "package"

# Constructor arguments of each optimizer and their allowed values.
OPTIMIZERS = {
    "sgd": {"lr": POSITIVE, "momentum": UNIT, "weight_decay": NON_NEGATIVE},
    "adam": {"lr": POSITIVE, "betas": BETAS, "eps": POSITIVE, "weight_decay": NON_NEGATIVE},
    "adamw": {"lr": POSITIVE, "betas": BETAS, "eps": POSITIVE, "weight_decay": NON_NEGATIVE},
    "vsgd": {"lr": POSITIVE, "ghattg": POSITIVE, "ps": POSITIVE, "tau1": TAU, "tau2": TAU,
             "weight_decay": NON_NEGATIVE, "eps": POSITIVE},
}

# Training keys: default and what is allowed ("int>=N", a tuple of choices, or DEVICE_RE).
TRAINING = {
    "eval_every": (500, "int>=1"),
    "checkpoint_every": (1000, "int>=1"),
    "log_every": (50, "int>=1"),
    "beta1_every": (100, "int>=1"),   # the authors log beta1 every 100 iterations
    "eval_batch_size": (1000, "int>=1"),
    "validation_size": (0, "int>=0"),
    "test_limit": (0, "int>=0"),
    # false: the test set is never evaluated (tuning runs); needs validation_size > 0.
    "eval_test": (True, (True, False)),
    "precision": ("fp32", PRECISIONS),
    "compile": ("auto", AUTO_BOOL),
    "channels_last": ("auto", AUTO_BOOL),
    "device": ("auto", DEVICE_RE),
}
TRAINING_DEFAULTS = {key: default for key, (default, _) in TRAINING.items()}
# Training keys that only change what is logged or how often state is saved: not identity.
BOOKKEEPING = ("log_every", "checkpoint_every", "beta1_every")

REQUIRED = ("name", "run_hash", "dataset", "arch", "arch_key", "data", "optimizer", "schedule",
            "batch_size", "seed", "output_dir")
# Top-level spec keys and `data` keys that say where things are, not what is computed.
LOCATIONS = ("name", "run_hash", "output_dir", "checkpoint", "tracking")
# The code version the launcher built the spec with: recorded, not identity (see run_hash).
CODE_VERSION_KEY = "code_version"
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
    out = {k: v for k, v in spec.items() if k not in LOCATIONS and k != CODE_VERSION_KEY}
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
    c.integer(s, "seed", "seed", minimum=0)
    if CODE_VERSION_KEY in spec:
        c.string(spec[CODE_VERSION_KEY], CODE_VERSION_KEY)
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
        if opt["name"] in OPTIMIZERS:
            c.problem(f"optimizer.name: {opt['name']!r} is a built-in; an imported "
                      f"optimizer needs a key of its own")
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
    if isinstance(training, dict) and training.get("eval_test") is False \
            and training.get("validation_size", TRAINING_DEFAULTS["validation_size"]) == 0:
        c.problem("training.eval_test: false needs training.validation_size > 0 (a run "
                  "that never sees the test set reports val_acc)")


def check_schedule(c: "Checker", schedule, path: str, partial: bool = False) -> None:
    """StepLR: `iterations` and `step_size` integers >= 1, `gamma` in (0, 1]."""
    schedule = c.mapping(schedule, path, required=() if partial else SCHEDULE_KEYS,
                         optional=SCHEDULE_KEYS)
    if schedule is None:
        return
    for key in ("iterations", "step_size"):
        c.integer(schedule, key, f"{path}.{key}", minimum=1)
    c.number(schedule, "gamma", f"{path}.gamma", Range(0.0, 1.0, low_open=True))


def check_optimizer(c: "Checker", name: str, args, path: str, partial: bool = False,
                    extra: tuple = ()) -> None:
    """The constructor arguments of optimizer `name`: every one present (unless `partial`),
    none unknown, each within its range. Keys in `extra` are allowed and left to the
    caller (params.yaml's `lr_grid`)."""
    rules = OPTIMIZERS[name]
    args = c.mapping(args, path, required=() if partial else tuple(rules),
                     optional=tuple(rules) + tuple(extra))
    if args is None:
        return
    for key, rule in rules.items():
        if rule is BETAS:
            betas = args[key]
            if betas is MISSING:
                continue
            if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
                c.problem(f"{path}.{key}: expected a list of two numbers in {UNIT}, "
                          f"got {betas!r}")
                continue
            betas = args[key] = list(betas)
            for i in range(2):
                c.number(betas, i, f"{path}.{key}[{i}]", UNIT)
        else:
            c.number(args, key, f"{path}.{key}", rule)


def check_training(c: "Checker", training, path: str, partial: bool = False) -> None:
    """Training keys: all present (unless `partial`), none unknown, each allowed."""
    t = c.mapping(training, path, required=() if partial else tuple(TRAINING),
                  optional=tuple(TRAINING))
    if t is None:
        return
    for key, (_, rule) in TRAINING.items():
        if isinstance(rule, str):
            c.integer(t, key, f"{path}.{key}", minimum=int(rule[-1]))
        elif isinstance(rule, tuple):
            c.choice(t[key], f"{path}.{key}", rule)
        elif t[key] is not MISSING and not (isinstance(t[key], str) and rule.match(t[key])):
            c.problem(f"{path}.{key}: {t[key]!r} is not a device; allowed: auto, cpu, cuda, "
                      "cuda:N, mps")


# ---------------------------------------------------------------------------------------------
# the checker


class _Missing:
    """A required key that is absent (already reported): checks on it pass silently."""

    def __repr__(self):
        return "<missing>"


MISSING = _Missing()


class View:
    """A mapping under validation: absent keys read as MISSING, writes (coerced numbers)
    go to the underlying dict."""

    def __init__(self, data: dict):
        self.data = data

    def __getitem__(self, key):
        return self.data.get(key, MISSING)

    def __setitem__(self, key, value):
        self.data[key] = value

    def __contains__(self, key):
        return key in self.data

    def __iter__(self):
        return iter(list(self.data))


class Checker:
    """Accumulates problems, each with its key path; each check returns whether the value
    passed. Numbers that YAML spelled another way (3.0e4, "1e-8") are coerced in place."""

    def __init__(self):
        self.problems = []

    def problem(self, text):
        self.problems.append(text)
        return False

    def mapping(self, value, path, required=(), optional=()):
        """A view of `value` if it is a mapping (unknown and missing keys reported)."""
        if value is MISSING:
            return None
        if isinstance(value, View):
            value = value.data
        if not isinstance(value, dict):
            self.problem(f"{path or 'params.yaml'}: expected a mapping, got {kind(value)}")
            return None
        allowed = list(dict.fromkeys(list(required) + list(optional)))
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(f"{join(path, key)}: unknown key{hint}; allowed: "
                             f"{', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.problem(f"{join(path, key)}: missing")
        return View(value)

    def names(self, value, path, allowed):
        """A non-empty list of distinct names from `allowed`."""
        if not self.list_of(value, path):
            return False
        ok = True
        for i, name in enumerate(value):
            ok &= self.choice(name, f"{path}[{i}]", allowed)
        if len(set(map(str, value))) != len(value):
            ok = self.problem(f"{path}: duplicates in {value!r}")
        return ok

    def list_of(self, value, path, empty_ok=False):
        if value is MISSING:
            return False
        if not isinstance(value, list):
            return self.problem(f"{path}: expected a list, got {kind(value)}")
        if not value and not empty_ok:
            return self.problem(f"{path}: must not be empty")
        return True

    def choice(self, value, path, allowed):
        if value is MISSING:
            return False
        if any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            return True
        shown = ", ".join(show(a) for a in allowed)
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return self.problem(f"{path}: {show(value)} is not allowed{hint}; allowed: {shown}")

    def string(self, value, path):
        if value is MISSING or (isinstance(value, str) and value):
            return value is not MISSING
        return self.problem(f"{path}: expected a non-empty string, got {value!r}")

    def integer(self, parent, key, path, minimum=None):
        value = parent[key]
        if value is MISSING:
            return False
        if isinstance(value, float) and value.is_integer():
            value = parent[key] = int(value)  # 3.0e4 from YAML is meant as 30000
        if isinstance(value, bool) or not isinstance(value, int):
            return self.problem(f"{path}: expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            return self.problem(f"{path}: {value} must be >= {minimum}")
        return True

    def number(self, parent, key, path, allowed: Range = Range()):
        value = parent[key]
        if value is MISSING:
            return False
        if isinstance(value, str):
            # YAML 1.1 reads 1e-8 (no dot) as a string; accept the number it spells.
            try:
                value = parent[key] = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.problem(f"{path}: expected a number, got {value!r}")
        if value not in allowed:
            return self.problem(f"{path}: {value!r} is outside {allowed}")
        return True


def kind(value) -> str:
    return "null" if value is None else type(value).__name__


def show(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def join(path, key) -> str:
    return f"{path}.{key}" if path else str(key)
