"""How long a stage's pending runs take on this machine, said before they start
(`pipeline.execute.run_stage`, after the survey line):

    train: 72 runs to run, about 3 d 4 h here (cpu, 1 run at a time on 2 threads; step
    times measured now in 1 min 12 s); for a first look in minutes: dvc exp run -S preset=demo

Each pending run costs its iterations x the seconds per step of its configuration (what
changes a step's time: dataset, model, batch size, optimizer, the timed training keys, the
device); the runs share the executor's parallel slots (`Executor.max_parallel`): the
estimate is their total over the slots, never less than the longest run. Evaluation,
checkpoints and start-up are not in it; an interrupted run resumes and takes less.

Seconds per step, per configuration, from the first of:

1. the GPU check's figures (`python -m pipeline doctor --gpu-check`, its JSON report) when
   they are of this GPU and torch: VSGD's step at the protocol's batch size, for every
   optimizer of that dataset, architecture and precision;
2. the cache (`CACHE`): what an earlier stage measured, keyed by the configuration and this
   machine (device and its name, torch version, cores, threads per run), with the date;
3. measured now, through the real training step (`pipeline.step_timing`, uncompiled: a
   compile costs a minute) on the prepared data, with the threads each run will get (the
   cores split between the parallel runs). A configuration gets a couple of warm-up and a
   few timed steps, cut short after `CONFIGURATION_SECONDS` or once they cost
   `MEASURING_SHARE` of its runs' work (a tiny stage's configuration gets one step; with no
   timed step, its fastest warm-up step counts). Measuring stops once it has cost
   `MEASURING_SHARE` of the work it estimates, or `MEASURING_SECONDS`: first one
   configuration per model (the largest first), then the other optimizers;
4. a measured configuration of the same model with another optimizer (said in the line).

Runs left without a step time are counted as not estimated; with none estimated, the line
says so and why. The Kubernetes executor's runs go to other machines: only the GPU
check's figures, of whichever GPU, serve there (said in the line).
"""

import datetime
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vsgd import engine
from vsgd.data import DATASETS
from vsgd.data.prepared import load_prepared
from vsgd.files import atomic_write, json_sha256
from vsgd.spec import TRAINING_DEFAULTS
from vsgd.trainer import device_name

from . import step_timing

CACHE = Path("results/step_times.json")
# Written by `python -m pipeline doctor --gpu-check` (pipeline.doctor: its `--out` default
# and `gpu_check.JSON_NAME`).
GPU_CHECK_REPORT = Path("results/doctor/gpu-check.json")
WARMUP_STEPS = 2
TIMED_STEPS = 3
CONFIGURATION_SECONDS = 10.0  # no step of a configuration starts after this (one does)
MEASURING_SECONDS = 120.0  # all of the measuring, about
MEASURING_SHARE = 0.02  # of the work measured so far: the tiny presets' stages measure little
# A CPU estimate above this names the demo preset.
DEMO_HINT_SECONDS = 3 * 3600.0
DEMO_HINT = "for a first look in minutes: dvc exp run -S preset=demo"


@dataclass(frozen=True)
class Machine:
    """Where the runs step, as the cache keys it."""

    device: str  # a torch device: cpu, cuda:0, mps
    name: str  # the device's name: the CPU model, the GPU
    torch: str
    cpus: int
    threads: int  # each run's

    @property
    def kind(self) -> str:
        return self.device.split(":")[0]


def stage_line(params: dict, pending: list[dict], stage: str, max_parallel: int | None) -> str:
    """The line (see the module docstring). It never fails the stage: an estimate that
    cannot be made says why."""
    head = f"{stage}: {_count(len(pending), 'run')} to run"
    try:
        return head + _estimate(
            params, pending, max_parallel, lambda text: print(f"{stage}: {text}", flush=True)
        )
    except Exception as exc:  # noqa: BLE001 - the estimate costs only itself, never the stage
        return f"{head}; not estimated: {type(exc).__name__}: {exc}"


def machine_facts(params: dict, max_parallel: int | None) -> Machine:
    """This machine as the local executor's runs see it: the device their
    `training.device` resolves to, and the threads each gets (`OMP_NUM_THREADS` where set,
    else the cores split between the runs at once, as the local executor gives them)."""
    name = params["training"]["device"]
    gpus = (params["executor"].get("local") or {}).get("gpus", "all")
    # `gpus: none` shows an `auto` run no GPU: it trains on the CPU.
    device = torch.device("cpu") if name == "auto" and gpus == "none" else None
    device = device or engine.resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    given = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(given) if given.isdigit() and int(given) > 0 else cpus // (max_parallel or 1)
    return Machine(str(device), device_name(device), torch.__version__, cpus, max(1, threads))


def configuration(spec: dict) -> dict:
    """What changes a step's time: the dataset, model, batch size, the optimizer (its name
    and every argument that is not a hyperparameter value: the class, package,
    implementation), the timed training keys, and the code that computes a step."""
    optimizer = {k: v for k, v in spec["optimizer"].items() if k == "name" or not _number(v)}
    training = {**TRAINING_DEFAULTS, **spec["training"]}
    return {
        "dataset": spec["dataset"],
        "model": spec["arch"],
        "batch_size": spec["batch_size"],
        "optimizer": optimizer,
        "training": {k: training[k] for k in step_timing.TIMED_TRAINING},
        "code_version": spec.get("code_version"),
    }


def measure_step(spec: dict, machine: Machine, loaded: dict, iterations: int) -> float:
    """Seconds per training step of `spec`'s configuration here, uncompiled, on its prepared
    data (`loaded`: each data directory read once per estimate, or what reading it raised).
    Its steps stop after `CONFIGURATION_SECONDS`, or once they cost `MEASURING_SHARE` of the
    work they estimate (its runs' `iterations` in all): a tiny stage's after one step."""
    directory = spec["data"]["dir"]
    if directory not in loaded:
        try:
            loaded[directory] = load_prepared(directory)
        except Exception as exc:  # noqa: BLE001 - said for every configuration of the data
            loaded[directory] = exc
    data = loaded[directory]
    if isinstance(data, Exception):
        raise data
    # The images the steps use, not the whole training split on the device.
    n = spec["batch_size"] * (WARMUP_STEPS + TIMED_STEPS + 1)
    data = data._replace(train_x=data.train_x[:n], train_y=data.train_y[:n])
    start = time.perf_counter()

    def enough(seconds: list[float]) -> bool:
        spent = time.perf_counter() - start
        return spent >= min(CONFIGURATION_SECONDS, MEASURING_SHARE * iterations * min(seconds))

    run, state = step_timing.build(spec, torch.device(machine.device), data, compile=False)
    seconds = step_timing.step_seconds(run, state, WARMUP_STEPS + TIMED_STEPS, enough)
    # Cut short before its timed steps: its fastest step so far (a first step is slower).
    timed = seconds[WARMUP_STEPS:] or [min(seconds)]
    return sum(timed) / len(timed)


def wall_seconds(run_seconds: list[float], parallel: int) -> float:
    """The runs on `parallel` slots: their total over the slots, never less than the longest."""
    return max(sum(run_seconds) / max(1, parallel), max(run_seconds, default=0.0))


def duration(seconds: float) -> str:
    """`3 d 4 h`, `5 h 12 min`, `12 min`, `40 s`."""
    s = round(seconds)
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{(s + 30) // 60} min"
    return f"{s} s"


@dataclass
class _Configuration:
    key: dict
    runs: list  # its pending specs
    seconds: float | None = None
    source: str | None = None  # "now", "cache <date>", "gpu-check <date>", "model"

    @property
    def spec(self) -> dict:
        return self.runs[0]

    @property
    def model(self) -> str:
        """The configuration but its optimizer (another optimizer's step stands in)."""
        return json_sha256({k: v for k, v in self.key.items() if k != "optimizer"})

    @property
    def iterations(self) -> int:
        return sum(s["schedule"]["iterations"] for s in self.runs)

    @property
    def images(self) -> int:
        """Its runs' pixels to train on: which configurations weigh most, before measuring."""
        return (
            self.iterations * self.key["batch_size"] * DATASETS[self.key["dataset"]].image_size ** 2
        )


def _estimate(params: dict, pending: list[dict], max_parallel: int | None, say) -> str:
    configs = {}
    for spec in pending:
        key = configuration(spec)
        configs.setdefault(json_sha256(key), _Configuration(key, [])).runs.append(spec)
    configs = list(configs.values())
    parallel = min(max_parallel or len(pending), len(pending))
    if params["executor"]["kind"] != "local":
        return _cluster_estimate(configs, parallel, max_parallel)
    machine = machine_facts(params, max_parallel)
    figures = gpu_check_figures(GPU_CHECK_REPORT, machine)
    cache = _read_cache(CACHE)
    for c in configs:
        entry = cache.get(_cache_key(c.key, machine))
        if not _use_figure(c, figures, machine.kind) and entry is not None:
            c.seconds, c.source = entry["seconds_per_step"], f"cache {entry['date']}"
    spent, errors, stopped = _measure(configs, machine, say)
    measured = {_cache_key(c.key, machine): c for c in configs if c.source == "now"}
    if measured:
        _write_cache(CACHE, machine, measured)
    _from_other_optimizers(configs)
    seconds, estimated, of = _total(configs, parallel)
    if not estimated:
        why = errors[0] if errors else "the measuring budget was spent"
        return f"; how long is not estimated: nothing could be measured here ({why})"
    notes = [_where(machine, parallel), _sources(configs, spent)]
    timed_here = any((c.source or "").startswith(("now", "cache")) for c in configs)
    if timed_here and _compiles(params, machine.kind):
        notes.append("compiled runs timed uncompiled")
    if (
        machine.kind == "cuda"
        and (params["executor"].get("local") or {}).get("runs_per_gpu", 1) > 1
    ):
        notes.append("runs sharing a GPU counted as if each had it alone")
    if estimated < len(pending):
        why = errors[0] if errors else _budget_text() if stopped else "no step time"
        notes.append(f"{_count(len(pending) - estimated, 'run')} not estimated: {why}")
    hint = f"; {DEMO_HINT}" if machine.kind == "cpu" and seconds > DEMO_HINT_SECONDS else ""
    return f", about {duration(seconds)} here{of} ({'; '.join(notes)}){hint}"


def _cluster_estimate(configs, parallel: int, max_parallel: int | None) -> str:
    """The Kubernetes executor's runs: only a GPU check's figures say anything of them."""
    figures = gpu_check_figures(GPU_CHECK_REPORT, None)
    for c in configs:
        _use_figure(c, figures, "cuda")
    seconds, estimated, of = _total(configs, parallel)
    if not estimated:
        return (
            "; not estimated: they run on the cluster's machines, not measured from here "
            f"(`python -m pipeline doctor --gpu-check` on a node writes {GPU_CHECK_REPORT}, "
            "which this line reads)"
        )
    at_once = "all at once" if max_parallel is None else f"{_count(parallel, 'run')} at a time"
    return (
        f", about {duration(seconds)} on the cluster{of} if its nodes are "
        f"{figures['name']} ({at_once}; step times from the gpu-check of {figures['date']}, "
        "VSGD's step for every optimizer)"
    )


def _total(configs: list[_Configuration], parallel: int) -> tuple[float, int, str]:
    """(wall seconds of the runs with a step time, how many, " for N of them" where not all)."""
    runs = [len(c.runs) for c in configs]
    timed = [s["schedule"]["iterations"] * c.seconds for c in configs if c.seconds for s in c.runs]
    of = "" if len(timed) == sum(runs) else f" for {len(timed)} of them"
    return wall_seconds(timed, parallel), len(timed), of


def gpu_check_figures(path: Path, machine: Machine | None) -> dict | None:
    """The GPU check's step times by (dataset, arch key, precision, batch size, compiled),
    with its GPU's name and date; None without a report of a GPU-size check, or (with
    `machine`) of another GPU or torch than this one's."""
    try:
        report = json.loads(Path(path).read_text())
        node, items = report["node"], {i["key"]: i for i in report["items"]}
        rows = items["configurations"].get("rows") or []
        name = node["gpus"][0]["name"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    if report.get("size") != "gpu" or not rows:
        return None
    if machine is not None and (machine.name, machine.torch) != (name, node.get("torch")):
        return None
    steps = {
        (r["dataset"], r["arch"], r["precision"], r["batch_size"], r["compiled"]): r["step_seconds"]
        for r in rows
    }
    return {"name": name, "date": str(report.get("date", "?"))[:10], "steps": steps}


def _use_figure(c: _Configuration, figures: dict | None, device: str) -> bool:
    if figures is None or device != "cuda":
        return False
    spec, training = c.spec, c.key["training"]
    compiled = training["compile"] is True or training["compile"] == "auto"
    found = figures["steps"].get(
        (spec["dataset"], spec["arch_key"], training["precision"], spec["batch_size"], compiled)
    )
    if found is not None:
        c.seconds, c.source = found, f"gpu-check {figures['date']}"
    return found is not None


def _measure(configs: list[_Configuration], machine: Machine, say) -> tuple[float, list, bool]:
    """Measure what is not known, within the budget (the module docstring), after saying so
    (`say`): (seconds spent, the errors, whether the budget stopped it)."""
    todo = sorted((c for c in configs if c.seconds is None), key=lambda c: -c.images)
    if not todo:
        return 0.0, [], False
    timed = {c.model for c in configs if c.seconds is not None}
    firsts = []  # one per model not timed yet, then the other optimizers
    for c in todo:
        if c.model not in timed | {f.model for f in firsts}:
            firsts.append(c)
    order = firsts + [c for c in todo if c not in firsts]
    say(
        "timing the training step here to estimate how long the runs take (up to "
        f"{_count(len(order), 'configuration')}, at most about {duration(MEASURING_SECONDS)}; "
        f"kept in {CACHE})"
    )
    spent, errors, loaded = 0.0, [], {}
    previous = torch.get_num_threads()
    torch.set_num_threads(machine.threads)
    try:
        for c in order:
            work = sum(k.iterations * k.seconds for k in configs if k.seconds is not None)
            if spent >= MEASURING_SECONDS or (work > 0 and spent >= MEASURING_SHARE * work):
                return spent, errors, True
            start = time.monotonic()
            try:
                c.seconds = measure_step(c.spec, machine, loaded, c.iterations)
                c.source = "now"
            except Exception as exc:  # noqa: BLE001 - a configuration not measured is said
                errors.append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            spent += time.monotonic() - start
    finally:
        torch.set_num_threads(previous)
        loaded.clear()
        gc.collect()
        if machine.kind == "cuda":
            torch.cuda.empty_cache()
    return spent, errors, False


def _from_other_optimizers(configs: list[_Configuration]) -> None:
    """A configuration without a step time takes the mean of its model's with other
    optimizers (the optimizer is a small part of a step at the protocol's batch sizes)."""
    by_model = {}
    for c in configs:
        if c.seconds is not None:
            by_model.setdefault(c.model, []).append(c.seconds)
    for c in configs:
        if c.seconds is None and c.model in by_model:
            found = by_model[c.model]
            c.seconds, c.source = sum(found) / len(found), "model"


def _cache_key(key: dict, machine: Machine) -> str:
    return json_sha256({"configuration": key, "machine": vars(machine)})


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(Path(path).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, machine: Machine, measured: dict) -> None:
    """Add `measured` to the cache (as it is on disk now: another stage may have written)."""
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    entries = _read_cache(path)
    for key, c in measured.items():
        entries[key] = {
            "configuration": c.key,
            "machine": vars(machine),
            "seconds_per_step": c.seconds,
            "date": date,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"entries": entries}, indent=1, sort_keys=True) + "\n")


def _compiles(params: dict, device: str) -> bool:
    compile_ = params["training"]["compile"]
    return compile_ is True or (compile_ == "auto" and device == "cuda")


def _where(machine: Machine, parallel: int) -> str:
    if machine.kind == "cpu":
        each = " each" if parallel > 1 else ""
        threads = f"{machine.threads} thread{'s' if machine.threads > 1 else ''}{each}"
        return f"cpu, {_count(parallel, 'run')} at a time on {threads}"
    return f"{machine.kind} ({machine.name}), {_count(parallel, 'run')} at a time"


def _sources(configs: list[_Configuration], spent: float) -> str:
    """Where the step times came from: `step times measured now (40 s) and on 2025-06-01`,
    `step times from the gpu-check of 2025-06-01`, and how many came from another optimizer."""
    sources = [c.source for c in configs if c.source]
    measured = []
    if "now" in sources:
        measured.append(f"now ({duration(spent)})")
    cached = sorted({s.split()[1] for s in sources if s.startswith("cache")})
    if cached:
        measured.append("on " + (cached[0] if len(cached) == 1 else f"{cached[0]} to {cached[-1]}"))
    said = [f"measured {' and '.join(measured)}"] if measured else []
    checked = sorted({s.split()[1] for s in sources if s.startswith("gpu-check")})
    if checked:
        said.append(f"from the gpu-check of {checked[-1]}")
    text = "step times " + ", ".join(said)
    if "model" in sources:
        text += f"; {_count(sources.count('model'), 'configuration')} timed with another optimizer"
    return text


def _budget_text() -> str:
    return f"measuring held to {MEASURING_SHARE:.0%} of the work and {duration(MEASURING_SECONDS)}"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _number(value) -> bool:
    """A hyperparameter value (a number, or a list of them such as Adam's betas)."""
    if isinstance(value, list):
        return all(map(_number, value))
    return isinstance(value, int | float) and not isinstance(value, bool)
