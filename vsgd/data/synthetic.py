"""A learnable stand-in for the real datasets (offline demos, CI): same shapes and classes.

Each class owns a smooth random colour pattern (a sum of a few low-frequency waves per
channel, periodic over the image). A sample is its class pattern, circularly shifted by up to
1/4 of the image side, with a random contrast gain, plus pixel noise. A linear model on
downsampled pixels reaches about half accuracy in a few hundred steps; the shifts leave
room for a shift-tolerant CNN to do better.
Everything is drawn from one seeded numpy generator, so the arrays are reproducible.
"""

import numpy as np

from .formats import Splits
from .registry import DatasetInfo

SEED = 0
WAVES = 4  # waves per channel and class
MAX_FREQ = 3  # cycles per image side
AMPLITUDE = 25.0  # pattern std in uint8 units
NOISE = 70.0  # pixel noise std in uint8 units
CHUNK = 4096  # samples generated at once, bounds the float32 scratch memory


def _patterns(rng: np.random.Generator, classes: int, size: int) -> np.ndarray:
    """(classes, size, size, 3) float32 zero-mean patterns with unit std."""
    grid = np.arange(size, dtype=np.float32) / size
    freq = rng.integers(-MAX_FREQ, MAX_FREQ + 1, size=(classes, 3, WAVES, 2))
    freq[..., 0] = np.abs(freq[..., 0])  # (fy, fx) and (-fy, -fx) are the same wave
    freq[(freq == 0).all(-1)] = (1, 0)  # no constant "waves": colour offsets come below
    phase = rng.uniform(0, 2 * np.pi, size=(classes, 3, WAVES, 1, 1))
    amp = rng.uniform(0.5, 1.0, size=(classes, 3, WAVES, 1, 1))
    arg = (
        2
        * np.pi
        * (freq[..., 0, None, None] * grid[:, None] + freq[..., 1, None, None] * grid[None, :])
        + phase
    )
    p = (amp * np.cos(arg)).sum(axis=2)  # (classes, 3, size, size)
    p /= p.std(axis=(1, 2, 3), keepdims=True)
    p += rng.normal(0, 0.25, size=(classes, 3, 1, 1))  # a per-class colour cast
    return p.transpose(0, 2, 3, 1).astype(np.float32)


def _samples(rng: np.random.Generator, patterns: np.ndarray, n: int):
    classes, size = patterns.shape[0], patterns.shape[1]
    y = rng.integers(0, classes, size=n).astype(np.int64)
    x = np.empty((n, size, size, 3), dtype=np.uint8)
    max_shift = size // 4
    idx = np.arange(size)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        shift = rng.integers(-max_shift, max_shift + 1, size=(m, 2))
        rows = (idx[None, :] + shift[:, :1]) % size
        cols = (idx[None, :] + shift[:, 1:]) % size
        img = patterns[y[start : start + m, None, None], rows[:, :, None], cols[:, None, :]]
        gain = rng.uniform(0.7, 1.3, size=(m, 1, 1, 1)).astype(np.float32)
        img = 127.5 + AMPLITUDE * gain * img
        img += rng.standard_normal(img.shape, dtype=np.float32) * NOISE
        x[start : start + m] = np.clip(np.rint(img), 0, 255)
    return x, y


def generate(info: DatasetInfo, sizes: dict, seed: int = SEED) -> Splits:
    """Synthetic train/test splits of `sizes["train"]` / `sizes["test"]` samples."""
    rng = np.random.default_rng([seed, info.num_classes, info.image_size])
    patterns = _patterns(rng, info.num_classes, info.image_size)
    train_x, train_y = _samples(rng, patterns, sizes["train"])
    test_x, test_y = _samples(rng, patterns, sizes["test"])
    classes = [f"synthetic_{i:03d}" for i in range(info.num_classes)]
    return Splits(train_x, train_y, test_x, test_y, classes)
