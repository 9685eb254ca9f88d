"""Reading params.yaml, bounded: the file and every `--set` value go through one YAML loader
(`read_yaml`, `parse_yaml`) that refuses a file beyond `MAX_PARAMS_BYTES` and YAML whose
aliases expand to more than `MAX_YAML_NODES` nodes before anything walks it; and the edits
that make the params a run sees (`parse_overrides`, `apply_preset`, `set_key`, `merge`)."""

import copy
from pathlib import Path

import yaml

from vsgd.spec import ConfigError

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
    return merge(params, overlay)


def merge(base: dict, overlay: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `overlay` replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_key(tree: dict, dotted: str, value, problems: list):
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
        raise ConfigError(
            [
                f"{path}: {f'{size} bytes' if size else 'endless'}; allowed: at "
                f"most {MAX_PARAMS_BYTES} bytes ({MAX_PARAMS_BYTES // 1024} KiB)"
            ]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                f"{path}: not UTF-8 text (byte {exc.start}: "
                f"{data[exc.start : exc.start + 1]!r}); save it as UTF-8"
            ]
        ) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> object:
    """YAML text as data, through the same bounds as a file; `source` names it in problems."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PARAMS_BYTES:
        raise ConfigError(
            [
                f"{source}: more than {MAX_PARAMS_BYTES} bytes of YAML; allowed: "
                f"at most {MAX_PARAMS_BYTES} ({MAX_PARAMS_BYTES // 1024} KiB)"
            ]
        )
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
        reason = str(exc).split(";")[0]  # not Python's advice on raising its own limit
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
    sizes = {}  # id(node) -> its node count with aliases expanded
    entered = set()  # nodes whose children are being counted: an alias to one is a cycle
    pending = [(root, False)]
    while pending:  # depth-first, iteratively: the nesting depth is the document's
        node, children_done = pending.pop()
        if children_done:
            entered.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > MAX_YAML_NODES:
                raise ConfigError(
                    [
                        f"more than {MAX_YAML_NODES} values with its aliases "
                        f"expanded (line {node.start_mark.line + 1}); allowed: "
                        f"at most {MAX_YAML_NODES}: write the values out, or "
                        "alias less"
                    ]
                )
            continue
        if id(node) in sizes:
            continue
        if id(node) in entered:
            raise ConfigError(
                [
                    f"an alias at line {node.start_mark.line + 1} refers to a "
                    "node that contains it (an endless value)"
                ]
            )
        entered.add(id(node))
        pending.append((node, True))
        pending.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []
