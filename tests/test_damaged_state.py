"""State a run must neither trust nor die on: prepared data altered after `prepare` is refused
before training (hashed once per process, however many runs it builds), and a checkpoint
that cannot be read back is set aside, kept, with a warning, and the run resumes from the one
before it or from the start and ends bit-identical to a run never interrupted (local store
and S3)."""

import io
import json
import logging
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import crash_at, run_spec, untimed
from test_storage import BUCKET, s3  # noqa: F401 - the moto S3 server fixture
from test_trainer import ENV, VSGD, _same, beta1_csv, read_outputs

from pipeline import storage
from vsgd import checkpoint, trainer
from vsgd.checkpoint import LocalCheckpointStore, from_bytes, to_bytes
from vsgd.data import DataError, load_prepared, prepared
from vsgd.files import atomic_write

# Checkpoints at 2 and 4; the interrupted run dies at 5, after its last checkpoint.
RUN = dict(
    iterations=6,
    optimizer=VSGD,
    eval_every=3,
    checkpoint_every=2,
    batch_size=2,
    test_limit=4,
    eval_batch_size=4,
)
FINAL = ("step", "model", "optimizer", "scheduler", "rng", "data", "curve", "beta1")


def damage(data: bytes, kind: str) -> bytes:
    if kind == "a flipped bit":
        return flip_a_weight_bit(data)
    return {
        "truncated": data[: len(data) // 2],
        "zero-byte": b"",
        "garbage": bytes((i * 7919 + 13) % 256 for i in range(len(data))),
    }[kind]


def flip_a_weight_bit(data: bytes) -> bytes:
    """One bit flipped in the middle of the largest tensor: still a checkpoint torch.load
    reads without a word, holding another number."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    # A zip local file header: 30 bytes, then the name and the extra field.
    name_length, extra_length = struct.unpack_from("<HH", data, record.header_offset + 26)
    at = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster
    than threads that wait for each other (every run here, the reference too, uses it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted run of RUN (its spec, metrics and final checkpoint) and the two
    checkpoints (steps 2 and 4) of one that died at step 5: the state to damage."""
    root = tmp_path_factory.mktemp("reference")
    ref = run_spec(data_root, root / "ref", **RUN)
    metrics = trainer.train(ref, checkpoint_store=LocalCheckpointStore(ref["checkpoint"]))
    died = run_spec(data_root, root / "died", **RUN)
    store = LocalCheckpointStore(died["checkpoint"])
    checkpoints = []

    def progress(step, total, info):
        if step == 3:  # the step-2 checkpoint is the newest now
            checkpoints.append(store.load())
        crash_at(5)(step, total, info)

    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(died, checkpoint_store=store, progress=progress)
    checkpoints.append(store.load())
    assert [from_bytes(c)["step"] for c in checkpoints] == [2, 4]
    final = from_bytes(LocalCheckpointStore(ref["checkpoint"]).load())
    return {"spec": ref, "metrics": metrics, "checkpoints": checkpoints, "final": final}


def resume_and_compare(reference, spec, store, first_step):
    """Run `spec` on `store` to the end: it must take the steps from `first_step` and end
    exactly as the uninterrupted reference did."""
    steps = []
    metrics = trainer.train(
        spec, checkpoint_store=store, progress=lambda step, total, info: steps.append(step)
    )
    assert steps == list(range(first_step, RUN["iterations"] + 1))
    assert untimed(metrics) == untimed(reference["metrics"])
    assert read_outputs(spec)[1] == read_outputs(reference["spec"])[1]
    assert beta1_csv(spec) == beta1_csv(reference["spec"])
    final = from_bytes(store.load())
    for key in FINAL:
        assert _same(final[key], reference["final"][key]), key


def set_aside_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "set aside as" in r.getMessage()
    ]


# -- prepared data -------------------------------------------------------------------------


def altered_copy(data_root, tmp_path) -> Path:
    """A copy of the prepared synthetic data whose train_x.npy has one byte flipped (after
    its header: a pixel), the manifest left as `prepare` wrote it."""
    shutil.copytree(
        Path(data_root) / "prepared" / "cifar100", tmp_path / "data" / "prepared" / "cifar100"
    )
    path = tmp_path / "data" / "prepared" / "cifar100" / "train_x.npy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return tmp_path / "data"


def test_an_altered_prepared_array_is_refused_before_training(data_root, tmp_path):
    spec = run_spec(altered_copy(data_root, tmp_path), tmp_path, iterations=1)
    with pytest.raises(DataError) as caught:
        trainer.train(spec)
    message = str(caught.value)
    assert "train_x.npy" in message and "differs from the data `prepare` wrote" in message
    assert "python -m pipeline prepare cifar100" in message
    assert "dvc repro prepare@cifar100" in message
    assert not Path(spec["output_dir"]).exists()  # nothing trained, nothing stored

    # The run's command fails with the message: the file, and how to prepare it again; a
    # configuration error's exit (no retry can help: a pod fails at once), no traceback.
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--spec", str(tmp_path / "spec.json")],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 78 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train_x.npy differs from the data" in proc.stderr, proc.stderr[-3000:]
    assert "python -m pipeline prepare cifar100" in proc.stderr
    assert not Path(spec["output_dir"], "metrics.json").exists()


def test_several_runs_in_one_process_hash_the_prepared_data_once(data_root, tmp_path, monkeypatch):
    """Counted, not timed: each array is hashed once per process (the timing stage builds
    every run of the grid in one), again only when its file changed; a pod's staging, which
    hashed what it fetched, leaves nothing for the run's load to hash."""
    directory = tmp_path / "data" / "prepared" / "cifar100"
    shutil.copytree(Path(data_root) / "prepared" / "cifar100", directory)  # new inodes
    hashed = []
    real = prepared._read_hashing

    def counting(f):
        hashed.append(Path(f.name).name)
        return real(f)

    monkeypatch.setattr(prepared, "_read_hashing", counting)
    for seed in (0, 1, 2):
        trainer.setup(run_spec(tmp_path / "data", tmp_path, seed=seed))
    assert sorted(hashed) == ["test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]

    hashed.clear()
    atomic_write(directory / "test_y.npy", (directory / "test_y.npy").read_bytes())
    trainer.setup(run_spec(tmp_path / "data", tmp_path))
    assert hashed == ["test_y.npy"]  # a file replaced since is hashed again

    staged = tmp_path / "staged"
    shutil.copytree(directory, staged)
    manifest = json.loads((staged / "manifest.json").read_text())
    hashed.clear()
    storage.datasets.check_manifest(staged, manifest["checksum"], rehash=True)
    load_prepared(staged)
    assert hashed == []


# -- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "garbage", "a flipped bit"])
def test_an_unreadable_checkpoint_is_set_aside_and_the_run_resumes_bit_identical(
    data_root, tmp_path, reference, caplog, kind
):
    spec = run_spec(data_root, tmp_path, **RUN)
    store = LocalCheckpointStore(spec["checkpoint"])
    for data in reference["checkpoints"]:
        store.save(data)
    damaged = damage(reference["checkpoints"][1], kind)
    if kind == "a flipped bit":  # only the records' CRC-32 tells
        assert from_bytes(damaged).keys() == from_bytes(reference["checkpoints"][1]).keys()
    store.path.write_bytes(damaged)

    with caplog.at_level(logging.WARNING):
        resume_and_compare(reference, spec, store, first_step=3)  # from the step-2 one
    [kept] = store.dir.glob("checkpoint.pt.damaged-*")
    assert kept.read_bytes() == damaged
    [warning] = set_aside_warnings(caplog)
    assert str(store.path) in warning and kept.name in warning


def test_with_every_checkpoint_unreadable_the_run_starts_over_and_ends_bit_identical(
    data_root, tmp_path, reference, caplog
):
    spec = run_spec(data_root, tmp_path, **RUN)
    store = LocalCheckpointStore(spec["checkpoint"])
    for data in reference["checkpoints"]:
        store.save(data)
    store.path.write_bytes(b"")
    store.previous.write_bytes(reference["checkpoints"][0][:100])

    with caplog.at_level(logging.WARNING):
        resume_and_compare(reference, spec, store, first_step=1)
    assert len(list(store.dir.glob("checkpoint.pt.damaged-*"))) == 1
    assert len(list(store.dir.glob(f"{checkpoint.PREVIOUS}.damaged-*"))) == 1
    assert len(set_aside_warnings(caplog)) == 2
    assert any("starts from step 0" in r.getMessage() for r in caplog.records)


def test_a_save_that_dies_midway_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    store = LocalCheckpointStore(tmp_path / "c")
    store.save(b"first")
    store.save(b"second")
    assert (store.load(), store.previous.read_bytes()) == (b"second", b"first")

    def dies(path, data):
        raise OSError("killed mid-write")

    monkeypatch.setattr("vsgd.checkpoint.atomic_write", dies)
    with pytest.raises(OSError):
        store.save(b"third")
    # Both names hold a complete checkpoint: the newest (now also the previous one).
    assert (store.load(), store.previous.read_bytes()) == (b"second", b"second")
    assert sorted(p.name for p in store.dir.iterdir()) == sorted(
        ["checkpoint.pt", checkpoint.PREVIOUS]
    )


def test_a_checkpoint_of_another_run_is_refused_not_set_aside(data_root, tmp_path, reference):
    """Not damage: another run's intact checkpoint means a wrong checkpoint location, and
    setting it aside would hide that run's progress."""
    spec = run_spec(data_root, tmp_path, **{**RUN, "seed": 1})
    store = LocalCheckpointStore(spec["checkpoint"])
    store.save(reference["checkpoints"][1])
    with pytest.raises(RuntimeError, match="belongs to run"):
        trainer.train(spec, checkpoint_store=store)
    assert sorted(p.name for p in store.dir.iterdir()) == ["checkpoint.pt"]


# -- checkpoints in S3 -------------------------------------------------------------------------


def _raw_put(store: storage.S3CheckpointStore, key: str, data: bytes, metadata: dict):
    """Replace an object behind the store's back (bit rot, a foreign tool)."""
    storage.s3_client().put_object(
        Bucket=BUCKET, Key=store.store._key(key), Body=data, Metadata=metadata
    )


@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "garbage"])
def test_an_unreadable_s3_checkpoint_is_set_aside_and_the_run_resumes_bit_identical(
    s3,  # noqa: F811 - the fixture imported from test_storage
    data_root,
    tmp_path,
    reference,
    caplog,
    request,
    kind,
):
    spec = run_spec(data_root, tmp_path, **RUN)
    spec["checkpoint"] = f"s3://{BUCKET}/{request.node.name}/checkpoints/{spec['run_hash']}"
    store = storage.open_checkpoint_store(spec["checkpoint"])
    for data in reference["checkpoints"]:
        store.save(data)
    newest = json.loads(store.store.get_bytes(store.POINTER))
    damaged = damage(reference["checkpoints"][1], kind)
    # Keeps its sha256 metadata: the download's own check finds the damage.
    _raw_put(store, newest["key"], damaged, {"sha256": newest["sha256"]})

    with caplog.at_level(logging.WARNING):
        resume_and_compare(reference, spec, store, first_step=3)
    [kept] = store.store.list_keys(f"{store.DAMAGED}/")
    assert kept.startswith(f"{store.DAMAGED}/{newest['key']}.")
    raw = storage.s3_client().get_object(Bucket=BUCKET, Key=store.store._key(kept))
    assert raw["Body"].read() == damaged
    [warning] = set_aside_warnings(caplog)
    assert newest["key"] in warning and kept in warning
    # The current and the previous checkpoint of the resumed run, nothing else.
    assert len(store.store.list_keys("checkpoint-")) == 2


def test_a_missing_or_garbage_s3_pointer_target_falls_back_to_the_previous_checkpoint(
    s3,  # noqa: F811 - the fixture imported from test_storage
    tmp_path,
    request,
    caplog,
):
    store = storage.open_checkpoint_store(f"s3://{BUCKET}/{request.node.name}")
    for step in (1, 2):
        store.save(to_bytes({"step": step}))
    pointer = json.loads(store.store.get_bytes(store.POINTER))
    store.store.delete(pointer["key"])  # named by the pointer, gone
    with caplog.at_level(logging.WARNING):
        saved, candidate = checkpoint.newest_intact(store, ("step",))
    assert saved["step"] == 1 and candidate.ref["key"] == pointer["previous"]["key"]
    assert (
        json.loads(store.store.get_bytes(store.POINTER))["key"] == pointer["previous"]["key"]
    )  # the pointer names what is left

    # A pointer that is not one is set aside too; the checkpoints are found by their names.
    store.store.put_bytes(store.POINTER, b"{not json")
    saved, _ = checkpoint.newest_intact(store, ("step",))
    assert saved["step"] == 1
    assert any(
        k.startswith(f"{store.DAMAGED}/{store.POINTER}.")
        for k in store.store.list_keys(f"{store.DAMAGED}/")
    )
    store.save(to_bytes({"step": 3}))
    assert from_bytes(store.load())["step"] == 3
