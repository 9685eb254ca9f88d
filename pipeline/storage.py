"""Where a run's bytes live when it shares no disk with its launcher.

One small object-store interface (`S3Store` over boto3 for any S3-compatible service,
`LocalStore` over a directory) and three uses of it (docs/ARCHITECTURE.md, "Remote storage"):

* data staging: prepared datasets are content-addressed in DVC's remote layout, so `dvc push`
  and `push_dataset` write the same objects and `stage_dataset` fetches them by hash into local
  scratch once, verified (md5 per file as DVC does, then the manifest's sha256s);
* checkpoints: `S3CheckpointStore` uploads a checkpoint completely, verifies it, then publishes
  it by writing a small pointer object last, so a reader never sees a partial checkpoint;
* results: `publish_result` copies a finished run's files to `<remote>/results/<run_hash>/`,
  `find_result` / `fetch_result` look a run up by hash (the store, then MLflow).

Credentials come only from boto3's standard chain (AWS_* variables, profiles, pod identity);
the endpoint from the caller (params.yaml `storage.endpoint_url`), else AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL / the profile. Every object we upload carries its sha256 as metadata, checked
after every download; a mismatch deletes the download and raises `IntegrityError`.
"""

import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vsgd.checkpoint import Candidate, Damaged, LocalCheckpointStore
from vsgd.files import file_digest, file_sha256_once, json_sha256, utc_stamp
from vsgd.tracking import mlflow_http_settings, tracking_uri

from .contract import ENDPOINT_ENV, RESULTS_ENV, SCRATCH_ENV

log = logging.getLogger(__name__)

SHA256_META = "sha256"              # object metadata key (x-amz-meta-sha256)
MiB = 1 << 20
DVC_PREFIX = "dvc"                  # the DVC remote is <storage.remote>/dvc
DVC_FILES = "files/md5"             # DVC 3's layout inside a remote
RESULTS_PREFIX = "results"
# A run's result files; metrics.json last: it marks the run done. beta1.csv: VSGD runs only;
# train.log (pipeline.train.LOG_NAME): the run's log, where the executor or the run kept one.
RESULT_FILES = ("config.json", "curve.csv", "beta1.csv", "train.log", "metrics.json")


class IntegrityError(Exception):
    """Downloaded bytes differ from the hash they were stored under."""


# -- object stores ---------------------------------------------------------------------------

def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> ("bucket", "a/b")."""
    if not uri.startswith("s3://") or not uri[5:].split("/")[0]:
        raise ValueError(f"not an s3://bucket[/prefix] URI: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def endpoint_from_env() -> str | None:
    return os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client (thread-safe, cached per endpoint) with retries and backoff.

    botocore's `standard` mode retries throttling, 5xx and connection errors with
    exponential backoff and jitter; AWS_RETRY_MODE / AWS_MAX_ATTEMPTS override it.
    """
    import boto3
    from botocore.config import Config
    endpoint = endpoint_url or endpoint_from_env()
    config = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                 "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))},
        connect_timeout=10, read_timeout=120,
        # Self-hosted stores (MinIO, SeaweedFS, Ceph, moto) rarely resolve bucket subdomains.
        s3={"addressing_style": "path"} if endpoint else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig
    # Multipart above 64 MiB (checkpoints, dataset arrays): parts retry individually.
    return TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB,
                          max_concurrency=4)


class S3Store:
    """Objects under `s3://bucket/prefix`; keys are relative to the prefix."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(uri)
        self.client = s3_client(endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unless_missing(self, call, key: str):
        """`call(Bucket=, Key=)` for `key`; None if the object does not exist."""
        from botocore.exceptions import ClientError
        try:
            return call(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def put_file(self, key: str, path) -> str:
        digest = file_digest(path)
        self.client.upload_file(str(path), self.bucket, self._key(key),
                                ExtraArgs={"Metadata": {SHA256_META: digest}},
                                Config=_transfer_config())
        return digest

    def put_bytes(self, key: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key),
                                   ExtraArgs={"Metadata": {SHA256_META: digest}},
                                   Config=_transfer_config())
        return digest

    def head(self, key: str) -> dict | None:
        """`{"size", "sha256"}` of an object (sha256 None if not uploaded by us); None if absent."""
        r = self._unless_missing(self.client.head_object, key)
        if r is None:
            return None
        return {"size": r["ContentLength"], "sha256": r.get("Metadata", {}).get(SHA256_META)}

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def get_file(self, key: str, dest) -> None:
        """Download to `dest` (atomically), verified against the stored sha256."""
        info = self.head(key)
        if info is None:
            raise FileNotFoundError(f"{self.uri}/{key} does not exist")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp,
                                      Config=_transfer_config())
            _verify(f"{self.uri}/{key}", info["sha256"], file_digest(tmp))
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, verified; None if it does not exist. One GET, so the
        metadata and the body belong to the same version of a replaced key."""
        r = self._unless_missing(self.client.get_object, key)
        if r is None:
            return None
        data = r["Body"].read()
        _verify(f"{self.uri}/{key}", r.get("Metadata", {}).get(SHA256_META),
                hashlib.sha256(data).hexdigest())
        return data

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self._key("")
        keys = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix))
        for page in pages:
            keys.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


class LocalStore:
    """The same interface over a directory (a local DVC remote, tests, the embedded default).
    Writes are atomic (temp file + rename); there is no transfer to verify."""

    def __init__(self, root):
        root = str(root)
        self.root = Path(root[len("file://"):] if root.startswith("file://") else root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, key: str, path) -> str:
        with open(path, "rb") as src:
            self._write(key, lambda dst: shutil.copyfileobj(src, dst, 4 * MiB))
        return file_digest(path)

    def put_bytes(self, key: str, data: bytes) -> str:
        self._write(key, lambda dst: dst.write(data))
        return hashlib.sha256(data).hexdigest()

    def _write(self, key: str, fill) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def head(self, key: str) -> dict | None:
        path = self._path(key)
        return {"size": path.stat().st_size, "sha256": None} if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_file(self, key: str, dest) -> None:
        if not self.exists(key):
            raise FileNotFoundError(f"{self.uri}/{key} does not exist")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(self._path(key), tmp)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def list_keys(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def open_store(uri: str, endpoint_url: str | None = None):
    """`s3://bucket/prefix` -> S3Store, a directory or file:// URI -> LocalStore."""
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url)
    return LocalStore(uri)


def _verify(what: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise IntegrityError(f"{what}: content hash {actual} differs from the stored "
                             f"{expected}; the download was discarded (corrupted or "
                             f"tampered object, upload it again)")


# -- checkpoints -----------------------------------------------------------------------------

class S3CheckpointStore:
    """The checkpoint-store protocol (vsgd.checkpoint) over an object store.

    `save` uploads `checkpoint-<sha256>.pt` (complete: a PUT or a completed multipart upload
    is all or nothing), checks its size and hash in the store, then publishes it by replacing
    the small pointer object `LATEST.json`: `{key, sha256, size, previous}`, where `previous`
    names the checkpoint it replaces (`{key, sha256, size}` or null). A reader (or a process
    killed at any moment) sees the previous checkpoint or the new one. The previous object is
    kept, for a reader that read the old pointer a moment ago and to resume from when the
    newest turns out damaged; older ones are deleted.

    `candidates()`: the pointer's checkpoint, its previous one, then any other
    `checkpoint-<sha256>.pt` (a pointer that names no previous one, or none left), each read
    and checked against its sha256 (`vsgd.checkpoint.Damaged` when it differs or the object
    is missing). `set_aside` copies a damaged object as it is to
    `damaged/<key>.<UTC timestamp>` and removes it from where it was (S3 has no rename: a
    move), then takes it out of the pointer, which then names the one before it. `load()`
    is the pointer's checkpoint, verified (`IntegrityError`), with no fallback.
    """

    POINTER = "LATEST.json"
    DAMAGED = "damaged"                 # prefix of what set_aside keeps
    KEY = re.compile(r"checkpoint-([0-9a-f]{64})\.pt")

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.uri = uri.rstrip("/")
        self.store = open_store(uri, endpoint_url)

    def _pointer(self) -> dict | None:
        raw = self.store.get_bytes(self.POINTER)
        return json.loads(raw) if raw is not None else None

    def load(self) -> bytes | None:
        pointer = self._pointer()
        if pointer is None:
            return None
        data = self.store.get_bytes(pointer["key"])
        if data is None:
            raise IntegrityError(f"{self.uri}/{self.POINTER} names {pointer['key']}, which "
                                 f"does not exist")
        _verify(f"{self.uri}/{pointer['key']}", pointer["sha256"],
                hashlib.sha256(data).hexdigest())
        return data

    def save(self, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        key = f"checkpoint-{digest}.pt"
        self.store.put_bytes(key, data)
        info = self.store.head(key)
        if info is None or info["size"] != len(data) or info["sha256"] not in (None, digest):
            raise IntegrityError(f"{self.uri}/{key}: the store holds {info} after the upload "
                                 f"of {len(data)} bytes with sha256 {digest}; not published")
        try:
            current, before = self._entries(self._pointer())
        except (ValueError, IntegrityError):  # a damaged pointer names nothing worth keeping
            current = before = None
        # Saving the same bytes again keeps the checkpoint before them as the previous one.
        previous = before if current is not None and current["key"] == key else current
        self._publish({"key": key, "sha256": digest, "size": len(data)}, previous)
        keep = {key, previous["key"] if previous else None}
        for old in self.store.list_keys("checkpoint-"):
            if old not in keep:
                self.store.delete(old)

    def _publish(self, entry: dict | None, previous: dict | None) -> None:
        """Point LATEST.json at `entry`, with `previous` as the one before it."""
        if entry is None:  # nothing left to name
            self.store.delete(self.POINTER)
            return
        self.store.put_bytes(self.POINTER, json.dumps({**entry, "previous": previous}).encode())

    def _entries(self, pointer) -> tuple[dict | None, dict | None]:
        """The pointer's checkpoint and the one before it, `{key, sha256, size}` or None;
        ValueError for a pointer that is not one."""
        if pointer is None:
            return None, None
        if not isinstance(pointer, dict):
            raise ValueError(f"{self.POINTER} is not a checkpoint pointer: {pointer!r}")
        previous = pointer.get("previous")  # pointers of older versions have none
        return self._entry(pointer), None if previous is None else self._entry(previous)

    def _entry(self, entry) -> dict:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or \
                not isinstance(entry.get("sha256"), str):
            raise ValueError(f"{self.POINTER} does not name a checkpoint: {entry!r}")
        return {k: entry.get(k) for k in ("key", "sha256", "size")}

    def candidates(self) -> list[Candidate]:
        out = []
        try:
            named = [e for e in self._entries(self._pointer()) if e is not None]
        except (ValueError, IntegrityError) as exc:
            named = []
            out.append(Candidate(f"{self.uri}/{self.POINTER}",
                                 functools.partial(_damaged, str(exc)), self.POINTER))
        keys = {e["key"] for e in named}
        for key in self.store.list_keys("checkpoint-"):
            match = self.KEY.fullmatch(key)
            if match and key not in keys:  # content-addressed: the name holds the sha256
                named.append({"key": key, "sha256": match[1], "size": None})
                keys.add(key)
        seen = set()
        for entry in named:
            if entry["key"] not in seen:
                seen.add(entry["key"])
                out.append(Candidate(f"{self.uri}/{entry['key']}",
                                     functools.partial(self._read, entry), entry))
        return out

    def _read(self, entry: dict) -> bytes:
        where = f"{self.uri}/{entry['key']}"
        try:
            data = self.store.get_bytes(entry["key"])
        except IntegrityError as exc:  # differs from the sha256 stored with it
            raise Damaged(str(exc)) from exc
        if data is None:
            raise Damaged(f"{where} does not exist")
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry["sha256"]:
            raise Damaged(f"{where}: content hash {actual} differs from its recorded "
                          f"{entry['sha256']}")
        return data

    def set_aside(self, candidate: Candidate, reason: str) -> str | None:
        key = self.POINTER if candidate.ref == self.POINTER else candidate.ref["key"]
        dest = f"{self.DAMAGED}/{key}.{utc_stamp()}"
        kept = self._move(key, dest)
        if key == self.POINTER:
            return kept
        try:
            current, previous = self._entries(self._pointer())
        except (ValueError, IntegrityError):
            return kept  # a damaged pointer is a candidate of its own, set aside in its turn
        if current is not None and current["key"] == key:
            self._publish(previous, None)
        elif previous is not None and previous["key"] == key:
            self._publish(current, None)
        return kept

    def _move(self, key: str, dest: str) -> str | None:
        """Copy object `key` as it is (`get_bytes` would refuse one that no longer matches
        its sha256) to `dest`, then delete `key`; the copy's URI, None if `key` is gone."""
        if not self.store.exists(key):
            return None
        if isinstance(self.store, S3Store):
            self.store.client.copy({"Bucket": self.store.bucket, "Key": self.store._key(key)},
                                   self.store.bucket, self.store._key(dest),
                                   Config=_transfer_config())
        else:
            self.store.put_file(dest, self.store._path(key))
        self.store.delete(key)
        return f"{self.store.uri}/{dest}"

    def __repr__(self):
        return f"S3CheckpointStore({self.uri!r})"


def _damaged(reason: str) -> bytes:
    raise Damaged(reason)


def open_checkpoint_store(uri: str, endpoint_url: str | None = None):
    """A run spec's `checkpoint`: an `s3://` URI or a local directory."""
    if uri.startswith("s3://"):
        return S3CheckpointStore(uri, endpoint_url)
    return LocalCheckpointStore(uri)


# -- datasets in DVC's remote layout ---------------------------------------------------------

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
            entries.append({"md5": _cached_md5(str(path), st.st_size, st.st_mtime_ns),
                            "relpath": path.relative_to(root).as_posix()})
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
    return Path(os.environ.get(SCRATCH_ENV) or
                Path.home() / ".cache" / "vsgd-repro" / "data").expanduser()


def stage_dataset(uri: str, checksum: str | None = None, *, scratch=None,
                  endpoint_url: str | None = None) -> Path:
    """The local directory of the dataset at `uri` (see `dataset_uri`), fetched once into
    `<scratch>/<md5>` and verified: each file's md5 against the `.dir` listing, each array's
    sha256 against manifest.json, and the manifest checksum against `checksum` (the spec's
    `data.checksum`). Concurrent runs on one machine fetch it once (file lock). A copy
    staged before is only checked for its files and checksum here, not hashed again: the
    run's `vsgd.data.load_prepared` verifies every array's sha256 as it reads it."""
    remote, dir_hash = split_dataset_uri(uri)
    root = Path(scratch) if scratch else scratch_root()
    dest = root / dir_hash[:-len(".dir")]
    if dest.is_dir():
        _check_manifest(dest, checksum, rehash=False)
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_dir():  # another run staged it while we waited
            _check_manifest(dest, checksum, rehash=False)
            return dest
        _fetch_tree(open_store(remote, endpoint_url), dir_hash, uri, root, dest, checksum)
    log.info("staged %s into %s", uri, dest)
    return dest


def _fetch_tree(store, dir_hash: str, uri: str, root: Path, dest: Path, checksum) -> None:
    listing = store.get_bytes(_object_key(dir_hash))
    if listing is None:
        raise FileNotFoundError(f"{uri} is not in the store; push the prepared dataset "
                                f"first (`dvc push`, docs/remote.md)")
    _verify(uri, dir_hash[:-len(".dir")], hashlib.md5(listing).hexdigest())
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=root))
    try:
        for entry in json.loads(listing):
            path = tmp / entry["relpath"]
            store.get_file(_object_key(entry["md5"]), path)
            _verify(f"{uri}: {entry['relpath']} ({_object_key(entry['md5'])})", entry["md5"],
                    file_digest(path, "md5"))
        _check_manifest(tmp, checksum, rehash=True)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_manifest(directory: Path, checksum: str | None, *, rehash: bool) -> None:
    """A staged dataset is the one the spec was built for (and intact, with `rehash`)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    files = manifest["files"]
    if json_sha256(files) != manifest["checksum"]:
        raise IntegrityError(f"{directory}/manifest.json: checksum does not match its files")
    if checksum is not None and manifest["checksum"] != checksum:
        raise IntegrityError(f"{directory}: dataset checksum {manifest['checksum']} is not "
                             f"the spec's data.checksum {checksum}")
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


# -- results ---------------------------------------------------------------------------------

def results_uri(remote: str, run_hash: str) -> str:
    return f"{remote.rstrip('/')}/{RESULTS_PREFIX}/{run_hash}"


def run_env(params: dict, spec: dict) -> dict:
    """What a run started on this machine needs in its environment to use the remote store
    of params.yaml: where to publish its results and, for an S3-compatible service, the
    endpoint (a run reads its checkpoint and data URIs from the spec, the endpoint from
    here). Empty without `storage.remote`."""
    remote = params["storage"]["remote"]
    if not remote:
        return {}
    env = {RESULTS_ENV: results_uri(remote, spec["run_hash"])}
    if params["storage"].get("endpoint_url"):
        env[ENDPOINT_ENV] = params["storage"]["endpoint_url"]
    return env


def publish_result(output_dir, uri: str | None = None,
                   endpoint_url: str | None = None) -> str | None:
    """Copy a finished run's files to `uri` (default: $VSGD_RESULTS_URI); None without one.
    metrics.json goes last: a result with metrics.json is complete."""
    uri = uri or os.environ.get(RESULTS_ENV)
    if not uri:
        return None
    store = open_store(uri.rstrip("/"), endpoint_url)
    for name in RESULT_FILES:
        path = Path(output_dir) / name
        if path.is_file():
            store.put_file(name, path)
    return store.uri


@dataclass
class Result:
    run_hash: str
    source: str                  # "store" or "mlflow"
    location: str                # results URI or MLflow run id
    metrics: dict | None = None


def find_result(params: dict, spec: dict) -> Result | None:
    """A finished result of `spec`'s run hash: `<storage.remote>/results/<hash>/metrics.json`,
    else a FINISHED MLflow run tagged with the hash that holds metrics.json as an artifact."""
    remote, endpoint = params["storage"]["remote"], params["storage"].get("endpoint_url")
    if remote:
        uri = results_uri(remote, spec["run_hash"])
        raw = open_store(uri, endpoint).get_bytes("metrics.json")
        if raw is not None:
            # Anything there is the run's result, to be checked once fetched: a damaged one
            # is then set aside and the run trained again, not taken for "no result".
            try:
                metrics = json.loads(raw)
            except ValueError:
                metrics = None
            return Result(spec["run_hash"], "store", uri,
                          metrics if isinstance(metrics, dict) else None)
    return _find_in_mlflow(params, spec["run_hash"])


def _tracking_uri(params: dict) -> str | None:
    uri = tracking_uri(params["tracking"]["uri"])
    if uri is None:
        return None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None  # nothing tracked yet; opening it would create an empty database
    return uri


def _find_in_mlflow(params: dict, run_hash: str) -> Result | None:
    uri = _tracking_uri(params)
    if uri is None:
        return None
    from mlflow.tracking import MlflowClient
    try:
        with mlflow_http_settings():
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(params["tracking"]["experiment"])
            if exp is None:
                return None
            runs = client.search_runs([exp.experiment_id],
                                      f"tags.run_hash = '{run_hash}' and "
                                      f"attributes.status = 'FINISHED'",
                                      order_by=["attributes.end_time DESC"], max_results=5)
            for run in runs:
                if any(a.path == "metrics.json"
                       for a in client.list_artifacts(run.info.run_id)):
                    return Result(run_hash, "mlflow", run.info.run_id)
    except Exception as exc:  # noqa: BLE001 - a tracking outage only means "not known there"
        from .redact import redact
        log.warning("MLflow lookup of run %s failed (%s); treating it as not finished",
                    run_hash, redact(str(exc).splitlines()[0] if str(exc) else repr(exc)))
    return None


def fetch_result(params: dict, spec: dict, output_dir=None,
                 result: Result | None = None) -> Path:
    """Copy the finished result of `spec` (`result`, else looked up with `find_result`) into
    `output_dir` (default: the spec's); FileNotFoundError if there is none. The copy is not
    checked here: `pipeline.results` decides whether it is whole."""
    result = result or find_result(params, spec)
    if result is None:
        raise FileNotFoundError(f"no finished result for run {spec['run_hash']} "
                                f"({spec.get('name')}) in the store or MLflow")
    dest = Path(output_dir or spec["output_dir"])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as tmp:
        if result.source == "store":
            store = open_store(result.location, params["storage"].get("endpoint_url"))
            for name in RESULT_FILES:
                if store.exists(name):
                    store.get_file(name, Path(tmp) / name)
        else:
            import mlflow.artifacts
            for name in RESULT_FILES:
                try:
                    with mlflow_http_settings():
                        mlflow.artifacts.download_artifacts(
                            run_id=result.location, artifact_path=name, dst_path=tmp,
                            tracking_uri=_tracking_uri(params))
                except Exception:  # noqa: BLE001 - curve/config are optional artifacts
                    if name == "metrics.json":
                        raise
        for name in RESULT_FILES:  # metrics.json last, as everywhere
            if (Path(tmp) / name).is_file():
                os.replace(Path(tmp) / name, dest / name)
    return dest
