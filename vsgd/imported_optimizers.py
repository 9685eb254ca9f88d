"""Optimizers named by import path, beside the built-ins: `torch.optim:RAdam`,
`pytorch_optimizer:Lion`, `my_package.opt:MyOptimizer`.

params.yaml names one under `optimizer:` with the key `class` and its hyperparameters (and
grids) beside it; `optimizers:` lists it by its key like a built-in. A run's spec carries
the import path and the distribution that provides it (`package`: `torch==2.14.1`, or for a
module outside any installed distribution `local:<sha256 of its source file>`), so both are
part of the run identity: upgrading the package re-runs exactly its runs, and a pod with
another version refuses to train (exit 78) instead of recording a result under the wrong
identity.

`check` finds every problem of an entry before any work starts: an import that fails, a class
that is not a `torch.optim.Optimizer`, a hyperparameter the constructor does not take (listing
the ones it does), a value the constructor rejects (it is built once on a dummy parameter).
"""

import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import re
import sys
from pathlib import Path

from .spec import IMPORTED_CLASS as CLASS_KEY  # params.yaml / spec key of the import path
from .spec import IMPORTED_PACKAGE as PACKAGE_KEY  # spec key: the providing distribution
from .spec import ConfigError

IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# Arguments every optimizer of the grid needs: the schedule scales lr, the tables show it.
REQUIRED = ("lr",)


class ImportProblem(Exception):
    """The import path cannot give an optimizer class (the message says why)."""


def load_class(path: str) -> type:
    """`module.sub:Class` -> the class; ImportProblem with one line saying why not."""
    if not isinstance(path, str) or not IMPORT_PATH.match(path):
        raise ImportProblem(
            f"{path!r} is not an import path; allowed: module:Class, e.g. "
            f"torch.optim:RAdam or my_package.opt:MyOptimizer"
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise ImportProblem(
            f"cannot import module {module_name!r}: {type(exc).__name__}: "
            f"{exc}" + _install_hint(module_name, exc)
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportProblem(f"module {module_name!r} has no {attr!r}" + _close_names(obj, part))
        obj = getattr(obj, part)
    import torch

    if not (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)):
        raise ImportProblem(f"{path} is not a torch.optim.Optimizer subclass (it is {_kind(obj)})")
    return obj


@functools.cache
def provider(path: str) -> str:
    """Who provides the module of `path`: `<distribution>==<version>`, or `local:<12 hex>` of
    the module's source file when no installed distribution has it."""
    top = path.partition(":")[0].split(".")[0]
    # The usual case first, cheaply: a distribution named like its module (torch,
    # pytorch_optimizer); scanning every installed distribution costs most of a second.
    for guess in dict.fromkeys([top, top.replace("_", "-")]):
        try:
            dist = importlib.metadata.distribution(guess)
        except importlib.metadata.PackageNotFoundError:
            continue
        if _provides(dist, top):
            return f"{dist.metadata['Name']}=={dist.version}"
    dists = importlib.metadata.packages_distributions().get(top) or []
    if dists:
        name = sorted(dists)[0]
        return f"{name}=={importlib.metadata.version(name)}"
    module = sys.modules.get(path.partition(":")[0]) or importlib.import_module(
        path.partition(":")[0]
    )
    source = Path(inspect.getsourcefile(module) or module.__file__)
    return f"local:{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}"


def _provides(dist, top: str) -> bool:
    """Whether distribution `dist` installs the top-level module `top`."""
    listed = dist.read_text("top_level.txt")
    if listed is not None:
        return top in listed.split()
    return any(str(f).split("/")[0] in (top, f"{top}.py") for f in dist.files or ())


def arguments(cls: type) -> tuple[list[str], bool]:
    """The constructor's keyword arguments (besides `params`) and whether it takes **kwargs."""
    sig = inspect.signature(cls.__init__)
    names, var_kw = [], False
    for i, (name, p) in enumerate(sig.parameters.items()):
        if i == 0 or name == "params":  # self, and what the optimizer optimizes
            continue
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(name)
    return names, var_kw


def constructor_args(args: dict) -> dict:
    """Spec/params values as the constructor wants them: lists (betas) as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def check(path: str, entry: dict, *, grid_keys=(), values=()) -> list[str]:
    """Every problem of a params.yaml entry `{class: ..., <hyperparameters>}` at key path
    `path` (`optimizer.radam`). `grid_keys`: keys a grid varies (each must be an argument);
    `values`: complete argument sets to build once each (the pinned values, every grid
    point), so that a value the constructor rejects is found now."""
    try:
        cls = load_class(entry.get(CLASS_KEY))
    except ImportProblem as exc:
        return [f"{path}.{CLASS_KEY}: {exc}"]
    names, var_kw = arguments(cls)
    given = [k for k in entry if k not in (CLASS_KEY, "grid")]
    problems = []
    for key in list(dict.fromkeys([*given, *grid_keys])):
        if key not in names and not var_kw:
            problems.append(
                f"{path}.{key}: not an argument of {entry[CLASS_KEY]}; it takes: {', '.join(names)}"
            )
    for key in REQUIRED:
        if key not in given:
            problems.append(
                f"{path}.{key}: missing (every optimizer of the grid needs a "
                f"learning rate: the schedule scales it)"
            )
        elif key not in names and not var_kw:
            pass  # reported above
    if problems:
        return problems
    for where, args in values or [(path, {k: entry[k] for k in given})]:
        problem = try_build(cls, args)
        if problem:
            problems.append(
                f"{where}: {entry[CLASS_KEY]} rejects these values ({_show(args)}): {problem}"
            )
    return problems


def try_build(cls: type, args: dict) -> str | None:
    """Build the optimizer once on a dummy parameter; the error's one line, or None."""
    import torch

    try:
        cls([torch.nn.Parameter(torch.zeros(2))], **constructor_args(args))
    except Exception as exc:  # noqa: BLE001 - whatever the constructor raises is the answer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def make(spec_optimizer: dict, params):
    """The optimizer of a spec's `optimizer` section with a `class`: checks that this
    installation provides the same package version the spec was built with."""
    path = spec_optimizer[CLASS_KEY]
    try:
        cls = load_class(path)
    except ImportProblem as exc:
        raise ConfigError([f"optimizer.{CLASS_KEY}: {exc}"]) from None
    here, wanted = provider(path), spec_optimizer.get(PACKAGE_KEY)
    if wanted and here != wanted:
        raise ConfigError(
            [
                f"optimizer.{PACKAGE_KEY}: the run was planned with {wanted}, "
                f"this installation has {here}; install the same version (the "
                f"training image: requirements-optimizers.txt) or plan again"
            ]
        )
    args = {k: v for k, v in spec_optimizer.items() if k not in ("name", CLASS_KEY, PACKAGE_KEY)}
    return cls(params, **constructor_args(args))


def _install_hint(module, exc):
    if isinstance(exc, ModuleNotFoundError):
        return (
            f" (install it: pip install <the package providing {module.split('.')[0]}>; "
            f"for cluster runs add it to requirements-optimizers.txt)"
        )
    return ""


def _close_names(obj, wanted):
    import difflib

    close = difflib.get_close_matches(wanted, [n for n in dir(obj) if not n.startswith("_")], n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _kind(obj):
    return (
        f"the class {obj.__module__}.{obj.__qualname__}"
        if isinstance(obj, type)
        else f"a {type(obj).__name__}"
    )


def _show(args):
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
