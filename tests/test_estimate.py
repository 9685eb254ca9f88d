"""The line a stage says before its runs start: how long the pending runs take here, from
measured (or cached, or GPU-checked) step times, the runs in parallel, and the demo preset
named where a CPU would take hours."""

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import STAND_IN_RESULT, fake_prepared, stage_runs_stand_in

from pipeline import estimate, execute, grid
from pipeline.config import load_params
from pipeline.doctor import command as doctor_command
from pipeline.doctor import gpu_check

ROOT = Path(__file__).resolve().parents[1]
CPU = estimate.Machine("cpu", "Test CPU", "2.99.0", cpus=4, threads=2)
H100 = estimate.Machine("cuda:0", "NVIDIA H100 80GB HBM3", "2.99.0", cpus=16, threads=16)
# Seconds per step by optimizer: what the stand-in measurement says.
SECONDS = {"sgd": 0.6, "adam": 0.3}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project directory with fake prepared datasets (specs, no training)."""
    monkeypatch.chdir(tmp_path)
    fake_prepared(tmp_path / "data")
    return tmp_path


def params_and_specs(*extra, iterations=1000):
    params = load_params(
        ROOT / "params.yaml",
        [
            "preset=ci",
            "data.root=data",
            "datasets=[cifar100]",
            "archs=[vgg]",
            "optimizers=[sgd, adam]",
            "seeds=[0, 1]",
            "tune.enabled=false",
            "tracking.uri=null",
            f"protocol.cifar100.schedule={{iterations: {iterations}, step_size: 500, gamma: 0.5}}",
            *extra,
        ],
    )
    return params, grid.expand(params)


class Measured:
    """Stands in for `estimate.measure_step`: SECONDS by optimizer, every call counted, the
    threads it ran with recorded."""

    def __init__(self, seconds=SECONDS):
        self.seconds, self.calls, self.threads = seconds, [], []

    def __call__(self, spec, machine, loaded, iterations):
        self.calls.append(spec["optimizer"]["name"])
        self.threads.append(torch.get_num_threads())
        return self.seconds[spec["optimizer"]["name"]]


@pytest.fixture
def measured(monkeypatch):
    found = Measured()
    monkeypatch.setattr(estimate, "measure_step", found)
    return found


def on(monkeypatch, machine):
    monkeypatch.setattr(estimate, "machine_facts", lambda params, max_parallel: machine)


def test_the_arithmetic_with_injected_step_times(workdir, monkeypatch, measured):
    on(monkeypatch, CPU)
    params, specs = params_and_specs()
    # Two runs of each optimizer, 1000 iterations: 600 s per SGD run, 300 s per Adam run.
    assert estimate.wall_seconds([600.0, 600.0, 300.0, 300.0], 1) == 1800.0
    assert estimate.wall_seconds([600.0, 600.0, 300.0, 300.0], 2) == 900.0
    # Never less than the longest run.
    assert estimate.wall_seconds([600.0, 600.0, 300.0, 300.0], 4) == 600.0
    assert estimate.stage_line(params, specs, "train", 1) == (
        "train: 4 runs to run, about 30 min here (cpu, 1 run at a time on 2 threads; step "
        "times measured now (0 s))"
    )
    assert sorted(measured.calls) == ["adam", "sgd"]  # one per configuration, not per run
    assert estimate.stage_line(params, specs, "train", 2).startswith(
        "train: 4 runs to run, about 15 min here (cpu, 2 runs at a time on 2 threads each;"
    )
    assert [estimate.duration(s) for s in (40, 720, 5 * 3600 + 720, 3 * 86400 + 4 * 3600)] == [
        "40 s",
        "12 min",
        "5 h 12 min",
        "3 d 4 h",
    ]


def test_measuring_runs_on_the_threads_each_run_gets_and_restores_them(
    workdir, monkeypatch, measured
):
    params, specs = params_and_specs()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    machine = estimate.machine_facts(params, 2)
    assert machine.device == "cpu" and machine.threads == max(1, machine.cpus // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the local executor leaves a given one
    assert estimate.machine_facts(params, 2).threads == 3
    before = torch.get_num_threads()
    on(monkeypatch, estimate.Machine("cpu", "Test CPU", "2.99.0", cpus=8, threads=1))
    estimate.stage_line(params, specs, "train", 8)
    assert measured.threads == [1, 1] and torch.get_num_threads() == before


@pytest.mark.parametrize(
    "machine,iterations,hint",
    [(CPU, 20_000, True), (CPU, 1000, False), (H100, 20_000, False)],
    ids=["cpu, 10 h", "cpu, 30 min", "gpu, 10 h"],
)
def test_the_demo_preset_is_named_above_the_threshold_on_a_cpu(
    workdir, monkeypatch, measured, machine, iterations, hint
):
    on(monkeypatch, machine)
    params, specs = params_and_specs(iterations=iterations)
    line = estimate.stage_line(params, specs, "train", 1)
    assert ("10 h 0 min" if iterations == 20_000 else "30 min") in line
    assert line.endswith("; for a first look in minutes: dvc exp run -S preset=demo") == hint


def test_a_second_stage_reuses_the_measured_step_times(workdir, monkeypatch, measured):
    on(monkeypatch, CPU)
    params, specs = params_and_specs()
    first = estimate.stage_line(params, specs, "tune", 1)
    assert len(measured.calls) == 2 and "measured now" in first
    again = estimate.stage_line(params, specs, "train", 1)
    assert len(measured.calls) == 2  # nothing measured again
    assert re.search(r"about 30 min here .*; step times measured on \d{4}-\d\d-\d\d\)$", again)
    cache = json.loads(Path("results/step_times.json").read_text())["entries"]
    assert {e["machine"]["name"] for e in cache.values()} == {"Test CPU"}
    assert sorted(e["seconds_per_step"] for e in cache.values()) == [0.3, 0.6]


@pytest.mark.parametrize("change", ["torch", "name", "threads"])
def test_another_device_torch_or_thread_count_measures_again(
    workdir, monkeypatch, measured, change
):
    on(monkeypatch, CPU)
    params, specs = params_and_specs()
    estimate.stage_line(params, specs, "train", 1)
    other = {"torch": "3.0.0", "name": "Another CPU", "threads": 1}[change]
    on(monkeypatch, estimate.Machine(**{**vars(CPU), change: other}))
    estimate.stage_line(params, specs, "train", 1)
    assert len(measured.calls) == 4
    # Both machines' entries are kept: going back measures nothing.
    on(monkeypatch, CPU)
    estimate.stage_line(params, specs, "train", 1)
    assert len(measured.calls) == 4


def gpu_check_report(name="NVIDIA H100 80GB HBM3", torch_version="2.99.0", size="gpu"):
    """What `python -m pipeline doctor --gpu-check` writes, as far as the estimate reads it."""
    row = {
        "dataset": "cifar100",
        "arch": "vgg",
        "model": "vgg16",
        "optimizer": "vsgd",
        "batch_size": 4,
        "precision": "fp32",
        "compiled": False,
        "channels_last": True,
        "step_seconds": 0.05,
        "images_per_sec": 80.0,
    }
    return {
        "date": "2025-06-01T10:00:00+00:00",
        "size": size,
        "node": {"gpus": [{"name": name}], "torch": torch_version},
        "items": [{"key": "tests"}, {"key": "configurations", "rows": [row]}],
    }


def write_gpu_check(report):
    path = estimate.GPU_CHECK_REPORT
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(report))


def test_the_gpu_checks_figures_are_used_when_they_are_of_this_gpu(workdir, monkeypatch, measured):
    on(monkeypatch, H100)
    # The ci preset compiles nothing; 1000 iterations x 0.05 s per run, 4 runs on 2 GPUs.
    params, specs = params_and_specs()
    write_gpu_check(gpu_check_report())
    line = estimate.stage_line(params, specs, "train", 2)
    assert measured.calls == []
    assert line == (
        "train: 4 runs to run, about 2 min here (cuda (NVIDIA H100 80GB HBM3), 2 runs at a "
        "time; step times from the gpu-check of 2025-06-01)"
    )


@pytest.mark.parametrize(
    "report",
    [
        gpu_check_report(name="NVIDIA A100-SXM4-40GB"),
        gpu_check_report(torch_version="2.0.0"),
        gpu_check_report(size="cpu"),
    ],
    ids=["another GPU", "another torch", "a CPU-size check"],
)
def test_a_gpu_check_of_another_gpu_or_torch_is_not_used(workdir, monkeypatch, measured, report):
    on(monkeypatch, H100)
    params, specs = params_and_specs()
    write_gpu_check(report)
    line = estimate.stage_line(params, specs, "train", 2)
    assert len(measured.calls) == 2 and "gpu-check" not in line


def test_the_gpu_check_report_is_read_where_the_doctor_writes_it():
    assert estimate.GPU_CHECK_REPORT == doctor_command.OUT / gpu_check.JSON_NAME


def test_kubernetes_runs_are_not_measured_here(workdir, monkeypatch, measured):
    params, specs = params_and_specs()
    params = {**params, "executor": {**params["executor"], "kind": "kubernetes"}}
    line = estimate.stage_line(params, specs, "train", None)
    assert measured.calls == []
    assert line.startswith(
        "train: 4 runs to run; not estimated: they run on the cluster's machines, not "
        "measured from here (`python -m pipeline doctor --gpu-check` on a node"
    )
    write_gpu_check(gpu_check_report(name="NVIDIA A100-SXM4-40GB"))
    # All at once (no limit of the executor's own): the longest run, 1000 x 0.05 s.
    assert estimate.stage_line(params, specs, "train", None) == (
        "train: 4 runs to run, about 50 s on the cluster if its nodes are "
        "NVIDIA A100-SXM4-40GB (all at once; step times from the gpu-check of 2025-06-01, "
        "VSGD's step for every optimizer)"
    )


class Clock:
    """Stands in for the `time` module in pipeline.estimate: only `advance` moves it."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_measuring_stops_at_its_time_limit_one_model_first(workdir, monkeypatch):
    on(monkeypatch, CPU)
    clock = Clock()
    monkeypatch.setattr(estimate, "time", clock)
    calls = []

    def slow(spec, machine, loaded, iterations):  # each measurement takes 50 s
        calls.append((spec["arch"], spec["optimizer"]["name"]))
        clock.advance(50.0)
        return 1.0

    monkeypatch.setattr(estimate, "measure_step", slow)
    params, specs = params_and_specs("archs=[vgg, convmixer, resnext]", iterations=100_000)
    line = estimate.stage_line(params, specs, "train", 1)
    # 120 s: three measurements, one per model before any second optimizer.
    assert sorted(a for a, _ in calls) == ["convmixer_256_8", "resnext18", "vgg16"]
    assert "step times measured now (3 min); 3 configurations timed with another optimizer" in (
        line
    )
    assert "not estimated" not in line and "12 runs to run, about 13 d 21 h here" in line


def test_measuring_costs_a_small_share_of_the_work_it_estimates(workdir, monkeypatch):
    on(monkeypatch, CPU)
    clock = Clock()
    monkeypatch.setattr(estimate, "time", clock)

    def measure(spec, machine, loaded, iterations):  # 1 s to measure a 0.01 s step
        clock.advance(1.0)
        return 0.01

    monkeypatch.setattr(estimate, "measure_step", measure)
    params, specs = params_and_specs("archs=[vgg, convmixer]", iterations=100)
    line = estimate.stage_line(params, specs, "train", 1)
    # 2 runs x 100 x 0.01 s = 2 s of work measured (and 2 more from the other optimizer):
    # 1 s of measuring is far past 2 % of it, so the other model is left out.
    assert line == (
        "train: 8 runs to run, about 4 s here for 4 of them (cpu, 1 run at a time on 2 "
        "threads; step times measured now (1 s); 1 configuration timed with another "
        "optimizer; 4 runs not estimated: measuring held to 2% of the work and 2 min)"
    )


def test_without_anything_measurable_the_line_says_why(workdir):
    params, specs = params_and_specs()
    line = estimate.stage_line(params, specs, "train", 1)  # fake data: manifests only
    assert line.startswith(
        "train: 4 runs to run; how long is not estimated: nothing could be measured here "
        "(DataError: "
    ), line
    assert not Path(estimate.CACHE).exists()


# -- through the stage: the real measurement, the local executor ----------------------------------

FAKE_TRAIN = (
    textwrap.dedent("""
    import json, sys
    spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
    print("trained", spec["name"], flush=True)
""")
    + STAND_IN_RESULT
)


def test_the_stage_says_how_long_before_its_runs_start(
    tmp_path, monkeypatch, capsys, place_prepared
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    place_prepared(tmp_path / "data", "cifar100")
    params = load_params(
        ROOT / "params.yaml",
        [
            "preset=ci",
            "data.root=data",
            "datasets=[cifar100]",
            "archs=[convmixer]",
            "optimizers=[sgd]",
            "tune.enabled=false",
            "tracking.uri=null",
            "executor.max_parallel=1",
        ],
    )
    specs = grid.expand(params)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    stage_runs_stand_in(monkeypatch, script)
    execute.run_stage(params, specs, "train")
    lines = capsys.readouterr().out.splitlines()
    survey = lines.index("train: 1 runs in the grid, 0 done, 0 reused, 1 to run")
    [said] = [i for i, x in enumerate(lines) if x.startswith("train: 1 run to run")]
    ran = next(i for i, x in enumerate(lines) if "trained" in x)
    assert survey < said < ran
    assert re.fullmatch(
        r"train: 1 run to run, about \d+ s here \(cpu, 1 run at a time on \d+ threads?; "
        r"step times measured now \(\d+ s\)\)",
        lines[said],
    )
    [entry] = json.loads(Path("results/step_times.json").read_text())["entries"].values()
    assert entry["configuration"]["model"] == "convmixer_256_8" and entry["seconds_per_step"] > 0


def test_a_configuration_gets_its_steps_and_a_tiny_stage_one(tmp_path, monkeypatch, place_prepared):
    """Two warm-up and three timed steps of the real training step; one where measuring
    more would cost more than its share of the runs' work."""
    from vsgd import engine

    monkeypatch.chdir(tmp_path)
    place_prepared(tmp_path / "data", "cifar100")
    _, specs = params_and_specs("archs=[convmixer]", "optimizers=[sgd]", "seeds=[0]")
    steps, real_step = [], engine.train_step

    def counted(run, state):
        steps.append(run.batch_size)
        return real_step(run, state)

    monkeypatch.setattr(engine, "train_step", counted)
    monkeypatch.setattr(estimate, "CONFIGURATION_SECONDS", 1000.0)  # not this test's bound
    machine = estimate.Machine("cpu", "Test CPU", torch.__version__, cpus=1, threads=1)
    assert estimate.measure_step(specs[0], machine, {}, iterations=10**9) > 0
    assert steps == [4] * 5
    del steps[:]
    assert estimate.measure_step(specs[0], machine, {}, iterations=1) > 0
    assert steps == [4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_runs_gpu_is_measured_and_its_memory_given_back(
    tmp_path, monkeypatch, place_prepared
):
    monkeypatch.chdir(tmp_path)
    place_prepared(tmp_path / "data", "cifar100")
    params, specs = params_and_specs("archs=[convmixer]", "optimizers=[sgd]", "seeds=[0]")
    before = torch.cuda.memory_allocated()
    machine = estimate.machine_facts(params, 1)
    assert machine.device == f"cuda:{torch.cuda.current_device()}"
    assert machine.name == torch.cuda.get_device_name()
    line = estimate.stage_line(params, specs, "train", 1)
    assert re.fullmatch(
        rf"train: 1 run to run, about \d+ s here \(cuda \({re.escape(machine.name)}\), 1 run at "
        r"a time; step times measured now \(\d+ s\)\)",
        line,
    )
    assert torch.cuda.memory_allocated() == before
