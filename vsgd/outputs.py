"""What a finished run writes to its `output_dir`, and the check that a directory holds one.

`vsgd.trainer` writes `curve.csv`, `beta1.csv` (VSGD runs only), `config.json` (the run spec)
and, last, `metrics.json` (docs/ARCHITECTURE.md, "Trainer outputs"), which records the sha256
of each file's bytes and of its own content (`DIGESTS`). A result is trusted only when
`check_result` finds nothing wrong with it: every file there, each with the bytes recorded,
well-formed, the metrics of the right types in the right ranges and consistent with the curve
and the spec, and the spec hashing to the run hash the result is filed under. A stored result
that was edited, truncated, half-copied or changed by a flipped bit then reads as damaged
instead of being counted, reused and printed as if it were right. (Results written before the
digests existed lack them, and are checked for everything else.)

No torch here: the pipeline's stages check results without loading the training stack.
"""

import csv
import hashlib
import io
import json
import math
from pathlib import Path

from .files import atomic_write, file_digest, json_sha256
from .spec import TRAINING_DEFAULTS, run_hash

CURVE_COLUMNS = ("step", "test_acc", "test_loss", "val_acc", "train_loss", "train_acc", "lr")
BETA1_COLUMNS = ("step", "mean", "q10", "q25", "median", "q75", "q90")
METRICS = "metrics.json"  # written last: with the run's hash it marks the run done
SPEC = "config.json"
CURVE = "curve.csv"
BETA1 = "beta1.csv"  # VSGD runs only (`BETA1_OPTIMIZER`)
BETA1_OPTIMIZER = "vsgd"

# Key -> what it must be. The accuracies are fractions; a loss is a cross-entropy.
STRINGS = ("name", "run_hash", "dataset", "arch", "arch_key", "optimizer", "device", "device_name")
FRACTIONS = ("test_acc", "val_acc", "train_acc")
LOSSES = ("test_loss", "train_loss")
POSITIVE = ("lr", "seconds_per_iter", "images_per_sec")
# Null where no step was timed (`timed_steps` 0: each process took only its compile step).
TIMES = ("seconds_per_iter", "images_per_sec")
# Optional: results written before they existed lack them, and stay whole. `timed_steps`:
# the steps `seconds_per_iter` averages over (all but each process's compile step);
# `compile_seconds`: those compile steps' time, null for a model not compiled.
TIMED_STEPS, COMPILE_SECONDS = "timed_steps", "compile_seconds"
# Optional too: what the CPU did with float denormals, read back in the run's process
# (vsgd.engine.denormals_in_effect; `mixed`: some of its threads flushed them), null for a
# run off the CPU.
DENORMALS_IN_EFFECT = "denormals_in_effect"
DENORMAL_EFFECTS = ("flush", "keep", "mixed")
# metrics.json: {file name: sha256 of its bytes} for the files written before it, and for
# metrics.json itself the sha256 of its canonical JSON with this entry left out.
DIGESTS = "sha256"


def check_result(directory, expected_hash: str | None = None) -> list[str]:
    """Every problem of the result in `directory` (each names its file); [] when it is a
    complete, well-formed finished run (of `expected_hash`, when given). A directory without
    metrics.json is not a finished run at all: check `has_result` first."""
    directory = Path(directory)
    problems: list[str] = []
    metrics = _read_object(directory / METRICS, problems)
    spec = _read_object(directory / SPEC, problems)
    if metrics is None:
        return problems
    _check_digests(directory, metrics, problems)
    _check_metrics(metrics, problems)
    recorded = metrics.get("run_hash")
    if expected_hash is not None and recorded != expected_hash:
        problems.append(f"{METRICS}: run_hash {recorded!r} is not this run's {expected_hash}")
    if spec is not None:
        _check_spec(spec, metrics, problems)
    diverged = bool(metrics.get("diverged"))
    curve = _read_rows(directory / CURVE, CURVE_COLUMNS, problems)
    if curve is not None:
        _check_curve(curve, metrics, diverged, problems)
    if metrics.get("optimizer") == BETA1_OPTIMIZER:
        beta1 = _read_rows(directory / BETA1, BETA1_COLUMNS, problems)
        if beta1 is not None and not beta1 and not diverged:
            problems.append(f"{BETA1}: no rows")
    return problems


def has_result(directory) -> bool:
    """A run has finished writing here (its metrics.json exists), well-formed or not."""
    return (Path(directory) / METRICS).is_file()


def _read_object(path: Path, problems: list) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path.name}: missing")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{path.name}: not readable JSON ({_first_line(exc)})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name}: expected a JSON object, got {type(value).__name__}")
        return None
    return value


def _check_digests(directory: Path, m: dict, problems: list) -> None:
    """Each file has the bytes metrics.json recorded, and metrics.json its own content."""
    digests = m.get(DIGESTS)
    if digests is None:
        return
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        problems.append(f"{METRICS}: {DIGESTS} is not an object of file names and sha256s")
        return
    others = {k: v for k, v in digests.items() if k != METRICS}
    if digests.get(METRICS) != json_sha256({**m, DIGESTS: others}):
        problems.append(f"{METRICS}: its content is not what was written (its sha256 differs)")
    for name, recorded in sorted(others.items()):
        try:
            actual = file_digest(directory / Path(name).name)
        except OSError:
            continue  # a missing file is reported with what it should hold
        if actual != recorded:
            problems.append(f"{name}: its bytes are not those written (their sha256 differs)")


def _check_metrics(m: dict, problems: list) -> None:
    def bad(key, what):
        problems.append(f"{METRICS}: {key} {m.get(key, 'missing')!r} {what}")

    for key in STRINGS:
        if not isinstance(m.get(key), str) or not m[key]:
            bad(key, "is not a non-empty string")
    for key in FRACTIONS:
        if m.get(key) is not None and not (_finite(m[key]) and 0.0 <= m[key] <= 1.0):
            bad(key, "is not null or a number in [0, 1]")
    for key in LOSSES:
        if m.get(key) is not None and not (_finite(m[key]) and m[key] >= 0.0):
            bad(key, "is not null or a finite number >= 0")
    untimed = m.get(TIMED_STEPS) == 0
    for key in POSITIVE:
        if untimed and key in TIMES:
            if m.get(key, "missing") is not None:
                bad(key, f"is not null, but {TIMED_STEPS} is 0")
        elif not (_finite(m.get(key)) and m[key] > 0.0):
            bad(key, "is not a finite number > 0")
    for key in ("seed", "iterations", "steps_done"):
        if not _integer(m.get(key)) or m[key] < (0 if key == "seed" else 1):
            bad(key, "is not an integer >= " + ("0" if key == "seed" else "1"))
    if TIMED_STEPS in m and not (
        _integer(m[TIMED_STEPS])
        and 0 <= m[TIMED_STEPS] <= (m["steps_done"] if _integer(m.get("steps_done")) else 0)
    ):
        bad(TIMED_STEPS, "is not an integer in [0, steps_done]")
    if m.get(COMPILE_SECONDS) is not None and not (
        _finite(m[COMPILE_SECONDS]) and m[COMPILE_SECONDS] >= 0.0
    ):
        bad(COMPILE_SECONDS, "is not null or a finite number >= 0")
    if m.get(DENORMALS_IN_EFFECT) not in (None, *DENORMAL_EFFECTS):
        bad(DENORMALS_IN_EFFECT, f"is not null or one of {', '.join(DENORMAL_EFFECTS)}")
    if m.get("mlflow_run_id") is not None and not isinstance(m["mlflow_run_id"], str):
        bad("mlflow_run_id", "is not null or a string")
    diverged = m.get("diverged", "missing")
    if diverged is not None and not (
        isinstance(diverged, dict)
        and _integer(diverged.get("step"))
        and _integer(diverged.get("stopped_at"))
        and 1 <= diverged["step"] <= diverged["stopped_at"]
    ):
        bad("diverged", "is not null or {step, stopped_at} with 1 <= step <= stopped_at")
        return
    if not (_integer(m.get("iterations")) and _integer(m.get("steps_done"))):
        return
    if diverged is None and m["steps_done"] != m["iterations"]:
        problems.append(
            f"{METRICS}: steps_done {m['steps_done']} of {m['iterations']} "
            "iterations, and the run did not diverge"
        )
    if diverged is not None and m["steps_done"] != diverged["stopped_at"]:
        problems.append(
            f"{METRICS}: steps_done {m['steps_done']} is not the step where the "
            f"diverged run stopped ({diverged['stopped_at']})"
        )
    if m["steps_done"] > m["iterations"]:
        problems.append(
            f"{METRICS}: steps_done {m['steps_done']} beyond the {m['iterations']} iterations"
        )


def _check_spec(spec: dict, m: dict, problems: list) -> None:
    """config.json is the spec the run trained: it agrees with the metrics, and its settings
    hash to the run hash (so that neither was edited after the run)."""
    for key in ("run_hash", "name", "dataset", "arch", "arch_key", "seed"):
        if spec.get(key) != m.get(key):
            problems.append(
                f"{SPEC}: {key} {spec.get(key)!r} disagrees with {METRICS}'s {m.get(key)!r}"
            )
    try:
        recomputed = run_hash(spec)
        planned = spec["schedule"]["iterations"]
        training = {**TRAINING_DEFAULTS, **(spec.get("training") or {})}
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        problems.append(f"{SPEC}: not a run spec ({_first_line(exc)})")
        return
    if recomputed != spec.get("run_hash"):
        problems.append(
            f"{SPEC}: its settings hash to {recomputed}, not to its run_hash "
            f"{spec.get('run_hash')!r} (edited, or written by other code)"
        )
    if planned != m.get("iterations"):
        problems.append(
            f"{METRICS}: iterations {m.get('iterations')!r} is not the spec's {planned!r}"
        )
    if m.get("diverged"):
        return  # a diverged run reports its last finite evaluation, or none
    wanted = ["train_loss", "train_acc"]
    if training.get("eval_test", True):
        wanted += ["test_acc", "test_loss"]
    if training.get("validation_size"):
        wanted.append("val_acc")
    for key in wanted:
        if m.get(key) is None:
            problems.append(f"{METRICS}: {key} is null, but the run measured it")


def _read_rows(path: Path, columns: tuple, problems: list) -> list[dict] | None:
    """The rows of a result CSV, every field a float or empty; None (a problem) if it is
    missing, has other columns, or a field is not a number."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{path.name}: missing")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path.name}: not readable ({_first_line(exc)})")
        return None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if tuple(header or ()) != columns:
        problems.append(f"{path.name}: columns {header!r}, expected {list(columns)!r}")
        return None
    rows = []
    for line, fields in enumerate(reader, start=2):
        if len(fields) != len(columns):
            problems.append(
                f"{path.name}: line {line} has {len(fields)} fields, expected {len(columns)}"
            )
            return None
        try:
            rows.append({c: float(v) if v != "" else None for c, v in zip(columns, fields)})
        except ValueError:
            problems.append(f"{path.name}: line {line} holds a field that is not a number")
            return None
    return rows


def _check_curve(rows: list[dict], m: dict, diverged: bool, problems: list) -> None:
    steps = [row["step"] for row in rows]
    if any(s is None or s != int(s) or s < 0 for s in steps) or steps != sorted(set(steps)):
        problems.append(f"{CURVE}: steps are not increasing integers >= 0")
        return
    if not rows:
        if not diverged:
            problems.append(f"{CURVE}: no rows")
        return
    if diverged or not _integer(m.get("steps_done")):
        return
    last = rows[-1]
    if last["step"] != m["steps_done"]:
        problems.append(
            f"{CURVE}: last step {int(last['step'])}, the run ended at {m['steps_done']}"
        )
        return
    # The trainer reports the last evaluation (its exact repr in both files).
    for key in ("test_acc", "test_loss", "val_acc", "train_loss", "train_acc"):
        if not _same(last[key], m.get(key)):
            problems.append(
                f"{METRICS}: {key} {m.get(key)!r} is not the curve's final {last[key]!r}"
            )


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return _finite(b) and float(a) == float(b)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_outputs(
    out_dir: Path, spec: dict, metrics: dict, curve: list[dict], beta1: list[dict] | None
) -> dict:
    """curve.csv, beta1.csv (VSGD runs: `beta1` is not None), config.json, then metrics.json
    with the sha256 of each (`DIGESTS`); returns the metrics as written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {CURVE: csv_text(CURVE_COLUMNS, curve), SPEC: json.dumps(spec, indent=2) + "\n"}
    if beta1 is not None:
        files[BETA1] = csv_text(BETA1_COLUMNS, beta1)
    for name, text in files.items():
        atomic_write(out_dir / name, text)
    metrics = sealed(metrics, {n: hashlib.sha256(t.encode()).hexdigest() for n, t in files.items()})
    # metrics.json last: its presence (with the run hash) marks the run as done.
    atomic_write(out_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
    return metrics


def sealed(metrics: dict, digests: dict) -> dict:
    """`metrics` recording `digests` ({file name: sha256 of its bytes}) and its own sha256,
    as `DIGESTS` (what `check_result` verifies)."""
    metrics = {**metrics, DIGESTS: dict(digests)}
    return {**metrics, DIGESTS: {**digests, METRICS: json_sha256(metrics)}}


def csv_text(columns: tuple, rows: list[dict]) -> str:
    """A header and one line per row; None as an empty field, floats as `repr` (exact)."""
    lines = [",".join(columns)]
    lines += [",".join("" if row[c] is None else repr(row[c]) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"
