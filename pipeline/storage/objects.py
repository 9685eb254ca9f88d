"""Object stores: `S3Store` (boto3, any S3-compatible service) and `LocalStore` (a directory)
behind one small interface; every object carries its sha256, checked after every download
(`IntegrityError` on a mismatch).
"""

import functools
import hashlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from vsgd.files import file_digest

from ..contract import ENDPOINT_ENV

log = logging.getLogger(__name__)

SHA256_META = "sha256"  # object metadata key (x-amz-meta-sha256)
MiB = 1 << 20


class IntegrityError(Exception):
    """Downloaded bytes differ from the hash they were stored under."""


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
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10")),
        },
        connect_timeout=10,
        read_timeout=120,
        # Self-hosted stores (MinIO, SeaweedFS, Ceph, moto) rarely resolve bucket subdomains.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    # Multipart above 64 MiB (checkpoints, dataset arrays): parts retry individually.
    return TransferConfig(
        multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=4
    )


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
        self.client.upload_file(
            str(path),
            self.bucket,
            self._key(key),
            ExtraArgs={"Metadata": {SHA256_META: digest}},
            Config=transfer_config(),
        )
        return digest

    def put_bytes(self, key: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.client.upload_fileobj(
            io.BytesIO(data),
            self.bucket,
            self._key(key),
            ExtraArgs={"Metadata": {SHA256_META: digest}},
            Config=transfer_config(),
        )
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

        def download(tmp):
            self.client.download_file(self.bucket, self._key(key), tmp, Config=transfer_config())
            verify_digest(f"{self.uri}/{key}", info["sha256"], file_digest(tmp))

        write_atomically(dest, download)

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, verified; None if it does not exist. One GET, so the
        metadata and the body belong to the same version of a replaced key."""
        r = self._unless_missing(self.client.get_object, key)
        if r is None:
            return None
        data = r["Body"].read()
        verify_digest(
            f"{self.uri}/{key}",
            r.get("Metadata", {}).get(SHA256_META),
            hashlib.sha256(data).hexdigest(),
        )
        return data

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self._key("")
        keys = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        for page in pages:
            keys.extend(obj["Key"][len(base) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


class LocalStore:
    """The same interface over a directory (a local DVC remote, tests, the embedded default).
    Writes are atomic (temp file + rename); there is no transfer to verify."""

    def __init__(self, root):
        root = str(root)
        self.root = Path(root[len("file://") :] if root.startswith("file://") else root)
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
        write_atomically(dest, lambda tmp: shutil.copyfile(self._path(key), tmp))

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


def write_atomically(dest, fill) -> None:
    """`fill(tmp)` writes a temporary file beside `dest`, which then replaces `dest` whole; a
    fill that raises leaves `dest` as it was (and no temporary file)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        fill(tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def open_store(uri: str, endpoint_url: str | None = None):
    """`s3://bucket/prefix` -> S3Store, a directory or file:// URI -> LocalStore."""
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url)
    return LocalStore(uri)


def verify_digest(what: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise IntegrityError(
            f"{what}: content hash {actual} differs from the stored "
            f"{expected}; the download was discarded (corrupted or "
            f"tampered object, upload it again)"
        )
