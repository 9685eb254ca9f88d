"""Shared fixtures: small prepared synthetic datasets, run specs for them, an MLflow server,
the test Kubernetes API server and a stand-in for the results store."""

import copy
import os
from pathlib import Path

import pytest

from vsgd.outputs import DIGESTS

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_SIZES = {"train": 256, "test": 64}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """`<root>/prepared/{cifar100,tinyimagenet}` from the synthetic source, 256 train and
    64 test images each (prepared once per session)."""
    from vsgd.data import prepare

    root = tmp_path_factory.mktemp("data")
    for dataset in ("cifar100", "tinyimagenet"):
        prepare(dataset, "synthetic", root, synthetic_sizes=SYNTHETIC_SIZES)
    return root


def _pip(*args):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory):
    """(source tree, wheel): a snapshot of what the Docker build context holds of the code
    (pyproject.toml, README.md, the shipped packages; so no stale `build/` in the checkout
    and no edit made to it while the tests run leaks in) and the project's wheel built from
    it without build isolation (seconds, no index). Built once per session for
    tests/test_packaging.py and tests/test_image.py."""
    import shutil

    from pipeline import image

    src = tmp_path_factory.mktemp("build") / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in image.PACKAGES:
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src))
    [wheel] = out.glob("vsgd_repro-*.whl")
    return src, wheel


@pytest.fixture(scope="session")
def installed_project(project_wheel, tmp_path_factory):
    """`project_wheel`'s wheel installed non-editable into a directory of its own (to put
    on PYTHONPATH), as in the image; once per session."""
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(project_wheel[1]))
    return target


@pytest.fixture
def place_prepared(data_root):
    """`place_prepared(root, *datasets)` (default: both) copies the session's prepared
    datasets (`data_root`) to `<root>/prepared/<dataset>`: what `python -m pipeline prepare
    <dataset>` writes under a workspace's `data.root` with the ci preset (synthetic data of
    the same sizes: the same files, the same checksum), without a prepare process per
    test."""
    import shutil

    import yaml

    ci = yaml.safe_load((ROOT / "params.yaml").read_text())["presets"]["ci"]["data"]
    assert ci == {"source": "synthetic", "synthetic_sizes": SYNTHETIC_SIZES}, (
        f"the ci preset's data is not data_root's: {ci}"
    )

    def place(root, *datasets):
        for dataset in datasets or ("cifar100", "tinyimagenet"):
            shutil.copytree(
                Path(data_root) / "prepared" / dataset, Path(root) / "prepared" / dataset
            )

    return place


def run_spec(
    data_root,
    out,
    *,
    dataset="cifar100",
    arch="convmixer_256_8",
    optimizer=None,
    iterations=4,
    batch_size=8,
    seed=0,
    tracking_uri=None,
    **training,
) -> dict:
    """A complete, valid run spec on the prepared synthetic data, writing under `out`.
    Tracking is off unless `tracking_uri` is given; `training` overrides training keys."""
    import json

    from vsgd.spec import run_hash

    data_dir = Path(data_root) / "prepared" / dataset
    manifest = json.loads((data_dir / "manifest.json").read_text())
    spec = {
        "dataset": dataset,
        "arch_key": {
            "vgg16": "vgg",
            "vgg19": "vgg",
            "convmixer_256_8": "convmixer",
            "resnext18": "resnext",
        }[arch],
        "arch": arch,
        "data": {
            "dir": str(data_dir),
            "checksum": manifest["checksum"],
            "source": "synthetic",
            "uri": None,
        },
        "optimizer": copy.deepcopy(optimizer)
        or {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
        "schedule": {"iterations": iterations, "step_size": max(1, iterations // 2), "gamma": 0.5},
        "batch_size": batch_size,
        "seed": seed,
        "training": {
            "eval_every": iterations,
            "checkpoint_every": iterations,
            "log_every": 1,
            "validation_size": 0,
            "precision": "fp32",
            "compile": False,
            "channels_last": "auto",
            "device": "cpu",
            "eval_batch_size": 32,
            "test_limit": 16,
            "beta1_every": 2,
            **training,
        },
        "tracking": {"uri": tracking_uri, "experiment": "test"},
    }
    spec["run_hash"] = run_hash(spec)
    spec["name"] = f"{dataset}-{arch}-{spec['optimizer']['name']}-s{seed}-{spec['run_hash'][:8]}"
    spec["output_dir"] = str(Path(out) / "runs" / spec["name"])
    spec["checkpoint"] = str(Path(out) / "checkpoints" / spec["run_hash"])
    return spec


def untimed(metrics: dict) -> dict:
    """A run's metrics without what differs between two runs of one spec (wall-clock figures,
    the MLflow run, and so the digests of the files): everything else must be equal."""
    return {
        k: v
        for k, v in metrics.items()
        if k not in ("seconds_per_iter", "images_per_sec", "mlflow_run_id", DIGESTS)
    }


def crash_at(step: int):
    """A `progress` callback that raises RuntimeError("boom") at `step`: a run that dies
    mid-training, after its last checkpoint."""

    def progress(at, total, info):
        if at == step:
            raise RuntimeError("boom")

    return progress


def fake_prepared(root) -> None:
    """`<root>/prepared/<dataset>/manifest.json` with a made-up checksum per dataset: enough
    for building specs (their hashes read the checksum), not for training."""
    import json

    for ds in ("cifar100", "tinyimagenet"):
        d = Path(root) / "prepared" / ds
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"checksum": f"sum-{ds}"}))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts served through it);
    yields its http:// URI."""
    from pipeline import services

    service, proc = services.start_mlflow(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield service.url
    finally:
        services.stop(service, proc)


# How much faster than real time the `kube` fixture's clock runs: the test API server's, the
# executor's under test (given `kube.clock`) and the tests' own waits (`kube.clock.sleep`).
KUBE_SPEED = 10


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "real_time: the `kube` fixture keeps real time (its "
        "executor runs in a subprocess, or real waits are what "
        "the test is about)",
    )


@pytest.fixture
def kube(tmp_path, monkeypatch, request):
    """The test API server (tests/fake_k8s/) with a kubeconfig pointing at it in
    KUBECONFIG, as a user's would; cwd is tmp_path (specs' output_dirs are relative). Its
    `clock` runs KUBE_SPEED times faster than real time, unless the test is marked
    `real_time`."""
    import yaml
    from fake_k8s import REAL_TIME, FakeKube, ScaledClock

    real = request.node.get_closest_marker("real_time") is not None
    fake = FakeKube(clock=REAL_TIME if real else ScaledClock(KUBE_SPEED))
    url = fake.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(fake.kubeconfig(url)))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.chdir(tmp_path)  # specs' output_dirs are relative: results land here
    yield fake
    fake.stop()


@pytest.fixture
def store(tmp_path):
    """A local stand-in for `<storage.remote>/results/<run_hash>/`, filled the way a pod
    uploads its results (`publish(spec)`; `damage(directory)` spoils what it wrote);
    `fetch` copies them into a directory as the storage layer's fetch_result does."""
    import shutil

    root = tmp_path / "store"

    def publish(spec, test_acc=0.5, damage=None):
        where = root / "results" / spec["run_hash"]
        write_result(where, spec, test_acc=test_acc)
        if damage:
            damage(where)

    def fetch(params, spec, directory):
        src = root / "results" / spec["run_hash"]
        if not (src / "metrics.json").exists():
            raise FileNotFoundError(f"no result for {spec['run_hash']} in the store")
        shutil.copytree(src, directory, dirs_exist_ok=True)

    publish.fetch = fetch
    return publish


def pytest_collection_modifyitems(config, items):
    """`extended` tests run only with VSGD_EXTENDED=1: the default suite must stay within
    CI's time on 2 cores, and these scenarios repeat paths smaller tests cover."""
    if os.environ.get("VSGD_EXTENDED") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in: VSGD_EXTENDED=1 (the longest end-to-end scenarios)")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


def write_result(
    directory,
    spec: dict | None = None,
    *,
    test_acc=0.5,
    val_acc=None,
    diverged=None,
    beta1=None,
    curve_steps=None,
    **settings,
) -> dict:
    """A complete, well-formed finished result in `directory`, as the trainer writes one
    (`vsgd.outputs.check_result` finds nothing wrong with it): config.json (`spec`, or one
    built from `settings`: name, dataset, arch, arch_key, optimizer, lr, seed, iterations),
    curve.csv at `curve_steps` (default: half way and the end), rising linearly to
    `test_acc`, beta1.csv for VSGD (`beta1` rows, else one at the end), metrics.json last.
    `diverged` ({step, stopped_at}) makes it a diverged run whose last finite evaluation had
    `test_acc`; written by the trainer's own `write_outputs` (with its digests). Returns the
    metrics."""
    from vsgd.outputs import BETA1_COLUMNS, write_outputs
    from vsgd.spec import run_hash

    if spec is None:
        spec = _result_spec(**settings)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    iterations = spec["schedule"]["iterations"]
    lr = spec["optimizer"]["lr"]
    eval_test = spec.get("training", {}).get("eval_test", True)
    steps_done = diverged["stopped_at"] if diverged else iterations
    last_step = (diverged["step"] - 1) if diverged else iterations
    steps = curve_steps or (sorted({max(0, last_step // 2), last_step}) if last_step > 0 else [])
    curve = [
        {
            "step": s,
            "test_acc": (test_acc if s == last_step else test_acc * s / last_step)
            if eval_test
            else None,
            "test_loss": 1.0 if eval_test else None,
            "val_acc": val_acc,
            "train_loss": 0.5,
            "train_acc": 0.9,
            "lr": lr,
        }
        for s in steps
    ]
    rows = None
    if spec["optimizer"]["name"] == "vsgd":
        rows = [[steps_done, 0.6, 0.3, 0.5, 0.6, 0.7, 0.8]] if beta1 is None else beta1
        rows = [dict(zip(BETA1_COLUMNS, r)) for r in rows]
    assert run_hash(spec) == spec["run_hash"]
    last = curve[-1] if curve else {}
    metrics = {
        "name": spec["name"],
        "run_hash": spec["run_hash"],
        "dataset": spec["dataset"],
        "arch": spec["arch"],
        "arch_key": spec["arch_key"],
        "optimizer": spec["optimizer"]["name"],
        "lr": lr,
        "seed": spec["seed"],
        "iterations": iterations,
        "steps_done": steps_done,
        "diverged": diverged,
        **{k: last.get(k) for k in ("test_acc", "test_loss", "train_loss", "train_acc", "val_acc")},
        "seconds_per_iter": settings.get("seconds_per_iter", 0.25),
        "images_per_sec": 1024.0,
        "device": "cpu",
        "device_name": "Test CPU",
        "mlflow_run_id": None,
    }
    return write_outputs(directory, spec, metrics, curve, rows)


def reseal(directory) -> None:
    """Record a result's files as they are now, as if the trainer had written them so: for
    tests that plant a file of their own into a whole result."""
    import json

    from vsgd.files import file_digest
    from vsgd.outputs import BETA1, CURVE, METRICS, SPEC, sealed

    directory = Path(directory)
    metrics = json.loads((directory / METRICS).read_text())
    metrics.pop(DIGESTS, None)
    files = [n for n in (CURVE, SPEC, BETA1) if (directory / n).is_file()]
    metrics = sealed(metrics, {n: file_digest(directory / n) for n in files})
    (directory / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


def _result_spec(
    *,
    name,
    dataset="cifar100",
    arch="vgg16",
    arch_key="vgg",
    optimizer="sgd",
    lr=0.1,
    seed=0,
    iterations=30000,
    **_ignored,
) -> dict:
    from vsgd.spec import run_hash

    spec = {
        "name": name,
        "dataset": dataset,
        "arch_key": arch_key,
        "arch": arch,
        "data": {
            "dir": f"data/prepared/{dataset}",
            "checksum": f"sum-{dataset}",
            "source": "synthetic",
            "uri": None,
        },
        "optimizer": {"name": optimizer, "lr": float(lr)},
        "schedule": {"iterations": iterations, "step_size": max(1, iterations // 3), "gamma": 0.5},
        "batch_size": 8,
        "seed": seed,
        "training": {},
        "output_dir": f"out/{name}",
    }
    spec["run_hash"] = run_hash(spec)
    return spec


# The end of a stand-in for `python -m pipeline.train` (a script that has its run's `spec`):
# the run's whole result, as a run leaves it.
STAND_IN_RESULT = f"""
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from conftest import write_result
write_result(spec["output_dir"], spec)
"""


def stage_runs_stand_in(monkeypatch, script: Path) -> None:
    """The stages' local executor starts `python <script> --spec <file>` for each run, a
    stand-in for `python -m pipeline.train`; the rest of the executor is the real one."""
    import sys

    from pipeline import execute, executors

    def local_executor(params):
        ex = executors.get_executor(params)
        ex.command = [sys.executable, str(script)]
        return ex

    monkeypatch.setattr(execute, "get_executor", local_executor)
