"""The local executor's GPUs: one GPU per run through CUDA_VISIBLE_DEVICES, never more runs
on a GPU than `executor.local.runs_per_gpu` (whichever launcher on the machine starts them, and
while a run lives past its launcher), a freed GPU handed to the next waiting run, the
parent's CUDA_VISIBLE_DEVICES honoured, `gpus: none`, the cores shared, the stage's events,
and runs that need CUDA refused before any run where they cannot have it.

No GPU is needed: the machine's GPUs are injected (`machine_gpus`, or the one function that
asks torch, monkeypatched) and the runs are a stand-in that reports what it was given."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.contract import LOG_NAME
from pipeline.executors import get_executor
from pipeline.executors.base import RunEvents
from pipeline.executors.local import LocalExecutor, cuda_visible_devices
from pipeline.gpu_places import PLACES_ENV, GpuPlaces
from vsgd.spec import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"

# Stands in for `python -m pipeline.train`: says which GPU and threads it got, keeps them and
# the time it ran (from its start to its end, inside its process's lifetime) in its directory.
FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
    start = time.monotonic()
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    print("gpu", gpu, "threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
    time.sleep(spec["fake"].get("sleep", 0))
    with open(os.path.join(spec["output_dir"], "ran.json"), "w") as f:
        json.dump({"gpu": gpu, "threads": os.environ.get("OMP_NUM_THREADS"),
                   "compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"),
                   "start": start, "end": time.monotonic()}, f)
    sys.exit(spec["fake"].get("exit", 0))
""")


@pytest.fixture(autouse=True)
def own_gpu_places(tmp_path, monkeypatch):
    """This test's GPU places: no launcher of the machine, nor another test, shares them."""
    monkeypatch.setenv(PLACES_ENV, str(tmp_path / "gpu-places"))


def make_spec(tmp_path, name, device="auto", **fake):
    return {
        "name": name,
        "run_hash": f"hash-{name}",
        "output_dir": str(tmp_path / name),
        "training": {"device": device},
        "fake": fake,
    }


def fake_command(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return [sys.executable, str(script)]


def local_executor(tmp_path, gpus, max_parallel=None, **settings):
    """A local executor on a machine with `gpus` (as CUDA_VISIBLE_DEVICES names them)."""
    return LocalExecutor(
        max_parallel,
        command=fake_command(tmp_path),
        out=io.StringIO(),
        machine_gpus=lambda: list(gpus),
        **settings,
    )


def factory_executor(tmp_path, monkeypatch, device_count, **local):
    """`get_executor` on a machine whose CUDA counts `device_count` GPUs."""
    monkeypatch.setattr("pipeline.executors.local._cuda_device_count", lambda: device_count)
    params = {
        "executor": {"kind": "local", "max_parallel": None, "local": local or None},
        "storage": {"remote": None, "endpoint_url": None},
    }
    ex = get_executor(params)
    ex.command, ex.out = fake_command(tmp_path), io.StringIO()
    return ex


def ran(tmp_path, name) -> dict:
    return json.loads((tmp_path / name / "ran.json").read_text())


def most_at_once(intervals) -> int:
    """The most of the (start, end) intervals that overlap at one moment."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = most = 0
    for _, change in edges:  # an end sorts before a start at the same moment
        now += change
        most = max(most, now)
    return most


def per_gpu(tmp_path, specs) -> dict:
    runs = [ran(tmp_path, s["name"]) for s in specs]
    by_gpu = {}
    for r in runs:
        by_gpu.setdefault(r["gpu"], []).append((r["start"], r["end"]))
    return by_gpu


def test_cuda_visible_devices_is_read_as_cuda_reads_it():
    assert cuda_visible_devices(None, 3) == ["0", "1", "2"]
    assert cuda_visible_devices("", 0) == []  # empty: no GPU at all
    assert cuda_visible_devices("3,1", 2) == ["3", "1"]
    assert cuda_visible_devices(" 2 , 0", 2) == ["2", "0"]
    # The list ends at the first entry that is not an index; "-1" is the usual way to say none.
    assert cuda_visible_devices("-1", 0) == []
    assert cuda_visible_devices("0,-1,2", 1) == ["0"]
    assert cuda_visible_devices("1,gpu,2", 1) == ["1"]
    # An index the machine does not have ends it too (CUDA's count says where).
    assert cuda_visible_devices("0,7,1", 1) == ["0"]
    # Listed twice: CUDA shows none.
    assert cuda_visible_devices("0,1,0", 0) == []
    # UUIDs, passed on as given; an index after them ends the list.
    uuids = "GPU-8f3a1b2c-0000-1111-2222-333344445555,GPU-77aa"
    assert cuda_visible_devices(uuids, 2) == uuids.split(",")
    assert cuda_visible_devices("MIG-5c1d,0", 1) == ["MIG-5c1d"]


def test_each_run_gets_one_gpu_and_its_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr("pipeline.executors.local._cpu_count", lambda: 16)
    ex = local_executor(tmp_path, ["0", "1", "2", "3"])
    specs = [make_spec(tmp_path, f"run{i}", sleep=1.5) for i in range(4)]
    assert all(o.ok for o in ex.run(specs))
    runs = {s["name"]: ran(tmp_path, s["name"]) for s in specs}
    # max_parallel null: one run per GPU, all four at once, each on a GPU of its own, each
    # with a quarter of the cores.
    assert sorted(r["gpu"] for r in runs.values()) == ["0", "1", "2", "3"]
    assert {r["threads"] for r in runs.values()} == {"4"}
    # torch.compile's workers sized to the same share (inductor would start 16 in each).
    assert {r["compile_threads"] for r in runs.values()} == {"4"}
    assert most_at_once([(r["start"], r["end"]) for r in runs.values()]) == 4
    out = ex.out.getvalue()
    for name, r in runs.items():
        assert f"[{name}] start on GPU {r['gpu']}\n" in out


def test_never_two_runs_on_one_gpu_even_with_a_larger_max_parallel(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("pipeline.executors.local._cpu_count", lambda: 8)
    ex = local_executor(tmp_path, ["0", "1"], max_parallel=5)
    specs = [make_spec(tmp_path, f"run{i}", sleep=0.8) for i in range(6)]
    ex.before_stage("train", specs)
    assert ex.max_parallel == 2  # what runs at once, and shares the cores
    assert all(o.ok for o in ex.run(specs))
    by_gpu = per_gpu(tmp_path, specs)
    assert sorted(by_gpu) == ["0", "1"]
    for intervals in by_gpu.values():
        assert most_at_once(intervals) == 1
    # Both GPUs were used side by side.
    assert most_at_once([i for intervals in by_gpu.values() for i in intervals]) == 2
    assert {ran(tmp_path, s["name"])["threads"] for s in specs} == {"4"}


def test_runs_per_gpu_packs_runs_on_a_gpu(tmp_path):
    ex = local_executor(tmp_path, ["0", "1"], runs_per_gpu=2)
    specs = [make_spec(tmp_path, f"run{i}", sleep=1.5) for i in range(4)]
    assert all(o.ok for o in ex.run(specs))
    by_gpu = per_gpu(tmp_path, specs)
    # Four places: all four at once (their sleeps overlap however slowly they start), two on
    # each GPU.
    assert {gpu: most_at_once(i) for gpu, i in by_gpu.items()} == {"0": 2, "1": 2}
    assert most_at_once([i for intervals in by_gpu.values() for i in intervals]) == 4
    # Fewer runs than places: spread over the GPUs before any GPU takes a second one.
    specs = [make_spec(tmp_path, f"pair{i}", sleep=1.0) for i in range(2)]
    assert all(o.ok for o in ex.run(specs))
    assert sorted(ran(tmp_path, s["name"])["gpu"] for s in specs) == ["0", "1"]


def test_a_freed_gpu_goes_to_the_next_waiting_run(tmp_path):
    ex = local_executor(tmp_path, ["4", "6"])
    specs = [
        make_spec(tmp_path, "long", sleep=2.0),
        make_spec(tmp_path, "short", sleep=0.1),
        make_spec(tmp_path, "next", sleep=0.1),
    ]
    assert all(o.ok for o in ex.run(specs))
    long, short, following = (ran(tmp_path, s["name"]) for s in specs)
    assert {long["gpu"], short["gpu"]} == {"4", "6"}
    # The next run took the GPU the short run freed, while the long run still held the other.
    assert following["gpu"] == short["gpu"]
    assert short["end"] <= following["start"] < long["end"]


def test_two_launchers_on_one_machine_share_its_gpu_places(tmp_path):
    """Two stages at once (two `dvc exp run`s, DVC queue workers): one place per GPU between
    them, whoever started the runs."""
    batches = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        specs = [make_spec(tmp_path / name, f"{name}{i}", sleep=0.6) for i in range(3)]
        batches[name] = (local_executor(tmp_path / name, ["0", "1"]), specs)
    outcomes = {}
    threads = [
        threading.Thread(target=lambda n=n: outcomes.update({n: batches[n][0].run(batches[n][1])}))
        for n in batches
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(o.ok for n in batches for o in outcomes[n])
    by_gpu = {}
    for name, (_, specs) in batches.items():
        for gpu, intervals in per_gpu(tmp_path / name, specs).items():
            by_gpu.setdefault(gpu, []).extend(intervals)
    assert sorted(by_gpu) == ["0", "1"] and sum(map(len, by_gpu.values())) == 6
    for intervals in by_gpu.values():
        assert most_at_once(intervals) == 1  # never two runs on one GPU, whoever started them


def for_seconds(seconds):
    """A `cancel` for `GpuPlaces.take`: true once `seconds` have passed."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def test_a_place_stays_taken_while_its_run_outlives_a_killed_launcher(tmp_path):
    """The run's process holds its place (an inherited descriptor): a launcher killed mid-run
    frees nothing the run still uses, and the place comes back when the run ends."""
    # A launcher (this module's local executor, on one GPU) killed once its run has started.
    launcher = textwrap.dedent(f"""
        import os, sys, threading, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT / "tests")!r})
        os.environ[{PLACES_ENV!r}] = {str(tmp_path / "places")!r}
        from test_gpu_assignment import local_executor, make_spec
        ex = local_executor(Path({str(tmp_path)!r}), ["0"])
        run = make_spec(Path({str(tmp_path)!r}), "run", sleep=60)
        threading.Thread(target=ex.run, args=([run],), daemon=True).start()
        while not ex._procs:
            time.sleep(0.05)
        print(next(iter(ex._procs)).pid, flush=True)
        os._exit(0)  # killed: nothing given back
    """)
    out = subprocess.run(
        [sys.executable, "-c", launcher], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    run_pid = int(out.stdout.split()[0])
    places = GpuPlaces(["0"], 1, tmp_path / "places")
    try:
        assert places.take(cancel=for_seconds(1.0)) is None  # the run holds it
    finally:
        os.kill(run_pid, signal.SIGKILL)
    place = places.take(cancel=for_seconds(10.0))  # the run ended: the place is free again
    assert place is not None and place.gpu == "0"
    places.give_back(place)


def test_a_launcher_counts_every_launchers_runs_against_its_own_runs_per_gpu(tmp_path):
    """A launcher with 2 runs per GPU holds its second place only; one with 1 run per GPU
    finds a place free, yet a run on the GPU: it waits until that run ends."""
    packed, single = GpuPlaces(["0"], 2, tmp_path), GpuPlaces(["0"], 1, tmp_path)
    first, second = packed.take(), packed.take()
    packed.give_back(first)
    assert single.take(cancel=for_seconds(0.6)) is None
    packed.give_back(second)
    place = single.take(cancel=for_seconds(5.0))
    assert place is not None and place.gpu == "0"
    assert packed.take(cancel=for_seconds(5.0)) is not None  # 1 run of its 2 on the GPU


def test_the_parents_cuda_visible_devices_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,3")
    ex = factory_executor(tmp_path, monkeypatch, device_count=2)
    specs = [make_spec(tmp_path, f"run{i}", sleep=1.0) for i in range(2)]
    assert all(o.ok for o in ex.run(specs))
    assert sorted(ran(tmp_path, s["name"])["gpu"] for s in specs) == ["3", "5"]
    # executor.local.gpus indexes what the launcher sees: [1] is the physical GPU 3.
    ex = factory_executor(tmp_path, monkeypatch, device_count=2, gpus=[1])
    specs = [make_spec(tmp_path, f"one{i}") for i in range(2)]
    assert all(o.ok for o in ex.run(specs))
    assert [ran(tmp_path, s["name"])["gpu"] for s in specs] == ["3", "3"]
    assert "[one0] start on GPU 3\n" in ex.out.getvalue()


def test_gpus_none_runs_on_the_cpu_as_before(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("pipeline.executors.local._cpu_count", lambda: 4)
    ex = factory_executor(tmp_path, monkeypatch, device_count=2, gpus="none")
    specs = [make_spec(tmp_path, "auto", sleep=0.3), make_spec(tmp_path, "cpu", "cpu", sleep=0.3)]
    assert all(o.ok for o in ex.run(specs))
    auto, cpu = ran(tmp_path, "auto"), ran(tmp_path, "cpu")
    # `auto` sees no GPU (it trains on the CPU); a cpu run's environment is left alone.
    assert auto["gpu"] == "" and cpu["gpu"] is None
    # One at a time (max_parallel null without GPUs), with every core.
    assert auto["threads"] == cpu["threads"] == "4"
    assert most_at_once([(r["start"], r["end"]) for r in (auto, cpu)]) == 1
    assert "[auto] start\n" in ex.out.getvalue()


def test_cpu_runs_never_ask_for_the_machines_gpus(tmp_path):
    def no_asking():
        raise AssertionError("the machine's GPUs were looked up for CPU runs")

    ex = LocalExecutor(None, command=fake_command(tmp_path), out=io.StringIO())
    ex.machine_gpus = no_asking
    specs = [make_spec(tmp_path, "a", "cpu"), make_spec(tmp_path, "b", "mps")]
    ex.before_stage("train", specs)
    assert all(o.ok for o in ex.run(specs))


class Recorded(RunEvents):
    def __init__(self):
        self.seen = []
        self._lock = threading.Lock()

    def run_started(self, name, where=None):
        with self._lock:
            self.seen.append(("started", name, where))

    def run_output(self, name, line):
        with self._lock:
            self.seen.append(("output", name, line))

    def run_ended(self, outcome):
        with self._lock:
            self.seen.append(("ended", outcome.name, outcome.ok, outcome.error))


def test_the_stage_hears_each_run_start_print_and_end(tmp_path):
    ex = local_executor(tmp_path, ["2"])
    ex.events = Recorded()
    specs = [make_spec(tmp_path, "good"), make_spec(tmp_path, "bad", exit=3)]
    ex.run(specs)
    for name, gpu in (("good", "2"), ("bad", "2")):
        mine = [e for e in ex.events.seen if e[1] == name]
        assert mine[0] == ("started", name, "GPU 2")
        assert ("output", name, f"gpu {gpu} threads {ex.threads_per_run()}") in mine
        assert mine[-1][0] == "ended"
    assert ("ended", "good", True, None) in ex.events.seen
    assert ("ended", "bad", False, "exit code 3") in ex.events.seen
    # On the CPU, a run starts on nothing in particular.
    ex = local_executor(tmp_path, [])
    ex.events = Recorded()
    ex.run([make_spec(tmp_path, "cpu", "cpu")])
    assert ex.events.seen[0] == ("started", "cpu", None)


def test_a_run_waiting_for_a_gpu_when_the_stage_stops_is_not_started(tmp_path):
    ex = local_executor(tmp_path, ["0"], max_parallel=2)
    ex.events = Recorded()
    # One GPU for two runs: whichever takes it first runs, the other waits for it.
    specs = [make_spec(tmp_path, name, sleep=30) for name in ("one", "two")]
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            ex.run(specs)
    finally:
        timer.cancel()
    [started] = [e[1] for e in ex.events.seen if e[0] == "started"]
    [waiting] = {"one", "two"} - {started}
    ended = {e[1]: e for e in ex.events.seen if e[0] == "ended"}
    assert ended[waiting] == ("ended", waiting, False, "not started")
    assert ended[started][2] is False  # stopped by the executor's SIGTERM
    assert not (tmp_path / waiting / LOG_NAME).exists()


def test_runs_that_need_cuda_are_refused_before_any_run(tmp_path, monkeypatch):
    specs = [make_spec(tmp_path, "a", "cuda"), make_spec(tmp_path, "b", "cuda")]
    # No GPU on this machine: the whole stage is refused, every problem at once.
    ex = factory_executor(tmp_path, monkeypatch, device_count=0)
    with pytest.raises(ConfigError) as refused:
        ex.before_stage("train", specs + [make_spec(tmp_path, "c", "cuda:1")])
    assert refused.value.problems == [
        "training.device: 'cuda' (2 runs, e.g. a) needs a CUDA GPU, but no CUDA GPU is "
        "visible here; allowed here: auto (CUDA where there is a GPU, else the CPU), cpu",
        "training.device: 'cuda:1' (1 run, e.g. c) needs a CUDA GPU, but no CUDA GPU is "
        "visible here; allowed here: auto (CUDA where there is a GPU, else the CPU), cpu",
    ]
    # `run` without the stage's check refuses the same, before any process.
    with pytest.raises(ConfigError):
        ex.run(specs)
    assert not any((tmp_path / name).exists() for name in ("a", "b"))
    # GPUs, but none for the executor.
    ex = factory_executor(tmp_path, monkeypatch, device_count=2, gpus="none")
    with pytest.raises(ConfigError, match="needs a CUDA GPU, but executor.local.gpus is none"):
        ex.before_stage("train", specs)
    # GPUs listed that this machine does not have: found before any run.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    ex = factory_executor(tmp_path, monkeypatch, device_count=2, gpus=[1, 2, 5])
    with pytest.raises(ConfigError) as refused:
        ex.before_stage("train", [make_spec(tmp_path, "a")])
    assert refused.value.problems == [
        f"executor.local.gpus[{n}]: {i} is not a GPU here; the GPU indices here are 0 to 1 "
        "(CUDA_VISIBLE_DEVICES='0,1')"
        for n, i in ((1, 2), (2, 5))
    ]
    # cuda:N asks for a GPU the run will not see under that number: each run sees its one
    # GPU as cuda:0.
    ex = factory_executor(tmp_path, monkeypatch, device_count=2)
    with pytest.raises(ConfigError, match=r"'cuda:1' \(1 run, e.g. c\): the local executor gives"):
        ex.before_stage("train", [make_spec(tmp_path, "c", "cuda:1")])
    ex.before_stage("train", specs + [make_spec(tmp_path, "z", "cuda:0")])
    assert ex.max_parallel == 2


def test_the_new_keys_are_validated_with_their_key_paths():
    def problems_of(*overrides):
        with pytest.raises(ConfigError) as refused:
            load_params(PARAMS, overrides, build_imported=False)
        return refused.value.problems

    assert problems_of("executor.local.gpus=[0, -1, 0.5, true]") == [
        "executor.local.gpus[1]: -1 must be >= 0",
        "executor.local.gpus[2]: expected an integer, got 0.5",
        "executor.local.gpus[3]: expected an integer, got True",
    ]
    assert problems_of("executor.local.gpus=[1, 1]") == [
        "executor.local.gpus: duplicates in [1, 1]; list each GPU once"
    ]
    allowed = "allowed: all, none, or a list of GPU indices, e.g. [0, 2]"
    assert problems_of("executor.local.gpus=some") == [
        f"executor.local.gpus: 'some' is not allowed; {allowed}"
    ]
    assert problems_of("executor.local.gpus=[]") == [
        f"executor.local.gpus: [] is not allowed; {allowed}"
    ]
    assert problems_of("executor.local.runs_per_gpu=0", "executor.local.gpu=1") == [
        "executor.local.gpu: unknown key (did you mean 'gpus'?); allowed: gpus, runs_per_gpu",
        "executor.local.runs_per_gpu: 0 must be >= 1",
    ]
    assert problems_of("executor.local=4") == ["executor.local: expected a mapping, got int"]
    # The shipped defaults, and a section left out or null.
    assert load_params(PARAMS)["executor"]["local"] == {"gpus": "all", "runs_per_gpu": 1}
    load_params(PARAMS, ["executor.local=null"])
    load_params(PARAMS, ["executor.local={gpus: [3, 0], runs_per_gpu: 2}"])


def test_validate_does_not_import_torch():
    """The GPUs are looked up by the executor, on the machine that runs the stage."""
    import subprocess

    code = "import sys; from pipeline import validate, executors; print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout.strip() == "False"


# What the child reports on a real GPU: how many devices CUDA shows it, and which one `cuda` is.
CUDA_CHILD = textwrap.dedent("""
    import json, os, sys, torch
    spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
    print("sees", torch.cuda.device_count(), "uuid", torch.cuda.get_device_properties(0).uuid,
          flush=True)
""")


@pytest.mark.gpu
def test_on_a_real_gpu_each_run_sees_exactly_its_gpu(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    count = torch.cuda.device_count()
    params = {
        "executor": {"kind": "local", "max_parallel": None},
        "storage": {"remote": None, "endpoint_url": None},
    }
    ex = get_executor(params)  # the machine's own GPUs, through torch
    script = tmp_path / "cuda_child.py"
    script.write_text(CUDA_CHILD)
    ex.command, ex.out = [sys.executable, str(script)], io.StringIO()
    specs = [make_spec(tmp_path, f"run{i}", "cuda") for i in range(count)]
    ex.before_stage("train", specs)
    assert ex.max_parallel == count
    assert all(o.ok for o in ex.run(specs)), ex.out.getvalue()
    out = ex.out.getvalue()
    uuids = {str(torch.cuda.get_device_properties(i).uuid) for i in range(count)}
    seen = {line.split(" uuid ")[1] for line in out.splitlines() if " sees 1 uuid " in line}
    assert seen == uuids, out  # one GPU each, every GPU used once
