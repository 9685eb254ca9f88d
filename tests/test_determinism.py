"""The training step ready for CUDA: deterministic kernels (`training.deterministic`), no host
synchronisation inside the step, and VSGD's implementation chosen by the spec
(`optimizer.implementation`).

On CPU: the flags a build sets (read back), the keys' validation and identity, the step's ops
(no tensor made from host data, nothing read back), and the bits of VSGD's paths. The CUDA
tests (`gpu`) run the step under `torch.cuda.set_sync_debug_mode("error")`, check that no op
of the protocol's models falls back to a nondeterministic kernel, and that a run killed and
resumed in another process ends bit-identical to an uninterrupted one.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config
import yaml
from conftest import ROOT, fake_prepared, run_spec
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import grid
from pipeline.config import load_params
from vsgd import engine, trainer
from vsgd.checkpoint import LocalCheckpointStore, from_bytes
from vsgd.data import Augmenter
from vsgd.spec import (
    BOOKKEEPING,
    OPTIMIZERS,
    TRAINING,
    VSGD_IMPLEMENTATIONS,
    ConfigError,
    check_spec,
    run_hash,
    tunable,
)

PARAMS = ROOT / "params.yaml"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VSGD = {"name": "vsgd", "lr": 0.02, "ghattg": 30.0, "ps": 1e-8, "tau1": 0.81, "tau2": 0.9}
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}


# ---------------------------------------------------------------------------------------------
# training.deterministic: the process-wide flags a build sets


def flags():
    """(deterministic algorithms, warn only, cuDNN deterministic, cuDNN benchmark, inductor's
    deterministic mode)."""
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        inductor_config.deterministic,
    )


def set_flags(algorithms, warn_only, cudnn_deterministic, cudnn_benchmark, inductor):
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    torch.backends.cudnn.deterministic = cudnn_deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark
    inductor_config.deterministic = inductor


@pytest.fixture(autouse=True)
def _restore_flags():
    """The flags are process-wide: leave them as they were for the other tests."""
    before = flags()
    yield
    set_flags(*before)


@pytest.mark.parametrize("deterministic", [True, False])
def test_building_a_run_sets_the_determinism_flags(data_root, tmp_path, monkeypatch, deterministic):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    expected = (deterministic, True, deterministic, not deterministic, deterministic)
    # Start from the opposite setting, so each flag must be set by the build.
    set_flags(not deterministic, False, not deterministic, deterministic, not deterministic)
    trainer.setup(run_spec(data_root, tmp_path, deterministic=deterministic))
    assert flags() == expected
    # Set whatever the key says: cuBLAS reads it once per process, a later run may need it.
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_a_cublas_workspace_given_from_outside_is_kept(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # also deterministic, smaller
    trainer.setup(run_spec(data_root, tmp_path))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert flags()[0] is True  # deterministic by default


def test_deterministic_is_checked_and_part_of_the_identity(data_root, tmp_path):
    assert TRAINING["deterministic"] == (True, (True, False))
    assert "deterministic" not in BOOKKEEPING
    spec = run_spec(data_root, tmp_path, deterministic="yes")
    assert check_spec(spec) == ["training.deterministic: yes is not allowed; allowed: true, false"]
    default = run_spec(data_root, tmp_path)
    assert "deterministic" not in default["training"]
    explicit = run_spec(data_root, tmp_path, deterministic=True)
    fast = run_spec(data_root, tmp_path, deterministic=False)
    assert check_spec(explicit) == [] and check_spec(fast) == []
    assert run_hash(explicit) == run_hash(default)  # true is the default
    assert run_hash(fast) != run_hash(default)


def problems_of(overrides, path=PARAMS):
    with pytest.raises(ConfigError) as info:
        load_params(path, overrides)
    return info.value.problems


def without(key_path: str, tmp_path) -> Path:
    """A copy of params.yaml without the key at `key_path` (dotted)."""
    params = yaml.safe_load(PARAMS.read_text())
    *parents, key = key_path.split(".")
    section = params
    for name in parents:
        section = section[name]
    del section[key]
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(params))
    return out


def test_params_yaml_sets_deterministic_and_it_reaches_the_spec(tmp_path, monkeypatch):
    assert load_params(PARAMS)["training"]["deterministic"] is True
    assert problems_of(["training.deterministic=maybe"]) == [
        "training.deterministic: maybe is not allowed; allowed: true, false"
    ]
    missing = without("training.deterministic", tmp_path)
    assert "training.deterministic: missing" in problems_of([], missing)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_prepared(tmp_path)
    overrides = ["preset=ci", f"data.root={tmp_path}", "tune.enabled=false"]
    specs = {
        value: grid.build_spec(
            load_params(PARAMS, [*overrides, f"training.deterministic={value}"]),
            "cifar100",
            "vgg",
            "vsgd",
            seed=0,
        )
        for value in ("true", "false")
    }
    assert specs["true"]["training"]["deterministic"] is True
    assert specs["false"]["training"]["deterministic"] is False
    assert specs["true"]["run_hash"] != specs["false"]["run_hash"]


# ---------------------------------------------------------------------------------------------
# no host synchronisation in the training step

# Ops that read a value back to the host (`.item()`, `bool(t)`, a data-dependent shape) or make
# a tensor from host data (`torch.tensor(...)`, `new_tensor`): on CUDA each waits for the device
# or copies from the host with a wait.
HOST_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.lift_fresh", "aten.equal")


class HostOps(TorchDispatchMode):
    """Records every op of `HOST_OPS`, and indexing with a boolean mask (a `nonzero` on
    CUDA), that runs inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        masks = [
            t
            for a in args
            if isinstance(a, (list, tuple))
            for t in a
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool
        ]
        if name.startswith(HOST_OPS) or (name.startswith("aten.index") and masks):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dataset,size", [("cifar100", 32), ("tinyimagenet", 64)])
def test_the_augmenter_builds_its_constant_tensors_once(dataset, size):
    """Mean, std and the grayscale weights are made in `__init__`; a call makes no tensor
    from host data (on CUDA a blocking copy per step)."""
    aug = Augmenter(dataset)
    x = torch.randint(0, 256, (4, size, size, 3), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    with HostOps() as log:
        aug.train(x, gen)
        aug.test(x)
    assert log.ops == []


@pytest.mark.parametrize(
    "dataset,optimizer",
    [
        ("cifar100", VSGD),
        # The same audit on the other dataset's augmentation and the other paths: extended
        # (the default suite keeps one, the fused VSGD path and the augmenter tested apart).
        pytest.param("tinyimagenet", VSGD, marks=pytest.mark.extended),
        pytest.param("cifar100", {**VSGD, "implementation": "single"}, marks=pytest.mark.extended),
        pytest.param("cifar100", SGD, marks=pytest.mark.extended),
    ],
    ids=["cifar100-vsgd", "tinyimagenet-vsgd", "cifar100-vsgd-single", "cifar100-sgd"],
)
def test_the_training_step_reads_nothing_back(data_root, tmp_path, dataset, optimizer):
    """The whole step (batch, augmentation, forward, backward, VSGD or SGD, StepLR, the running
    sums), a new epoch's order included: no op that waits for the device."""
    # 8 training images in batches of 4: the third step starts the second epoch.
    spec = run_spec(
        data_root,
        tmp_path,
        dataset=dataset,
        optimizer=optimizer,
        batch_size=4,
        validation_size=248,
        iterations=4,
    )
    run, _ = trainer.setup(spec)
    state = engine.new_state(run)
    with HostOps() as log:
        for _ in range(3):
            engine.train_step(run, state)
    assert state.epoch == 1
    assert log.ops == []


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(
    "dataset,optimizer",
    [
        ("cifar100", VSGD),
        ("tinyimagenet", {**VSGD, "implementation": "single"}),
        ("cifar100", {**VSGD, "implementation": "fused"}),
        ("cifar100", SGD),
    ],
    ids=["cifar100-vsgd", "tinyimagenet-vsgd-single", "cifar100-vsgd-fused", "cifar100-sgd"],
)
def test_the_training_step_never_synchronises_on_cuda(data_root, tmp_path, dataset, optimizer):
    spec = run_spec(
        data_root,
        tmp_path,
        dataset=dataset,
        optimizer=optimizer,
        batch_size=4,
        validation_size=248,
        iterations=8,
        device="cuda",
        compile="auto",
    )
    run, _ = trainer.setup(spec)
    state = engine.new_state(run)
    engine.train_step(run, state)  # compiles, starts cuBLAS/cuDNN: first-use work may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):  # the second and third epochs start in here
            engine.train_step(run, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.epoch == 2


# ---------------------------------------------------------------------------------------------
# VSGD's implementation


def test_implementation_is_checked_and_part_of_the_identity(data_root, tmp_path):
    assert OPTIMIZERS["vsgd"]["implementation"] == VSGD_IMPLEMENTATIONS
    assert VSGD_IMPLEMENTATIONS == ("auto", "single", "foreach", "fused")
    assert "implementation" not in tunable("vsgd") and "lr" in tunable("vsgd")
    bad = run_spec(data_root, tmp_path, optimizer={**VSGD, "implementation": "fast"})
    [problem] = check_spec(bad)
    assert problem.startswith("optimizer.implementation: fast is not allowed")
    assert problem.endswith("allowed: auto, single, foreach, fused")
    hashes = {
        impl: run_hash(run_spec(data_root, tmp_path, optimizer={**VSGD, "implementation": impl}))
        for impl in VSGD_IMPLEMENTATIONS
    }
    assert len(set(hashes.values())) == 4


def test_params_yaml_chooses_the_implementation(tmp_path, monkeypatch):
    assert load_params(PARAMS)["optimizer"]["vsgd"]["implementation"] == "auto"
    [problem] = problems_of(["optimizer.vsgd.implementation=fast"])
    assert problem.startswith("optimizer.vsgd.implementation: fast is not allowed")
    # A choice of how the update runs, not a hyperparameter: never tuned.
    problems = problems_of(["optimizer.vsgd.grid={implementation: [single, fused]}"])
    assert any(p.startswith("optimizer.vsgd.grid.implementation") for p in problems), problems
    missing = without("optimizer.vsgd.implementation", tmp_path)
    assert "optimizer.vsgd.implementation: missing" in problems_of([], missing)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_prepared(tmp_path)
    fused_vgg = "{match: {arch: vgg, optimizer: vsgd}, optimizer: {implementation: fused}}"
    params = load_params(
        PARAMS,
        ["preset=ci", f"data.root={tmp_path}", "tune.enabled=false", f"experiments=[{fused_vgg}]"],
    )
    vgg = grid.build_spec(params, "cifar100", "vgg", "vsgd", seed=0)
    convmixer = grid.build_spec(params, "cifar100", "convmixer", "vsgd", seed=0)
    assert vgg["optimizer"]["implementation"] == "fused"
    assert convmixer["optimizer"]["implementation"] == "auto"
    assert check_spec(copy.deepcopy(vgg)) == []


@pytest.mark.parametrize(
    "implementation,flags",
    [
        ("auto", (None, None)),
        ("single", (False, None)),
        ("foreach", (True, None)),
        ("fused", (None, True)),
    ],
)
def test_the_implementation_picks_vsgds_path(implementation, flags):
    params = [nn.Parameter(torch.zeros(3))]
    opt = engine.make_optimizer(params, {**VSGD, "implementation": implementation})
    group = opt.param_groups[0]
    assert (group["foreach"], group["fused"]) == flags
    assert "implementation" not in group


def _train_tiny(implementation, steps=4):
    """A small conv net (channels_last, as the trainer's) trained a few steps with VSGD made
    from a spec section; its parameters and VSGD state afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.GELU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).to(memory_format=torch.channels_last)
    opt = engine.make_optimizer(
        model.parameters(), {**VSGD, "weight_decay": 0.01, "implementation": implementation}
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (6,), generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()] + [
        opt.state[p][k].clone() for p in model.parameters() for k in ("mu", "bg", "bhg")
    ]


def test_single_and_foreach_give_the_same_bits_on_cpu_and_fused_rounds_differently():
    """What docs/performance.md says of the paths on CPU, measured over a few steps."""
    auto = _train_tiny("auto")
    for implementation in ("single", "foreach"):
        for a, b in zip(auto, _train_tiny(implementation)):
            assert torch.equal(a, b), implementation
    fused = _train_tiny("fused")
    for a, b in zip(auto, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# deterministic CUDA runs

NONDETERMINISTIC = "does not have a deterministic implementation"
# What a run computes (metrics.json), without timings and bookkeeping.
RESULT = ("steps_done", "diverged", "train_loss", "train_acc", "test_loss", "test_acc", "val_acc")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("arch", ["vgg16", "convmixer_256_8", "resnext18"])
def test_the_models_use_only_deterministic_cuda_kernels(data_root, tmp_path, arch):
    """Two runs of one spec in one process end with the same bits, and no op of the step or
    the evaluation warned that it has no deterministic CUDA kernel (`warn_only`)."""
    spec = run_spec(
        data_root, tmp_path, arch=arch, optimizer=VSGD, batch_size=8, device="cuda", compile=False
    )
    weights = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            run, _ = trainer.setup(spec)
            state = engine.new_state(run)
            for _ in range(4):
                engine.train_step(run, state)
            engine.measure(run)
            weights.append([t.detach().cpu() for t in run.model.state_dict().values()])
    assert not [str(w.message) for w in caught if NONDETERMINISTIC in str(w.message)]
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def _cli(spec_file: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--spec", str(spec_file)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.gpu
@CUDA
def test_a_cuda_run_killed_and_resumed_in_another_process_ends_bit_identical(data_root, tmp_path):
    """The protocol's settings on CUDA (compiled model, channels_last, deterministic): a run
    SIGKILLed after step 5 (checkpoint at 4) and started again in a new process, which
    compiles again, ends with the bits of an uninterrupted run."""
    kw = dict(
        optimizer=VSGD,
        iterations=8,
        eval_every=4,
        checkpoint_every=2,
        device="cuda",
        compile="auto",
    )
    specs = {name: run_spec(data_root, tmp_path / name, **kw) for name in ("ref", "kill")}
    files = {}
    for name, spec in specs.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(spec))
    proc = _cli(files["kill"], tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 5/8"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(120)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    for name in ("ref", "kill"):
        p = _cli(files[name], tmp_path)
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out
    assert "resuming" in out, out
    results = {}
    for name, spec in specs.items():
        out_dir = Path(spec["output_dir"])
        metrics = json.loads((out_dir / "metrics.json").read_text())
        results[name] = ({k: metrics[k] for k in RESULT}, (out_dir / "curve.csv").read_text())
    assert results["kill"] == results["ref"]
    saved = {n: from_bytes(LocalCheckpointStore(s["checkpoint"]).load()) for n, s in specs.items()}
    for key in ("model", "optimizer", "scheduler", "rng", "sums"):
        assert _same(saved["kill"][key], saved["ref"][key]), key
