"""What verifying prepared data costs a run: `load_prepared` with and without the sha256 check.

    python benchmarks/data_verification.py [--dataset tinyimagenet] [--train 100000]
                                           [--test 10000] [--root DIR] [--rounds 5]
                                           [--json FILE]

Generates the synthetic stand-in of the dataset at the given sizes (default: the official
ones, Tiny ImageNet's train_x is 1.2 GB) under `--root` once (kept there for the next time),
then times loading its four arrays in fresh processes, each way once per round, interleaved,
so that load from other processes hits every way alike; the table shows the median and the
minimum over rounds. The ways:

- `plain`: `np.load` of each array, no check (what `load_prepared` did before it verified);
- `verified`: `load_prepared`, each file hashed as it is read (one pass);
- `digest+load`: `vsgd.files.file_sha256_once` of each file (read in chunks), then
  `np.load` (two passes over each file), the alternative `load_prepared` does not take;

each as the first load of the process and again as its second load: a process that builds
several runs from one dataset (the timing stage) hashes each file once (`first`), later loads
find it in the process's memory of hashed files (`second`).

The files sit in the page cache after the first round (nothing here evicts them): these are
warm-cache times, the data's reading and hashing, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vsgd.data import DATASETS, load_prepared, prepare
from vsgd.files import file_sha256_once
from vsgd.trainer import device_name

WAYS = ("plain", "verified", "digest+load")
ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def worker(way: str, directory: str) -> dict:
    """Load the dataset twice in this process the way `way` says; the two times in seconds."""

    def load():
        if way == "verified":
            return load_prepared(directory)
        if way == "digest+load":
            digests = [file_sha256_once(Path(directory) / f"{a}.npy") for a in ARRAYS]
            assert len(digests) == len(ARRAYS)
        return [np.load(Path(directory) / f"{a}.npy", allow_pickle=False) for a in ARRAYS]

    times = []
    for _ in range(2):
        start = time.perf_counter()
        data = load()
        times.append(time.perf_counter() - start)
        del data  # the second load allocates afresh, as a second run's would
    return {"first": times[0], "second": times[1]}


def cpu_name() -> str:
    """The CPU as the trainer names it in a run's metrics."""
    import torch  # only for the device; the timed loads run in their own processes

    return device_name(torch.device("cpu"))


def measure(directory: Path, rounds: int) -> list[dict]:
    samples = {way: {"first": [], "second": []} for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", way, str(directory)],
                capture_output=True,
                text=True,
                check=True,
            )
            for key, value in json.loads(out.stdout.splitlines()[-1]).items():
                samples[way][key].append(value)
    return [
        {
            "way": way,
            "load": key,
            "median_s": statistics.median(values),
            "min_s": min(values),
            "rounds": values,
        }
        for way in WAYS
        for key, values in samples[way].items()
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="tinyimagenet", choices=("cifar100", "tinyimagenet"))
    p.add_argument(
        "--train", type=int, default=None, help="training images (default: the official number)"
    )
    p.add_argument(
        "--test", type=int, default=None, help="test images (default: the official number)"
    )
    p.add_argument(
        "--root",
        default=str(Path(tempfile.gettempdir()) / "vsgd-bench-data"),
        help="where the synthetic dataset is prepared and kept (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", nargs=2, metavar=("WAY", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    if (args.train is None) != (args.test is None):
        p.error("--train and --test go together")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    sizes = None if args.train is None else {"train": args.train, "test": args.test}
    start = time.perf_counter()
    manifest = prepare(args.dataset, "synthetic", args.root, synthetic_sizes=sizes)
    directory = Path(args.root) / "prepared" / args.dataset
    size = sum((directory / f"{a}.npy").stat().st_size for a in ARRAYS)
    print(
        f"{args.dataset} synthetic {manifest['counts']}: {size / 1e9:.3f} GB in {directory} "
        f"(prepared or checked in {time.perf_counter() - start:.1f} s; kept)"
    )
    rows = measure(directory, args.rounds)
    print(
        f"\n{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{args.rounds} rounds, warm page cache; seconds to load all four arrays\n"
    )
    print("| way | load | median s | min s | GB/s (median) |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['way']} | {row['load']} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
            f"{size / 1e9 / row['median_s']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "dataset": args.dataset,
                    "counts": manifest["counts"],
                    "bytes": size,
                    "cpu": cpu_name(),
                    "cpus": os.cpu_count(),
                    "rows": rows,
                    "official_counts": DATASETS[args.dataset].counts,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
