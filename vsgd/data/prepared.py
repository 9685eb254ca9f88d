"""`prepare`: official archive or synthetic source -> `<root>/prepared/<dataset>/`, once.

Layout and manifest are fixed by docs/ARCHITECTURE.md. The directory is built under a temporary
name next to its final place and renamed into place only when every file and the manifest are
written, so readers see either no dataset or a complete one. A re-run whose outputs are intact
(every file matches the sha256 in the manifest) returns the manifest without doing anything.
"""

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..files import CHUNK, file_digest, file_identity, hashed_before, json_sha256, note_hashed
from ..spec import SOURCES
from . import synthetic
from .download import fetch
from .errors import DataError
from .formats import ARRAY_FIELDS, Splits, read_archive
from .registry import DatasetInfo, get_dataset

log = logging.getLogger(__name__)

ARRAYS = tuple(name for name, _ in ARRAY_FIELDS)
# A prepared dataset as a run loads it: the arrays and the manifest.
Prepared = NamedTuple("Prepared", [*ARRAY_FIELDS, ("manifest", dict)])


def prepare(
    dataset: str,
    source: str,
    root,
    *,
    mirror: str | None = None,
    synthetic_sizes: dict | None = None,
    expected_md5: str | None = None,
) -> dict:
    """Make `<root>/prepared/<dataset>/` hold `dataset` from `source`; return its manifest.

    `mirror` replaces the base URL of the official archive (the file name is kept) and must
    serve the identical file. `expected_md5` replaces the official md5 and exists for tests
    that serve small stand-in archives; it is recorded in the manifest.
    `synthetic_sizes` ({"train": n, "test": m}) applies to the synthetic source only and
    defaults to the official split sizes.
    """
    info = get_dataset(dataset)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "synthetic" and (mirror or expected_md5):
        raise ValueError("mirror and expected_md5 apply to the official source only")
    if source == "official" and synthetic_sizes:
        raise ValueError("synthetic_sizes applies to the synthetic source only")
    root = Path(root)
    out = root / "prepared" / dataset

    if source == "official":
        url = (
            info.archive.url if mirror is None else f"{mirror.rstrip('/')}/{info.archive.filename}"
        )
        archive = {"url": url, "md5": expected_md5 or info.archive.md5}
        counts = None  # whatever the archive holds
    else:
        archive = None
        counts = _synthetic_sizes(info, synthetic_sizes)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent prepares of one dataset (several jobs on a shared volume) take turns; the
    # later ones then find the outputs intact.
    with open(out.parent / f".{dataset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_leftovers(out)
        current = _intact_manifest(out)
        if current is not None and _same_data(current, source, archive, counts):
            log.info("%s is prepared and intact; nothing to do", out)
            return current
        if out.exists():
            log.info("replacing %s (different source or damaged)", out)
        if source == "official":
            path = fetch(archive["url"], root / "downloads" / info.archive.filename, archive["md5"])
            log.info("converting %s", path)
            splits = read_archive(dataset, path)
            held = {"train": len(splits.train_y), "test": len(splits.test_y)}
            if held != info.counts:
                log.warning("%s holds %s images, the official archive %s", path, held, info.counts)
        else:
            log.info("generating synthetic %s: %s", dataset, counts)
            splits = synthetic.generate(info, counts)
        _check(info, splits)
        return _publish(out, info, source, archive, splits)


def _remove_leftovers(out: Path) -> None:
    """Work directories of a prepare that was killed (they are only ever made under the
    lock we now hold, so none of them belongs to a live process)."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for path in out.parent.glob(pattern):
            log.info("removing %s, left by an interrupted prepare", path)
            shutil.rmtree(path, ignore_errors=True)


def _same_data(manifest: dict, source: str, archive: dict | None, counts: dict | None) -> bool:
    if manifest["source"] != source:
        return False
    if source == "official":  # same archive bytes, whichever URL served them
        return (manifest["archive"] or {}).get("md5") == archive["md5"]
    return manifest["counts"] == counts


def _synthetic_sizes(info: DatasetInfo, sizes: dict | None) -> dict:
    sizes = dict(info.counts if sizes is None else sizes)
    if set(sizes) != {"train", "test"} or not all(
        isinstance(v, int) and v > 0 for v in sizes.values()
    ):
        raise ValueError(
            f"synthetic_sizes must be {{'train': n, 'test': m}} with positive integers, got {sizes}"
        )
    return sizes


def _check(info: DatasetInfo, s: Splits) -> None:
    """Reject conversions that do not look like the dataset, before anything is written."""
    shape = (info.image_size, info.image_size, 3)
    problems = []
    if len(s.classes) != info.num_classes:
        problems.append(f"{len(s.classes)} classes, expected {info.num_classes}")
    for name, x, y in (("train", s.train_x, s.train_y), ("test", s.test_x, s.test_y)):
        if x.dtype != np.uint8 or x.shape[1:] != shape or len(x) != len(y) or not len(x):
            problems.append(f"{name}: images {x.dtype}{x.shape}, {len(y)} labels")
        elif y.min() < 0 or y.max() >= info.num_classes:
            problems.append(f"{name}: labels outside [0, {info.num_classes})")
    if problems:
        raise DataError(f"converted {info.name} is not as expected: {'; '.join(problems)}")


def _publish(out: Path, info: DatasetInfo, source: str, archive: dict | None, s: Splits) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the data from other users/pods
        files = {}
        for name in ARRAYS:
            path = tmp / f"{name}.npy"
            np.save(path, getattr(s, name))
            files[path.name] = file_digest(path)
        manifest = {
            "dataset": info.name,
            "source": source,
            "counts": {"train": len(s.train_y), "test": len(s.test_y)},
            "classes": list(s.classes),
            "image_shape": [info.image_size, info.image_size, 3],
            "files": files,
            "archive": archive,
            "checksum": json_sha256(files),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        # A directory cannot atomically replace a non-empty one: move the old one aside
        # first. A crash between the two renames leaves no dataset, never a mixed one.
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
        log.info("prepared %s: %s", out, manifest["counts"])
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _intact_manifest(out: Path) -> dict | None:
    """The manifest of `out` if every file it lists is present with its sha256, else None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        files = manifest["files"]
        if set(files) != {f"{a}.npy" for a in ARRAYS}:
            return None
        for name, digest in files.items():
            if file_digest(out / name) != digest:
                log.warning("%s does not match its manifest", out / name)
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_prepared(directory) -> Prepared:
    """The arrays and manifest of a prepared dataset directory, verified before anything
    uses them: the manifest's checksum is that of its `files`, every array's bytes have the
    sha256 listed there, and shapes and dtypes agree with the manifest. Anything else is a
    `DataError` that names the file and how to prepare it again.

    Each array is hashed as it is read (one pass over the file, `_read_hashing`), and once
    per process: a file this process already hashed, with the same `file_identity` since
    (the timing stage builds many runs from one dataset; a pod's staging hashed the files
    it fetched), is only loaded. A file changed after `prepare` would otherwise be trained
    on, and its result stored under the run hash of the data the manifest describes."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{directory} is not a prepared dataset ({exc}); run "
            f"`python -m vsgd.data prepare` first"
        ) from exc
    files = _listed_files(directory, manifest)
    try:
        arrays = {
            a: _load_verified(directory / f"{a}.npy", files[f"{a}.npy"], manifest) for a in ARRAYS
        }
    except OSError as exc:
        raise DataError(
            f"{directory} is not a prepared dataset ({exc}); run "
            f"`python -m vsgd.data prepare` first"
        ) from exc
    shape = tuple(manifest["image_shape"])
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        n = manifest["counts"][split]
        if x.shape != (n, *shape) or y.shape != (n,) or x.dtype != np.uint8 or y.dtype != np.int64:
            raise DataError(
                f"{directory}: {split} arrays {x.dtype}{x.shape}/{y.dtype}{y.shape} "
                f"disagree with the manifest ({n} x {shape}); prepare it again"
            )
    return Prepared(**arrays, manifest=manifest)


def _listed_files(directory: Path, manifest: dict) -> dict:
    """The manifest's `files` ({name: sha256}), checked: every array listed, and the
    checksum (the one in run hashes) the digest of exactly these."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not {f"{a}.npy" for a in ARRAYS} <= set(files):
        raise DataError(
            f"{directory}/manifest.json does not list the sha256 of every array "
            f"({', '.join(f'{a}.npy' for a in ARRAYS)}). "
            f"{_prepare_again(directory, manifest)}"
        )
    if json_sha256(files) != manifest.get("checksum"):
        raise DataError(
            f"{directory}/manifest.json: its checksum {manifest.get('checksum')} "
            f"is not the sha256 of its files ({json_sha256(files)}): the manifest "
            f"was changed after `prepare`. {_prepare_again(directory, manifest)}"
        )
    return files


def _load_verified(path: Path, expected: str, manifest: dict) -> np.ndarray:
    """The array in `path`, whose bytes have the sha256 `expected` (else DataError)."""
    with open(path, "rb", buffering=0) as f:
        identity = file_identity(os.fstat(f.fileno()))
        if hashed_before(identity) == expected:
            return np.load(f, allow_pickle=False)
        try:
            array, digest = _read_hashing(f)
        except ValueError as exc:  # the header: not an array we wrote any more
            raise DataError(
                f"{path} is not a readable .npy array ({exc}). "
                f"{_prepare_again(path.parent, manifest)}"
            ) from exc
        if digest != expected:
            raise DataError(
                f"{path} differs from the data `prepare` wrote: its sha256 is "
                f"{digest}, manifest.json lists {expected}. "
                f"{_prepare_again(path.parent, manifest)}"
            )
        if file_identity(os.fstat(f.fileno())) == identity:  # else it changed while read
            note_hashed(identity, digest)
    return array


def _read_hashing(f) -> tuple[np.ndarray, str]:
    """The array of the .npy file `f` (at its start) and the sha256 of all of the file's
    bytes, in one pass: the data is read in chunks straight into the array's memory and
    each chunk hashed while it is in the CPU's cache. Hashing the file and then loading it
    reads it twice: 15-25% slower on Tiny ImageNet (benchmarks/data_verification.py)."""
    digest = hashlib.sha256()
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version}; prepare writes 1.0 or 2.0")
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects")
    header = f.tell()
    f.seek(0)
    digest.update(f.read(header))
    flat = np.empty(math.prod(shape), dtype)
    view = memoryview(flat).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + CHUNK])
        if not n:  # truncated: the digest of what is there cannot match
            break
        digest.update(view[done : done + n])
        done += n
    for block in iter(lambda: f.read(CHUNK), b""):  # bytes after the array: hashed as well
        digest.update(block)
    return flat.reshape(shape, order="F" if fortran else "C"), digest.hexdigest()


def _prepare_again(directory: Path, manifest) -> str:
    """How to get the prepared dataset back as `prepare` wrote it."""
    dataset = manifest.get("dataset", "<dataset>") if isinstance(manifest, dict) else "<dataset>"
    return (
        f"Prepare it again: `python -m pipeline prepare {dataset}` (in the DVC pipeline "
        f"`dvc repro prepare@{dataset}`; without params.yaml `python -m vsgd.data prepare "
        f"--dataset {dataset} --source <official|synthetic> --root <root>`), which "
        f"rewrites {directory}; a copy staged from the remote store (under $VSGD_SCRATCH, "
        f"by default ~/.cache/vsgd-repro/data) is fetched again once moved aside"
    )
