"""One of the runs that share a GPU in `--gpu-check` (`sharing`), as its own process:

    python -m pipeline.doctor.worker '<json>'

with `{spec, training, warmup, seconds, ready, go}`: builds the configuration on synthetic
images (`vsgd.engine`), runs `warmup` steps (compiling, where the spec compiles), creates the
file `ready`, waits for the file `go` (so that every run's window overlaps the others'),
then runs training steps for `seconds` and prints one JSON line: `{steps, images, seconds,
images_per_sec}`.
"""

import json
import sys
import time
from pathlib import Path

import torch

from vsgd import engine
from vsgd.data import DATASETS
from vsgd.data.synthetic import generate

GO_TIMEOUT = 900.0  # a worker whose parent is gone does not wait forever
CHUNK = 5  # steps between clock reads on a GPU (each read waits for the device)


def main(argv) -> int:
    job = json.loads(argv[0])
    spec, training = job["spec"], job["training"]
    steps_per_epoch = 64
    data = synthetic_data(spec["dataset"], spec["batch_size"] * steps_per_epoch)
    run = engine.build(spec, training, data)
    state = engine.new_state(run)
    for _ in range(job["warmup"]):
        engine.train_step(run, state)
    _sync(run.device)
    Path(job["ready"]).touch()
    deadline = time.monotonic() + GO_TIMEOUT
    while not Path(job["go"]).exists():
        if time.monotonic() > deadline:
            print("no go signal", file=sys.stderr)
            return 1
        time.sleep(0.01)
    # On a GPU each clock read waits for the device: read it every CHUNK steps there.
    chunk = CHUNK if run.device.type == "cuda" else 1
    steps, start = 0, time.perf_counter()
    while True:
        for _ in range(chunk):
            engine.train_step(run, state)
        steps += chunk
        _sync(run.device)
        elapsed = time.perf_counter() - start
        if elapsed >= job["seconds"]:
            break
    images = steps * spec["batch_size"]
    print(
        json.dumps(
            {
                "steps": steps,
                "images": images,
                "seconds": elapsed,
                "images_per_sec": images / elapsed,
            }
        ),
        flush=True,
    )
    return 0


def synthetic_data(dataset: str, images: int):
    """`images` synthetic training images of the dataset's shape (one test image). Here, so
    that a worker imports only the library (it starts once per run it measures)."""
    return generate(DATASETS[dataset], {"train": images, "test": 1})


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
