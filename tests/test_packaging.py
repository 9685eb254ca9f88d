"""Packaging: `pip install .` is the light optimizer library (torch + numpy), the pipeline's
stack comes with the `pipeline` extra, an installed (non-editable) package finds its data
files (the Kubernetes Job template, the published reference numbers), and requirements.lock
pins exactly what `.[pipeline,bench,dev]` installs.

The wheel is built once per session (tests/conftest.py, `project_wheel`, shared with
tests/test_image.py) from a copy of what the Docker build context holds (pyproject.toml,
README.md, vsgd/, pipeline/), so no stale `build/` in the checkout can leak into it.
"""

import email
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "vsgd-repro"
EXTRAS = {"pipeline", "bench", "dev", "optimizers"}
PIPELINE_STACK = ("mlflow", "dvc", "boto3", "kubernetes", "scipy")
# Everything the pipeline extra brings: the library must import without any of it.
NOT_FOR_THE_LIBRARY = (
    "yaml",
    "mlflow",
    "dvc",
    "boto3",
    "botocore",
    "kubernetes",
    "matplotlib",
    "scipy",
    "tqdm",
    "PIL",
    "torchvision",
)


@pytest.fixture(scope="module")
def wheel(project_wheel):
    """The project's wheel (tests/conftest.py: built once per session, from a snapshot)."""
    return project_wheel[1]


def metadata(wheel_path):
    with zipfile.ZipFile(wheel_path) as zf:
        [name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(zf.read(name))


def requires(meta):
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def extras_of(req, extras):
    """The extras among `extras` for which `req` applies (a marker-less one: all of them)."""
    if req.marker is None:
        return set(extras)
    return {e for e in extras if req.marker.evaluate({"extra": e})}


def test_wheel_requires_only_torch_numpy_and_filelock(wheel):
    meta = metadata(wheel)
    reqs = requires(meta)
    assert set(meta.get_all("Provides-Extra")) == EXTRAS
    unconditional = {canonicalize_name(r.name): str(r.specifier) for r in reqs if r.marker is None}
    # filelock: vsgd.tracking's store lock; torch requires it too, so it adds nothing.
    assert unconditional == {"torch": "==2.14.1", "numpy": "", "filelock": ""}, unconditional
    for name in PIPELINE_STACK:
        entries = [r for r in reqs if canonicalize_name(r.name) == name]
        assert entries, f"{name} is not required by any extra"
        for req in entries:
            assert extras_of(req, EXTRAS | {""}) == {"pipeline"}, f"{req} {req.marker}"
    names = {canonicalize_name(r.name) for r in reqs}
    assert not names & {"kmock", "pytest-asyncio"}
    # The test tools bring the pipeline, the benchmarks and the optimizers extra along
    # (through the project itself), so the suite covers all of them.
    dev = {
        canonicalize_name(r.name): r
        for r in reqs
        if "dev" in extras_of(r, {"dev"}) and r.marker is not None
    }
    assert dev[PROJECT].extras == {"pipeline", "bench", "optimizers"}
    optimizers = {
        canonicalize_name(r.name)
        for r in reqs
        if r.marker is not None and "optimizers" in extras_of(r, {"optimizers"})
    }
    assert optimizers == {"pytorch-optimizer"}  # no base dependency: an extra of its own
    assert {"pytest", "pytest-timeout", "moto", "kubernetes-validate"} <= set(dev)
    bench = {
        canonicalize_name(r.name)
        for r in reqs
        if r.marker is not None and "bench" in extras_of(r, {"bench"})
    }
    assert "torchvision" in bench


def test_package_data_lists_exactly_the_data_files():
    """Every file of a package that is not Python source is package data, and every
    package-data entry names files that exist."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_data = config["package-data"]
    for package in ("vsgd", "pipeline"):
        base = ROOT / package
        data = {
            p.relative_to(base).as_posix()
            for p in base.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
        }
        listed = set()
        for pattern in package_data.get(package, []):
            matches = {p.relative_to(base).as_posix() for p in base.glob(pattern) if p.is_file()}
            assert matches, f"package-data {package}: {pattern!r} matches no file"
            listed |= matches
        assert listed == data, (package, sorted(data - listed), sorted(listed - data))
    assert "templates/job-template.yaml" in {p for p in package_data["pipeline"]}


RENDERED = """
import json, sys
import pipeline, pipeline.aggregate
from pipeline.k8s import render, schema
refs = pipeline.aggregate.load_references()
template = schema.template_path({})
print(json.dumps({"pipeline": pipeline.__file__, "template": str(template),
                  "kind": render.load_template(template)["kind"], "references": len(refs)}))
"""


def test_installed_package_renders_jobs(installed_project, tmp_path):
    """A non-editable install (as in the image) shadows the checkout; from a directory outside
    the repository it renders Jobs through `python -m pipeline render-jobs` (the executor's
    code path) and loads the reference numbers."""
    target, work = installed_project, tmp_path / "work"
    work.mkdir()
    shutil.copy2(ROOT / "params.yaml", work / "params.yaml")  # the user's own params file
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}

    probe = subprocess.run(
        [sys.executable, "-c", RENDERED],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(found["pipeline"]).is_relative_to(target), found
    assert Path(found["template"]).is_relative_to(target) and found["kind"] == "Job", found
    assert found["references"] > 0

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "render-jobs",
            "--out",
            "jobs",
            "--set",
            "storage.remote=s3://vsgd/grid",
            "--set",
            "seeds=[0]",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted((work / "jobs").glob("*.yaml"))
    assert files, proc.stdout
    for path in files:
        job = yaml.safe_load(path.read_text())
        assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
        [container] = job["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] == "--spec-json"
        spec = json.loads(container["args"][1])
        assert job["metadata"]["labels"]["vsgd-repro/run-hash"] == spec["run_hash"]


def lock_names():
    names = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not an exact pin"
            names[canonicalize_name(name)] = version
    return names


def test_lock_pins_exactly_what_the_extras_install(wheel):
    """requirements.lock = the transitive requirements of `.[pipeline,bench,dev]` (evaluated
    for this interpreter and platform, the lock's own), nothing missing, nothing stale."""
    root = [str(r) for r in requires(metadata(wheel))]
    needed, done = set(), set()
    pending = [(canonicalize_name(PROJECT), frozenset(EXTRAS))]
    while pending:
        name, extras = pending.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            texts = root if name == PROJECT else importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is required but not installed here (run `make setup`)")
        for req in map(Requirement, texts):
            if req.marker is not None and not extras_of(req, set(extras) | {""}):
                continue
            dep = canonicalize_name(req.name)
            if dep != PROJECT:
                needed.add(dep)
            pending.append((dep, frozenset(req.extras) | (extras if dep == PROJECT else set())))
    locked = set(lock_names())
    assert not needed - locked, f"required but not pinned: {sorted(needed - locked)}"
    assert not locked - needed, f"pinned but not required: {sorted(locked - needed)}"


LIBRARY = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None        # as if not installed: importing it fails
import torch
from vsgd import VSGD
param = torch.nn.Parameter(torch.ones(3))
opt = VSGD([param], lr=0.1)
param.grad = torch.ones(3)
opt.step()
from vsgd.data import formats       # CIFAR-100's reader needs no Pillow
try:
    formats.read_tinyimagenet("missing.zip")
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("read_tinyimagenet ran without Pillow")
"""


def test_library_imports_without_the_pipeline_extra(tmp_path):
    code = LIBRARY.format(blocked=NOT_FOR_THE_LIBRARY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'vsgd-repro[pipeline]'" in proc.stdout, proc.stdout
