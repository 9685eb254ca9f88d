"""Readers for the official archives, straight from the archive file into uint8 NHWC arrays.

Members are read from the tar/zip in place (no extracted tree on disk), so there is nothing to
clean up and nothing half-extracted can be mistaken for data. Any damage to the archive is
reported as `ArchiveError`.
"""

import io
import logging
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import ArchiveError

log = logging.getLogger(__name__)


# A dataset's four arrays: images uint8 (N, H, W, 3) and labels int64 (N,) of each split.
ARRAY_FIELDS = [
    ("train_x", np.ndarray),
    ("train_y", np.ndarray),
    ("test_x", np.ndarray),
    ("test_y", np.ndarray),
]
# What an official archive converts to: the arrays and the class names.
Splits = NamedTuple("Splits", [*ARRAY_FIELDS, ("classes", list)])


def read_archive(dataset: str, path: Path) -> Splits:
    reader = {"cifar100": read_cifar100, "tinyimagenet": read_tinyimagenet}[dataset]
    try:
        return reader(Path(path))
    except ArchiveError:
        raise
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        pickle.UnpicklingError,
        KeyError,
        ValueError,
    ) as exc:
        raise ArchiveError(
            f"{path} is corrupted, truncated or not the official "
            f"{dataset} archive ({type(exc).__name__}: {exc}); delete it and "
            f"run prepare again"
        ) from exc


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold only dicts, lists, strings and numpy arrays; refusing every other
    global keeps a tampered archive from running code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in pickle")
        return super().find_class(module, name)


def _unpickle(tar: tarfile.TarFile, member: str) -> dict:
    f = tar.extractfile(member)
    if f is None:
        raise ArchiveError(f"{member} is not a regular file in the archive")
    # Python 2 pickles: latin1 turns their byte strings into str keys and keeps array bytes.
    return _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()


def read_cifar100(path: Path) -> Splits:
    with tarfile.open(path, "r:gz") as tar:
        meta = _unpickle(tar, "cifar-100-python/meta")
        split = {}
        for name in ("train", "test"):
            d = _unpickle(tar, f"cifar-100-python/{name}")
            # Rows are 3072 bytes: the R plane, then G, then B, each 32x32 row-major.
            x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d["fine_labels"], dtype=np.int64)
            if len(x) != len(y):
                raise ArchiveError(f"{path}: {name} has {len(x)} images but {len(y)} labels")
            split[name] = (np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y)
    return Splits(*split["train"], *split["test"], list(meta["fine_label_names"]))


def _pil_image():
    """PIL.Image, imported on first use: only Tiny ImageNet's JPEGs need it, and the library
    alone (`pip install vsgd-repro`) does not install Pillow."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "converting Tiny ImageNet's JPEG images needs Pillow: "
            "pip install 'vsgd-repro[pipeline]'"
        ) from exc
    return Image


def _decode_jpeg(data: bytes, size: int) -> np.ndarray:
    with _pil_image().open(io.BytesIO(data)) as img:
        img = img.convert("RGB")  # a few Tiny ImageNet images are greyscale
        if img.size != (size, size):
            raise ArchiveError(f"image of size {img.size}, expected {size}x{size}")
        return np.asarray(img, dtype=np.uint8)


def read_tinyimagenet(path: Path, size: int = 64) -> Splits:
    _pil_image()  # before reading the archive: fail at once without Pillow
    root = "tiny-imagenet-200/"
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        # Labels follow the sorted wnids, as in the authors' loader and ImageFolder.
        wnids = sorted(zf.read(root + "wnids.txt").decode().split())
        label = {w: i for i, w in enumerate(wnids)}
        words = dict(
            line.split("\t", 1)
            for line in zf.read(root + "words.txt").decode().splitlines()
            if "\t" in line
        )
        classes = [words.get(w, w).strip() for w in wnids]

        train = sorted(
            n
            for n in names
            if n.startswith(root + "train/")
            and n.endswith(".JPEG")
            and n.split("/")[-2] == "images"
        )
        train_y = [label[n.split("/")[2]] for n in train]
        val = [
            line.split("\t")[:2]
            for line in zf.read(root + "val/val_annotations.txt").decode().splitlines()
            if line.strip()
        ]
        test = [root + "val/images/" + fname for fname, _ in val]
        test_y = [label[w] for _, w in val]
        missing = [n for n in test if n not in names]
        if missing:
            raise ArchiveError(
                f"{path}: {len(missing)} val images listed in "
                f"val_annotations.txt are missing, e.g. {missing[0]}"
            )

        def decode(members: list) -> np.ndarray:
            out = np.empty((len(members), size, size, 3), dtype=np.uint8)
            for i, n in enumerate(members):
                out[i] = _decode_jpeg(zf.read(n), size)
                if (i + 1) % 20_000 == 0:
                    log.info("decoded %d/%d images", i + 1, len(members))
            return out

        return Splits(
            decode(train),
            np.asarray(train_y, dtype=np.int64),
            decode(test),
            np.asarray(test_y, dtype=np.int64),
            classes,
        )
