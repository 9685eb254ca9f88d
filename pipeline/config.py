"""Load `params.yaml`: the file (read bounded, `pipeline.params_file`) <- the selected preset
<- `--set key=value` overrides, then validated (`pipeline.params_check`), every problem at
once: `load_params` is what every command calls."""

from pathlib import Path

from vsgd.checker import kind
from vsgd.spec import ConfigError

from .params_check import validate
from .params_file import apply_preset, parse_overrides, read_yaml, set_key


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
        set_key(raw, key, value, problems)
    params = apply_preset(raw, problems)
    for key, value in parsed:
        if key != "preset" and not key.startswith("presets."):
            set_key(params, key, value, problems)
    if not problems:
        problems = validate(params, build_imported=build_imported)
    if problems:
        raise ConfigError(problems)
    return params


def add_params_arguments(parser) -> None:
    """`--params` and `--set`, as every command that reads params.yaml takes them."""
    parser.add_argument(
        "--params",
        default="params.yaml",
        metavar="FILE",
        help="the params file (default: params.yaml)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this call, e.g. optimizer.vsgd.lr=0.05 or "
        "'seeds=[0,1,2]' (YAML value; repeatable)",
    )
