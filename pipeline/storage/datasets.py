"""Prepared datasets in DVC's remote layout (content-addressed, so `dvc push` and
`push_dataset` write the same objects), and a run's staging of one into local scratch, once,
verified.
"""

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from vsgd.files import file_digest, file_sha256_once, json_sha256

from ..contract import SCRATCH_ENV
from .objects import IntegrityError, open_store, verify_digest

log = logging.getLogger(__name__)

DVC_PREFIX = "dvc"  # the DVC remote is <storage.remote>/dvc
DVC_FILES = "files/md5"  # DVC 3's layout inside a remote


def dvc_remote(remote: str) -> str:
    """The DVC remote inside `storage.remote` (`dvc remote add` this URL)."""
    return f"{remote.rstrip('/')}/{DVC_PREFIX}"


def _object_key(md5: str) -> str:
    return f"{DVC_FILES}/{md5[:2]}/{md5[2:]}"


@functools.lru_cache(maxsize=256)
def _cached_md5(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path, "md5")


def dvc_tree(data_dir) -> list[dict]:
    """DVC 3's directory listing: `[{"md5", "relpath"}]` of every file, sorted by relpath."""
    root = Path(data_dir)
    entries = []
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            entries.append(
                {
                    "md5": _cached_md5(str(path), st.st_size, st.st_mtime_ns),
                    "relpath": path.relative_to(root).as_posix(),
                }
            )
    if not entries:
        raise FileNotFoundError(f"{root} holds no files (not prepared?)")
    return sorted(entries, key=lambda e: e["relpath"])


def _tree_bytes(entries: list[dict]) -> bytes:
    # Exactly dvc_data's Tree.as_bytes(): the `.dir` object's content and hash input.
    return json.dumps(entries, sort_keys=True).encode("utf-8")


def dvc_dir_hash(data_dir) -> str:
    """DVC's hash of a directory, e.g. `0a1b...ef.dir` (what dvc.lock records for it)."""
    return hashlib.md5(_tree_bytes(dvc_tree(data_dir))).hexdigest() + ".dir"


def dataset_uri(data_dir, remote: str) -> str:
    """A spec's `data.uri`: the URL of the dataset's `.dir` object in the DVC remote."""
    return f"{dvc_remote(remote)}/{_object_key(dvc_dir_hash(data_dir))}"


def split_dataset_uri(uri: str) -> tuple[str, str]:
    """`<dvc remote>/files/md5/ab/cdef.dir` -> (`<dvc remote>`, `abcdef.dir`)."""
    base, sep, rest = uri.rpartition(f"/{DVC_FILES}/")
    first, _, tail = rest.partition("/")
    if not sep or len(first) != 2 or not tail.endswith(".dir") or "/" in tail:
        raise ValueError(f"not a dataset URI (<dvc remote>/{DVC_FILES}/xx/<rest>.dir): {uri!r}")
    return base, first + tail


def push_dataset(data_dir, remote: str, endpoint_url: str | None = None) -> str:
    """Upload a prepared dataset as `dvc push` would (missing objects only, the `.dir`
    listing last so that whoever finds it finds every file); returns its `data.uri`."""
    entries = dvc_tree(data_dir)
    store = open_store(dvc_remote(remote), endpoint_url)
    for entry in entries:
        key = _object_key(entry["md5"])
        if not store.exists(key):
            store.put_file(key, Path(data_dir) / entry["relpath"])
    listing = _tree_bytes(entries)
    dir_hash = hashlib.md5(listing).hexdigest() + ".dir"
    store.put_bytes(_object_key(dir_hash), listing)
    return f"{store.uri}/{_object_key(dir_hash)}"


def scratch_root() -> Path:
    return Path(
        os.environ.get(SCRATCH_ENV) or Path.home() / ".cache" / "vsgd-repro" / "data"
    ).expanduser()


def stage_dataset(
    uri: str, checksum: str | None = None, *, scratch=None, endpoint_url: str | None = None
) -> Path:
    """The local directory of the dataset at `uri` (see `dataset_uri`), fetched once into
    `<scratch>/<md5>` and verified: each file's md5 against the `.dir` listing, each array's
    sha256 against manifest.json, and the manifest checksum against `checksum` (the spec's
    `data.checksum`). Concurrent runs on one machine fetch it once (file lock). A copy
    staged before is only checked for its files and checksum here, not hashed again: the
    run's `vsgd.data.load_prepared` verifies every array's sha256 as it reads it."""
    remote, dir_hash = split_dataset_uri(uri)
    root = Path(scratch) if scratch else scratch_root()
    dest = root / dir_hash[: -len(".dir")]
    if dest.is_dir():
        check_manifest(dest, checksum, rehash=False)
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_dir():  # another run staged it while we waited
            check_manifest(dest, checksum, rehash=False)
            return dest
        _fetch_tree(open_store(remote, endpoint_url), dir_hash, uri, root, dest, checksum)
    log.info("staged %s into %s", uri, dest)
    return dest


def _fetch_tree(store, dir_hash: str, uri: str, root: Path, dest: Path, checksum) -> None:
    listing = store.get_bytes(_object_key(dir_hash))
    if listing is None:
        raise FileNotFoundError(
            f"{uri} is not in the store; push the prepared dataset "
            f"first (`dvc push`, docs/remote.md)"
        )
    verify_digest(uri, dir_hash[: -len(".dir")], hashlib.md5(listing).hexdigest())
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=root))
    try:
        for entry in json.loads(listing):
            path = tmp / entry["relpath"]
            store.get_file(_object_key(entry["md5"]), path)
            verify_digest(
                f"{uri}: {entry['relpath']} ({_object_key(entry['md5'])})",
                entry["md5"],
                file_digest(path, "md5"),
            )
        check_manifest(tmp, checksum, rehash=True)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_manifest(directory: Path, checksum: str | None, *, rehash: bool) -> None:
    """A staged dataset is the one the spec was built for (and intact, with `rehash`)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    files = manifest["files"]
    if json_sha256(files) != manifest["checksum"]:
        raise IntegrityError(f"{directory}/manifest.json: checksum does not match its files")
    if checksum is not None and manifest["checksum"] != checksum:
        raise IntegrityError(
            f"{directory}: dataset checksum {manifest['checksum']} is not "
            f"the spec's data.checksum {checksum}"
        )
    for name, digest in files.items():
        path = directory / name
        # Hashed once per process: the run's `load_prepared` right after staging finds the
        # digests of the files just fetched and only loads them.
        if not path.is_file() or (rehash and file_sha256_once(path) != digest):
            raise IntegrityError(f"{path}: missing or its sha256 differs from manifest.json")


def stage_data(spec: dict, endpoint_url: str | None = None) -> str:
    """The local data directory of a run: staged from `data.uri` when set, else `data.dir`."""
    data = spec["data"]
    if not data.get("uri"):
        return data["dir"]
    return str(stage_dataset(data["uri"], data.get("checksum"), endpoint_url=endpoint_url))
