"""The storage layer against a real S3-compatible server (moto's, in this process) and real
`dvc push` / `dvc pull`: integrity checks, atomic checkpoints, DVC-layout staging, results,
credential redaction."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import redact, storage
from pipeline.storage import IntegrityError

BUCKET = "vsgd-test"
DVC = str(Path(sys.executable).with_name("dvc"))
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-value",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port of 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    storage.s3_client.cache_clear()
    storage.s3_client().create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    storage.s3_client.cache_clear()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def prefix(request):
    """A fresh `s3://bucket/<test name>` per test."""
    return f"s3://{BUCKET}/{request.node.name}"


def _raw_put(uri_key: str, data: bytes, metadata=None):
    """Write an object behind the storage layer's back (a corrupted or foreign object)."""
    bucket, key = storage.split_s3(uri_key)
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {})


# -- object stores ---------------------------------------------------------------------------


def test_s3_store_round_trip_with_sha256_metadata(s3, prefix, tmp_path):
    store = storage.open_store(prefix)
    digest = store.put_bytes("a/b.txt", b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.head("a/b.txt") == {"size": 5, "sha256": digest}
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.get_bytes("missing") is None and store.head("missing") is None
    store.get_file("a/b.txt", tmp_path / "out" / "b.txt")
    assert (tmp_path / "out" / "b.txt").read_bytes() == b"hello"
    store.put_file("c.bin", tmp_path / "out" / "b.txt")
    assert store.list_keys() == ["a/b.txt", "c.bin"] and store.list_keys("a/") == ["a/b.txt"]
    store.delete("c.bin")
    assert not store.exists("c.bin")
    with pytest.raises(FileNotFoundError):
        store.get_file("c.bin", tmp_path / "x")


def test_large_objects_go_multipart_and_verify(s3, prefix, tmp_path, monkeypatch):
    from boto3.s3.transfer import TransferConfig

    mib = storage.MiB  # S3's smallest part is 5 MiB
    monkeypatch.setattr(
        storage.objects,
        "transfer_config",
        lambda: TransferConfig(
            multipart_threshold=5 * mib, multipart_chunksize=5 * mib, max_concurrency=2
        ),
    )
    data = os.urandom(12 * mib)
    (tmp_path / "big").write_bytes(data)
    store = storage.open_store(prefix)
    store.put_file("big", tmp_path / "big")
    bucket, key = storage.split_s3(f"{prefix}/big")
    etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts
    store.get_file("big", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data


def test_a_corrupted_object_is_refused_and_nothing_is_kept(s3, prefix, tmp_path):
    store = storage.open_store(prefix)
    digest = store.put_bytes("obj", b"original")
    _raw_put(f"{prefix}/obj", b"tampered", {"sha256": digest})
    with pytest.raises(IntegrityError, match="differs from the stored"):
        store.get_file("obj", tmp_path / "obj")
    with pytest.raises(IntegrityError):
        store.get_bytes("obj")
    assert list(tmp_path.iterdir()) == []  # the download (and its temp file) is gone


def test_local_store_has_the_same_interface(tmp_path):
    store = storage.open_store(f"file://{tmp_path}/root")
    store.put_bytes("x/y", b"1")
    (tmp_path / "f").write_bytes(b"2")
    store.put_file("z", tmp_path / "f")
    assert store.list_keys() == ["x/y", "z"] and store.get_bytes("x/y") == b"1"
    store.get_file("z", tmp_path / "g")
    assert (tmp_path / "g").read_bytes() == b"2" and store.head("z")["size"] == 1
    store.delete("z")
    assert store.get_bytes("z") is None


def test_client_retries_with_backoff_and_honours_the_endpoint(s3, monkeypatch):
    storage.s3_client.cache_clear()
    try:
        client = storage.s3_client("http://127.0.0.1:1")
        assert client.meta.endpoint_url == "http://127.0.0.1:1"
        assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 10}
        assert client.meta.config.s3["addressing_style"] == "path"
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
        monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
        assert storage.s3_client("http://127.0.0.1:2").meta.config.retries == {
            "mode": "adaptive",
            "total_max_attempts": 3,
        }
    finally:
        storage.s3_client.cache_clear()


# -- checkpoints -----------------------------------------------------------------------------


def test_s3_checkpoint_store_publishes_atomically(s3, prefix, monkeypatch):
    ckpt = storage.open_checkpoint_store(f"{prefix}/ckpt")
    assert isinstance(ckpt, storage.S3CheckpointStore) and ckpt.load() is None
    for i in range(4):
        ckpt.save(b"state %d" % i * 1000)
    assert ckpt.load() == b"state 3" * 1000
    # The current and the previous checkpoint are kept, older ones deleted.
    keys = ckpt.store.list_keys()
    assert len(keys) == 3 and "LATEST.json" in keys

    # An upload that fails leaves the published checkpoint in place, never a partial one.
    real_put = ckpt.store.put_bytes

    def failing_put(key, data):
        if key.startswith("checkpoint-"):
            raise ConnectionError("store went away mid-upload")
        return real_put(key, data)

    monkeypatch.setattr(ckpt.store, "put_bytes", failing_put)
    with pytest.raises(ConnectionError):
        ckpt.save(b"never published")
    assert ckpt.load() == b"state 3" * 1000

    # A published checkpoint that no longer matches its pointer is refused.
    pointer = json.loads(ckpt.store.get_bytes("LATEST.json"))
    _raw_put(f"{prefix}/ckpt/{pointer['key']}", b"garbage")
    with pytest.raises(IntegrityError):
        ckpt.load()


def test_open_checkpoint_store_local_dir(tmp_path):
    from vsgd.checkpoint import LocalCheckpointStore

    store = storage.open_checkpoint_store(str(tmp_path / "c"))
    assert isinstance(store, LocalCheckpointStore)


# -- datasets: DVC's layout, staging ---------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny prepared synthetic dataset."""
    from vsgd.data import prepare

    root = tmp_path_factory.mktemp("data")
    manifest = prepare("cifar100", "synthetic", root, synthetic_sizes={"train": 64, "test": 16})
    return root / "prepared" / "cifar100", manifest


def _dvc(repo, *args, env=None):
    out = subprocess.run(
        [DVC, *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _dvc_repo(path: Path, remote_url: str, endpoint: str) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    _dvc(path, "init", "-q")
    _dvc(path, "remote", "add", "-d", "store", remote_url)
    _dvc(path, "remote", "modify", "store", "endpointurl", endpoint)
    return path


def test_dvc_push_and_our_staging_agree_on_the_objects(s3, prefix, dataset, tmp_path):
    """`dvc push` of prepared data -> `stage_dataset` by hash; `push_dataset` -> `dvc pull`."""
    data_dir, manifest = dataset
    remote = f"{prefix}/remote"
    repo = _dvc_repo(tmp_path / "repo", storage.dvc_remote(remote), s3)
    shutil.copytree(data_dir, repo / "data")
    _dvc(repo, "add", "data")
    dvc_hash = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert storage.dvc_dir_hash(data_dir) == dvc_hash  # the same content address as DVC's
    _dvc(repo, "push")

    uri = storage.dataset_uri(data_dir, remote)
    assert uri.endswith(f"/dvc/files/md5/{dvc_hash[:2]}/{dvc_hash[2:]}")
    staged = storage.stage_dataset(uri, manifest["checksum"], scratch=tmp_path / "scratch")
    assert staged == tmp_path / "scratch" / dvc_hash[:-4]
    for f in data_dir.iterdir():
        assert (staged / f.name).read_bytes() == f.read_bytes()
    assert sorted(
        p.name for p in (tmp_path / "scratch").iterdir() if not p.name.startswith(".")
    ) == [staged.name]  # no temp dirs left

    # The other direction: our upload, then a fresh clone pulls it with DVC.
    other = f"{prefix}/other"
    assert storage.push_dataset(data_dir, other) == storage.dataset_uri(data_dir, other)
    clone = _dvc_repo(tmp_path / "clone", storage.dvc_remote(other), s3)
    shutil.copy(repo / "data.dvc", clone / "data.dvc")
    _dvc(clone, "pull")
    for f in data_dir.iterdir():
        assert (clone / "data" / f.name).read_bytes() == f.read_bytes()


def test_staging_reuses_the_local_copy(s3, prefix, dataset, tmp_path, monkeypatch):
    data_dir, manifest = dataset
    monkeypatch.setenv("VSGD_SCRATCH", str(tmp_path / "scratch"))
    uri = storage.push_dataset(data_dir, prefix)
    first = storage.stage_dataset(uri, manifest["checksum"])
    assert first.parent == tmp_path / "scratch"
    for key in storage.open_store(prefix).list_keys():  # the store is no longer needed
        storage.open_store(prefix).delete(key)
    assert storage.stage_dataset(uri, manifest["checksum"]) == first
    spec = {"data": {"dir": "nowhere", "checksum": manifest["checksum"], "uri": uri}}
    assert storage.stage_data(spec) == str(first)
    assert storage.stage_data({"data": {"dir": "here", "uri": None}}) == "here"


def test_a_wrong_checksum_on_a_staged_object_is_refused(s3, prefix, dataset, tmp_path):
    data_dir, manifest = dataset
    uri = storage.push_dataset(data_dir, prefix)
    tree = storage.dvc_tree(data_dir)
    victim = next(e for e in tree if e["relpath"] == "train_x.npy")
    key = f"{storage.dvc_remote(prefix)}/files/md5/{victim['md5'][:2]}/{victim['md5'][2:]}"
    corrupted = bytearray((data_dir / "train_x.npy").read_bytes())
    corrupted[-1] ^= 0xFF
    _raw_put(key, bytes(corrupted))  # as a foreign upload: no sha256 metadata, md5 catches it
    scratch = tmp_path / "scratch"
    with pytest.raises(IntegrityError, match="train_x.npy"):
        storage.stage_dataset(uri, manifest["checksum"], scratch=scratch)
    assert not [p for p in scratch.iterdir() if not p.name.endswith(".lock")]

    # Intact objects, but not the dataset the spec was built for.
    storage.push_dataset(data_dir, f"{prefix}/good")
    good = storage.dataset_uri(data_dir, f"{prefix}/good")
    with pytest.raises(IntegrityError, match="data.checksum"):
        storage.stage_dataset(good, "0" * 64, scratch=tmp_path / "scratch2")
    with pytest.raises(FileNotFoundError, match="dvc push"):
        storage.stage_dataset(good.replace("/good/", "/absent/"), None, scratch=scratch)


def test_dataset_uri_form():
    assert storage.split_dataset_uri("s3://b/p/dvc/files/md5/ab/cdef.dir") == (
        "s3://b/p/dvc",
        "abcdef.dir",
    )
    for bad in (
        "s3://b/p/dvc/files/md5/ab/cdef",
        "s3://b/p/abcdef.dir",
        "s3://b/files/md5/abc/def.dir",
    ):
        with pytest.raises(ValueError):
            storage.split_dataset_uri(bad)


# -- results ---------------------------------------------------------------------------------


def test_results_are_published_found_and_fetched(s3, prefix, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "curve.csv").write_text("step,test_acc\n1,0.5\n")
    (out / "metrics.json").write_text(json.dumps({"run_hash": "abc", "test_acc": 0.5}))
    params = {
        "storage": {"remote": prefix, "endpoint_url": None},
        "tracking": {"uri": f"sqlite:///{tmp_path}/none.db", "experiment": "x"},
    }
    spec = {"run_hash": "abc", "name": "r", "output_dir": str(tmp_path / "fetched")}
    assert storage.find_result(params, spec) is None
    assert storage.publish_result(out) is None  # no $VSGD_RESULTS_URI, no remote
    monkeypatch.setenv("VSGD_RESULTS_URI", storage.results_uri(prefix, "abc") + "/")
    storage.publish_result(out)
    found = storage.find_result(params, spec)
    assert found.source == "store" and found.metrics["test_acc"] == 0.5
    storage.fetch_result(params, spec)
    assert sorted(p.name for p in Path(spec["output_dir"]).iterdir()) == [
        "config.json",
        "curve.csv",
        "metrics.json",
    ]
    assert not Path(f"{tmp_path}/none.db").exists()  # the lookup created no tracking store
    with pytest.raises(FileNotFoundError):
        storage.fetch_result(params, {**spec, "run_hash": "other"})


# -- secrets ---------------------------------------------------------------------------------


def test_redaction_masks_credential_values_and_url_userinfo(monkeypatch, caplog):
    secret = "SENTINEL-sk-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-abcdefgh")
    text = f"key {secret} at https://user:pw@host/x and tok-abcdefgh"
    assert redact.redact(text) == "key *** at https://***@host/x and ***"

    handler = logging.StreamHandler(open(os.devnull, "w"))
    logger = logging.getLogger("redact-test")
    logger.addHandler(handler)
    redact.install(logger)
    record = logger.makeRecord(
        "redact-test", logging.INFO, __file__, 1, "secret %s", (secret,), None
    )
    assert handler.filter(record) and record.getMessage() == "secret ***"
    try:
        raise RuntimeError(f"failed with {secret}")
    except RuntimeError:
        record = logger.makeRecord(
            "redact-test", logging.ERROR, __file__, 1, "boom", (), sys.exc_info()
        )
    handler.filter(record)
    assert secret not in logging.Formatter().format(record)


def test_mlflow_lookups_retry_briefly_without_changing_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    with storage.results.mlflow_http_settings():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"  # the user's setting wins
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_an_uncaught_exception_is_logged_without_the_secret(tmp_path):
    secret = "SENTINEL-uncaught-5e8d2a"
    code = (
        "import logging; logging.basicConfig(); from pipeline import redact; "
        "redact.install(); import os; "
        "raise RuntimeError('bad key ' + os.environ['AWS_SECRET_ACCESS_KEY'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "AWS_SECRET_ACCESS_KEY": secret,
            "PYTHONPATH": str(Path(__file__).parents[1]),
        },
    )
    assert out.returncode == 1 and "RuntimeError: bad key ***" in out.stderr
    assert secret not in out.stderr


def test_staging_from_a_local_dvc_remote(dataset, tmp_path):
    data_dir, manifest = dataset
    uri = storage.push_dataset(data_dir, str(tmp_path / "remote"))
    assert uri == storage.dataset_uri(data_dir, str(tmp_path / "remote"))
    staged = storage.stage_dataset(uri, manifest["checksum"], scratch=tmp_path / "scratch")
    assert (staged / "train_x.npy").read_bytes() == (data_dir / "train_x.npy").read_bytes()
