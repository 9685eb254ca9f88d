"""Training throughput, three rows per model in one process (same model, batch, optimizer,
precision, device), images per second:

(a) baseline, the authors' loop (generativeai-tue/vsgd, src/utils/trainer.py and
    src/dataset/): a torchvision Dataset decoding a PIL image per sample and applying the
    paper's PIL transforms to it (CIFAR-100: the `CIFAR100` pickles,
    RandomCrop/RandomHorizontalFlip; Tiny ImageNet: `ImageFolder` over JPEG files,
    RandomCrop/RandomHorizontalFlip/RandomAffine/ColorJitter; then ToTensor/Normalize), a
    DataLoader with 1 worker, every step a NaN check and `clip_grad_norm_` (which the
    authors call with max norm 1e6 when clipping is off) read back with `.item()`, a
    validation forward pass on one batch every iteration (CIFAR-100: a held-out part of the
    augmented training set; Tiny ImageNet: its val split), test evaluation at the paper's
    ratio through a 1-worker DataLoader, NCHW;
(b) compute ceiling: forward + backward + step on one batch already on the device, in the
    trainer's memory format, nothing else;
(c) `vsgd.trainer.train` itself (on-device uint8 data and augmentation, MLflow logging to a
    SQLite store every `log_every` steps), with evaluation at the paper's ratio of test
    images to training images (CIFAR-100 VGG: 10,000 test images every 500 iterations of
    256 = 7.8%; the batch sizes come from params.yaml's protocol) and the final evaluation
    inside the timed window.

Every row computes as (c) does: before each row starts, the float32 flags are set to (c)'s
`training.precision` (strict fp32 by default: TF32 off for cuDNN convolutions and matmuls,
which PyTorch would otherwise use for convolutions on Ampere and later) and the CPU's
denormal mode to its `training.denormals` (flushed to zero by default), and (b) is compiled
where (c) compiles (`training.compile`: true, or auto on CUDA). Each row records the flags it
ran under in the JSON (`flags`, per round: the denormal mode as read back) and which rows
were compiled (`compiled`).

All rows train on the same synthetic images in the dataset's format (`vsgd.data` synthetic
source; for (a) written out as CIFAR-100 python pickles or as Tiny ImageNet-style JPEG
files). Each row is timed for `--iters` iterations after `--warmup`; the rows take turns for
`--rounds` rounds and the best round of each is reported, so that load from other processes on
a shared machine biases no row in particular.

    python benchmarks/train_throughput.py                 # the CPU targets: CIFAR-100 VGG16-bn
                                                          # and ConvMixer, batch 64
    python benchmarks/train_throughput.py --configs tinyimagenet:vgg19 --batch 32
    python benchmarks/train_throughput.py --paper         # the paper's six configurations at
                                                          # their batch sizes (for a GPU)
"""

import argparse
import functools
import json
import logging
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vsgd.data import (  # noqa: E402
    DATASETS,
    augment,  # noqa: E402
    prepare,
)
from vsgd.engine import denormals_in_effect, set_denormals, set_float32_precision  # noqa: E402
from vsgd.models import build_model  # noqa: E402
from vsgd.spec import TRAINING_DEFAULTS  # noqa: E402
from vsgd.trainer import train  # noqa: E402

OPTIMIZER = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
CPU_TARGETS = ["cifar100:vgg16", "cifar100:convmixer_256_8"]
# (c)'s training keys that decide how the model computes; (a) and (b) follow them. No row
# but (c) autocasts, so `bf16` would not compare like with like: keep fp32 or tf32.
TRAINING = {"precision": "fp32", "denormals": "flush", "compile": "auto", "channels_last": "auto"}


def compiles(compile_setting, device: torch.device) -> bool:
    """Whether the trainer compiles the model: `compile` true, or "auto" on CUDA. The rule of
    vsgd/engine.py `build`, restated here because it is inline there; keep the two equal."""
    return compile_setting is True or (compile_setting == "auto" and device.type == "cuda")


def precision_flags() -> dict:
    """The process-wide float32 flags a row runs under (set by `set_float32_precision`) and
    what the CPU does with denormals (`set_denormals`, read back)."""
    return {
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "denormals": denormals_in_effect(),
    }


@functools.cache
def paper_configs() -> dict:
    """{"dataset:arch": batch size} of the paper's six configurations (params.yaml)."""
    protocol = yaml.safe_load((ROOT / "params.yaml").read_text())["protocol"]
    return {
        f"{ds}:{arch}": p["batch_size"][key]
        for ds, p in protocol.items()
        for key, arch in p["models"].items()
    }


def eval_ratio(config: str) -> float:
    """Test images per training image in the paper's protocol for `config`."""
    dataset = config.split(":")[0]
    return DATASETS[dataset].counts["test"] / (
        TRAINING_DEFAULTS["eval_every"] * paper_configs()[config]
    )


def write_cifar_pickles(data_dir: Path, out: Path) -> Path:
    """The prepared arrays as torchvision's CIFAR-100 layout (`cifar-100-python/`)."""
    base = out / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        x = np.load(data_dir / f"{split}_x.npy")
        y = np.load(data_dir / f"{split}_y.npy")
        with open(base / split, "wb") as f:
            pickle.dump(
                {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "fine_labels": y.tolist()}, f
            )
    return out


def write_image_folders(data_dir: Path, out: Path) -> Path:
    """The prepared arrays as JPEG files, one folder per class (what the authors' Tiny
    ImageNet loader reads with `ImageFolder`)."""
    for split in ("train", "test"):
        x = np.load(data_dir / f"{split}_x.npy")
        y = np.load(data_dir / f"{split}_y.npy")
        for i, (image, label) in enumerate(zip(x, y)):
            folder = out / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.JPEG", quality=95)
    return out


def authors_datasets(dataset: str, data_dir: Path, tmp: Path):
    """(train, validation, test) torchvision Datasets with the paper's per-image PIL
    transforms; as the authors', CIFAR-100 validates on augmented training images and Tiny
    ImageNet on its (unaugmented) val split, which is also its test set."""
    import torchvision
    import torchvision.transforms as T

    info = DATASETS[dataset]
    norm = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    crop_flip = [T.RandomCrop(info.image_size, padding=augment.PAD), T.RandomHorizontalFlip()]
    if dataset == "cifar100":

        class CIFAR100(torchvision.datasets.CIFAR100):
            # Our synthetic pickles do not have the official md5s, nor a meta file.
            def _check_integrity(self):
                return True

            def _load_meta(self):
                self.classes = [f"class{i}" for i in range(100)]

        root = write_cifar_pickles(data_dir, tmp / "torchvision")
        train = CIFAR100(root, train=True, transform=T.Compose(crop_flip + norm))
        return train, train, CIFAR100(root, train=False, transform=T.Compose(norm))
    root = write_image_folders(data_dir, tmp / "imagefolder")
    train_tf = crop_flip + [
        T.RandomAffine(augment.DEGREES, translate=(augment.TRANSLATE,) * 2, scale=augment.SCALE),
        T.ColorJitter(
            brightness=augment.JITTER, contrast=augment.JITTER, saturation=augment.JITTER
        ),
    ]
    test = torchvision.datasets.ImageFolder(root / "test", T.Compose(norm))
    return (
        torchvision.datasets.ImageFolder(root / "train", T.Compose(train_tf + norm)),
        test,
        test,
    )


def build(dataset, arch, device, memory_format=torch.contiguous_format):
    info = DATASETS[dataset]
    torch.manual_seed(0)
    model = build_model(arch, info.num_classes, info.image_size)
    model = model.to(device, memory_format=memory_format)
    args = {k: v for k, v in OPTIMIZER.items() if k != "name"}
    return model, torch.optim.SGD(model.parameters(), **args)


def baseline(datasets, config, batch, warmup, iters, device, precision) -> tuple[float, dict]:
    """(a): the authors' pipeline, under `precision`'s float32 flags and (c)'s denormal mode;
    (images/s, the flags at the start of its window)."""
    set_float32_precision(precision)
    set_denormals(TRAINING["denormals"])
    dataset, arch = config.split(":")
    train_set, val_set, test_set = datasets
    loader_args = dict(batch_size=batch, num_workers=1, pin_memory=device.type == "cuda")
    loader = torch.utils.data.DataLoader(
        train_set, shuffle=True, drop_last=True, persistent_workers=True, **loader_args
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, shuffle=True, drop_last=True, persistent_workers=True, **loader_args
    )
    test_images = max(1, round(eval_ratio(config) * iters * batch))
    test_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(test_set, range(min(test_images, len(test_set)))), **loader_args
    )
    model, opt = build(dataset, arch, device)
    batches, val_batches = _forever(loader), _forever(val_loader)
    stats = []  # what the authors' loop reads back every step
    for i in range(warmup + iters):
        if i == warmup:
            flags = precision_flags()
            t0 = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        norm = float("nan")  # the update is skipped on a NaN loss, as theirs
        if torch.isnan(loss).sum().item() == 0:
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6).item()
            opt.step()
        stats.append((loss.item(), (logits.argmax(1) == y).float().mean().item(), norm))
        model.eval()
        with torch.no_grad():
            vx, vy = next(val_batches)
            vx, vy = vx.to(device, non_blocking=True), vy.to(device, non_blocking=True)
            vlogits = model(vx)
            stats.append(
                (
                    F.cross_entropy(vlogits, vy).item(),
                    (vlogits.argmax(1) == vy).float().mean().item(),
                )
            )
    stats.append(_authors_test(model, test_loader, device))
    _sync(device)
    seconds = time.perf_counter() - t0
    batches.close()  # stops the loaders' worker processes
    val_batches.close()
    return iters * batch / seconds, flags


@torch.no_grad()
def _authors_test(model, loader, device) -> tuple[float, float]:
    model.eval()
    loss = correct = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).float().sum()
    return float(loss) / len(loader.dataset), float(correct) / len(loader.dataset)


def _forever(loader):
    while True:
        yield from loader


def ceiling(dataset, arch, batch, warmup, iters, device, precision, compiled) -> tuple[float, dict]:
    """(b): fwd + bwd + step on one batch on the device, channels_last, float32 flags and
    compilation as the trainer (compiled during the warm-up); (images/s, the flags at the
    start of its window)."""
    set_float32_precision(precision)
    set_denormals(TRAINING["denormals"])
    info = DATASETS[dataset]
    model, opt = build(dataset, arch, device, torch.channels_last)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, info.image_size, info.image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            flags = precision_flags()
            t0 = time.perf_counter()
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return iters * batch / (time.perf_counter() - t0), flags


def window_start(warmup, log_every) -> int:
    """(c)'s first log point after the warm-up, where its timed window starts."""
    return -(-warmup // log_every) * log_every


def trainer_spec(config, data_root, tmp, batch, warmup, iters, device, log_every, seed) -> dict:
    """(c)'s run spec."""
    from vsgd.spec import run_hash

    dataset, arch = config.split(":")
    total = warmup + iters
    start = window_start(warmup, log_every)
    evals = len(set(range(2 * start, total + 1, start)) | {total})  # inside the window
    spec = {
        "name": f"bench-{dataset}-{arch}",
        "dataset": dataset,
        "arch": arch,
        "arch_key": arch.split("_")[0].rstrip("0123456789"),
        "data": {
            "dir": str(data_root / "prepared" / dataset),
            "checksum": None,
            "source": "synthetic",
            "uri": None,
        },
        "optimizer": OPTIMIZER,
        "batch_size": batch,
        "seed": seed,
        "schedule": {"iterations": total, "step_size": total, "gamma": 0.5},
        "training": {
            "eval_every": start,
            "checkpoint_every": total,
            "log_every": log_every,
            "validation_size": 0,
            **TRAINING,
            "device": str(device),
            "eval_batch_size": 1000,
            "beta1_every": 500,
            # 0 would mean the whole test set
            "test_limit": max(1, round(eval_ratio(config) * (total - start) * batch / evals)),
        },
        "output_dir": str(tmp / "runs" / f"{dataset}-{arch}-{seed}"),
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "bench"},
    }
    spec["run_hash"] = run_hash(spec)
    return spec


def ours(spec, warmup, log_every) -> tuple[float, dict]:
    """(c): the trainer, timed from its first log point after warm-up (`start`) to its last
    one (which follows the final evaluation); (images/s, the flags at `start`, which the
    trainer set itself). It also evaluates at `start`, outside the window, so that the
    evaluation's first-call costs (torch.compile of the eval graph on CUDA) stay out of it,
    as they would in a long run."""
    total, start = spec["schedule"]["iterations"], window_start(warmup, log_every)
    marks, flags = {}, {}

    def progress(step, _total, _info):
        marks[step] = time.perf_counter()
        if step == start:
            flags.update(precision_flags())

    train(spec, progress=progress)
    return (total - start) * spec["batch_size"] / (marks[total] - marks[start]), flags


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = paper_configs()
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="DATASET:ARCH",
        help=f"default: {' '.join(CPU_TARGETS)}; one of {', '.join(known)}",
    )
    p.add_argument(
        "--paper",
        action="store_true",
        help="all six paper configurations, each at the paper's batch size",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size of every configuration (default 64, or the paper's with --paper)",
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.paper and args.configs:
        p.error("--paper and --configs exclude each other")
    args.configs = list(known) if args.paper else (args.configs or CPU_TARGETS)
    unknown = [c for c in args.configs if c not in known]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    first_log = window_start(args.warmup, args.log_every)
    if args.warmup < 1 or first_log >= args.warmup + args.iters:
        p.error(
            f"row (c) is timed between the trainer's log points: no log point (every "
            f"--log-every {args.log_every}) falls after --warmup {args.warmup} (>= 1) "
            f"and before the end; raise --iters or lower --log-every"
        )
    args.batches = {c: args.batch or (known[c] if args.paper else 64) for c in args.configs}
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    rows = []
    compiled = compiles(TRAINING["compile"], device)
    print(
        f"{args.device} ({torch.get_num_threads()} threads), {TRAINING['precision']}, "
        f"{'(b) and (c) compiled' if compiled else 'not compiled'}, SGD momentum; best of "
        f"{args.rounds} rounds of {args.iters} timed iterations after {args.warmup}"
    )
    print(
        f"{'configuration':<30} {'batch':>5} {'(a) baseline':>13} {'(b) ceiling':>12} "
        f"{'(c) ours':>9} {'c/b':>6} {'c/a':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = tmp / "data"
        for dataset in dict.fromkeys(c.split(":")[0] for c in args.configs):
            n_train = (args.warmup + args.iters + 1) * max(
                b for c, b in args.batches.items() if c.startswith(dataset + ":")
            )
            prepare(
                dataset,
                "synthetic",
                data_root,
                synthetic_sizes={"train": max(n_train, 2048), "test": 2048},
            )
        authors = {}
        for config in args.configs:
            dataset, arch = config.split(":")
            batch = args.batches[config]
            if dataset not in authors:
                authors[dataset] = authors_datasets(
                    dataset, data_root / "prepared" / dataset, tmp / dataset
                )
            runs = {"a": [], "b": [], "c": []}
            flags = {"a": [], "b": [], "c": []}  # per round, at the start of each window
            for r in range(args.rounds):
                spec = trainer_spec(
                    config,
                    data_root,
                    tmp,
                    batch,
                    args.warmup,
                    args.iters,
                    device,
                    args.log_every,
                    seed=r,
                )
                precision = spec["training"]["precision"]
                compiled = compiles(spec["training"]["compile"], device)
                timed = {  # in this order: a, b, c
                    "a": baseline(
                        authors[dataset], config, batch, args.warmup, args.iters, device, precision
                    ),
                    "b": ceiling(
                        dataset, arch, batch, args.warmup, args.iters, device, precision, compiled
                    ),
                    "c": ours(spec, args.warmup, args.log_every),
                }
                for row, (speed, row_flags) in timed.items():
                    runs[row].append(speed)
                    flags[row].append(row_flags)
            a, b, c = (max(runs[k]) for k in "abc")
            rows.append(
                {
                    "dataset": dataset,
                    "arch": arch,
                    "batch": batch,
                    "device": args.device,
                    "baseline": a,
                    "ceiling": b,
                    "ours": c,
                    "rounds": runs,
                    "precision": precision,
                    "compiled": {"a": False, "b": compiled, "c": compiled},
                    "flags": flags,
                }
            )
            print(
                f"{config:<30} {batch:>5} {a:>13.1f} {b:>12.1f} {c:>9.1f} {c / b:>6.2f} "
                f"{c / a:>6.2f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
