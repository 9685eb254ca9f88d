"""Data step: download/verify/convert against a local HTTP server serving small archives in
the official formats, failure modes, idempotence, resume, and the synthetic source."""

import hashlib
import http.server
import io
import json
import pickle
import re
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vsgd.data import (
    DATASETS,
    ArchiveError,
    ChecksumError,
    DataError,
    DownloadError,
    load_prepared,
    prepare,
)
from vsgd.data.__main__ import main as cli_main
from vsgd.data.download import fetch

# ---------------------------------------------------------------- archives, official layout


class _Py2Pickler(pickle.Pickler):
    """Pickles arrays like the Python 2 cPickle that wrote the official files: the array bytes
    as a (latin1) string rather than a bytes object."""

    def reducer_override(self, obj):
        if not isinstance(obj, np.ndarray):
            return NotImplemented
        reconstruct, _, state = obj.__reduce__()
        return reconstruct, (np.ndarray, (0,), "b"), (*state[:4], obj.tobytes().decode("latin1"))


def py2_pickle(obj) -> bytes:
    out = io.BytesIO()
    _Py2Pickler(out, protocol=2).dump(obj)
    # ... and numpy's reconstructor under its old module name, as in the official files.
    return re.sub(rb"cnumpy\._core\.multiarray\n", b"cnumpy.core.multiarray\n", out.getvalue())


def cifar100_archive(n_train=60, n_test=20, seed=0):
    """cifar-100-python.tar.gz: pickled dicts train/test/meta as in the official tarball."""
    rng = np.random.default_rng(seed)
    names = [f"fine_{i}" for i in range(100)]
    splits = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name, payload):
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for split, n in (("train", n_train), ("test", n_test)):
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            fine = rng.integers(0, 100, size=n).tolist()
            splits[split] = (data, fine)
            add(
                split,
                py2_pickle(
                    {
                        "filenames": [f"img_{i}.png" for i in range(n)],
                        "batch_label": f"{split}ing batch 1 of 1",
                        "fine_labels": fine,
                        "coarse_labels": [f // 5 for f in fine],
                        "data": data,
                    }
                ),
            )
        add(
            "meta",
            py2_pickle(
                {
                    "fine_label_names": names,
                    "coarse_label_names": [f"coarse_{i}" for i in range(20)],
                }
            ),
        )
        add("file.txt~", b"")
    return buf.getvalue(), splits, names


def _jpeg(color, mode="RGB"):
    out = io.BytesIO()
    Image.new(mode, (64, 64), color).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _class_color(label):
    return (label % 256, (label * 7) % 256, 255 - label % 256)


def tinyimagenet_archive(per_class=1, n_val=20):
    """tiny-imagenet-200.zip: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt,
    test/images, wnids.txt (unsorted), words.txt (a superset). Each image is a flat colour
    that encodes its label in sorted-wnid order; one training image is greyscale."""
    wnids = [f"n{(i * 7919) % 100000:08d}" for i in range(200)]  # not in sorted order
    order = {w: i for i, w in enumerate(sorted(wnids))}
    root = "tiny-imagenet-200/"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(root + "wnids.txt", "\n".join(wnids) + "\n")
        zf.writestr(
            root + "words.txt",
            "n99999999\tunused entry\n" + "".join(f"{w}\tthing {w}, other name\n" for w in wnids),
        )
        for w in wnids:
            zf.writestr(f"{root}train/{w}/{w}_boxes.txt", "")
            for k in range(per_class):
                image = _jpeg(0, "L") if order[w] == k == 0 else _jpeg(_class_color(order[w]))
                zf.writestr(f"{root}train/{w}/images/{w}_{k}.JPEG", image)
        val_labels = [wnids[(5 * i) % 200] for i in range(n_val)]
        lines = []
        for i, w in enumerate(val_labels):
            zf.writestr(f"{root}val/images/val_{i}.JPEG", _jpeg(_class_color(order[w])))
            lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
        zf.writestr(root + "val/val_annotations.txt", "\n".join(lines) + "\n")
        zf.writestr(root + "test/images/test_0.JPEG", _jpeg((1, 2, 3)))
    return buf.getvalue(), wnids, [order[w] for w in val_labels]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ------------------------------------------------------------------- HTTP server with Range


class Server:
    """Serves `files` (name -> bytes); honours `Range: bytes=N-` unless `ranges` is False; can
    cut the first response for a name after `drop_after[name]` bytes; records requests."""

    def __init__(self):
        self.files, self.drop_after, self.requests, self.ranges = {}, {}, [], True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                header = self.headers.get("Range")
                if header and server.ranges:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                cut = server.drop_after.pop(name, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def gets(self, name):
        return [r for n, r in self.requests if n == name]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


CIFAR = "cifar-100-python.tar.gz"
TINY = "tiny-imagenet-200.zip"


def leftovers(root: Path):
    """Anything prepare may leave besides finished datasets and its lock files."""
    prepared = root / "prepared"
    return (
        sorted(p.name for p in prepared.iterdir() if not p.name.endswith(".lock"))
        if prepared.exists()
        else []
    )


# ------------------------------------------------------------------------------- official


def test_cifar100_download_convert_and_idempotence(server, tmp_path):
    data, splits, names = cifar100_archive()
    server.files[CIFAR] = data
    m = prepare("cifar100", "official", tmp_path, mirror=server.url + "/", expected_md5=md5(data))
    out = tmp_path / "prepared" / "cifar100"
    assert m["dataset"] == "cifar100" and m["source"] == "official"
    assert m["counts"] == {"train": 60, "test": 20}
    assert m["classes"] == names and m["image_shape"] == [32, 32, 3]
    assert m["archive"] == {"url": f"{server.url}/{CIFAR}", "md5": md5(data)}
    files = {
        f"{a}.npy": hashlib.sha256((out / f"{a}.npy").read_bytes()).hexdigest()
        for a in ("train_x", "train_y", "test_x", "test_y")
    }
    assert m["files"] == files
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"))
    assert m["checksum"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == m

    p = load_prepared(out)
    for split in ("train", "test"):
        raw, fine = splits[split]
        x, y = getattr(p, f"{split}_x"), getattr(p, f"{split}_y")
        assert x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(y, fine)
    assert p.manifest == m

    # Intact outputs: nothing is fetched or rewritten.
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert prepare("cifar100", "official", tmp_path, mirror=server.url, expected_md5=md5(data)) == m
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes
    assert len(server.gets(CIFAR)) == 1

    # Damaged outputs are rebuilt from the verified archive already on disk.
    (out / "test_y.npy").write_bytes(b"garbage")
    assert prepare("cifar100", "official", tmp_path, mirror=server.url, expected_md5=md5(data)) == m
    assert len(server.gets(CIFAR)) == 1
    assert leftovers(tmp_path) == ["cifar100"]


def test_tinyimagenet_download_convert(server, tmp_path):
    data, wnids, val_labels = tinyimagenet_archive()
    server.files[TINY] = data
    m = prepare("tinyimagenet", "official", tmp_path, mirror=server.url, expected_md5=md5(data))
    assert m["counts"] == {"train": 200, "test": 20} and m["image_shape"] == [64, 64, 3]
    sorted_wnids = sorted(wnids)
    assert m["classes"] == [f"thing {w}, other name" for w in sorted_wnids]
    p = load_prepared(tmp_path / "prepared" / "tinyimagenet")
    assert p.train_x.shape == (200, 64, 64, 3) and p.test_x.shape == (20, 64, 64, 3)
    np.testing.assert_array_equal(np.sort(p.train_y), np.arange(200))
    np.testing.assert_array_equal(p.test_y, val_labels)
    for x, y in [(p.train_x[i], p.train_y[i]) for i in range(1, 200, 37)] + list(
        zip(p.test_x, p.test_y)
    ):
        # Flat colours survive JPEG up to a few levels.
        assert np.abs(x.reshape(-1, 3).mean(0) - _class_color(int(y))).max() < 4
    grey = p.train_x[p.train_y == 0][0]  # the greyscale JPEG became 3 equal channels
    assert grey.shape == (64, 64, 3) and grey.max() < 4


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    data, _, _ = cifar100_archive()
    server.files[CIFAR] = data
    with pytest.raises(ChecksumError, match="md5"):
        prepare("cifar100", "official", tmp_path, mirror=server.url)  # official md5
    assert leftovers(tmp_path) == []
    assert list((tmp_path / "downloads").iterdir()) == []


@pytest.mark.parametrize(
    "dataset,damage",
    [
        ("cifar100", "truncated"),
        ("cifar100", "corrupted"),
        ("tinyimagenet", "truncated"),
        ("tinyimagenet", "corrupted"),
    ],
)
def test_damaged_archive_clear_error_no_outputs(server, tmp_path, dataset, damage):
    # The md5 given matches the damaged bytes, so the damage is caught by the conversion.
    name, (data, *_) = (
        (CIFAR, cifar100_archive()) if dataset == "cifar100" else (TINY, tinyimagenet_archive())
    )
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        middle = len(data) // 2
        data = (
            data[:middle]
            + bytes(b ^ 0xFF for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )
    server.files[name] = data
    with pytest.raises(ArchiveError, match="corrupted, truncated"):
        prepare(dataset, "official", tmp_path, mirror=server.url, expected_md5=md5(data))
    assert leftovers(tmp_path) == []


def test_failure_while_writing_keeps_previous_dataset(server, tmp_path, monkeypatch):
    data, _, _ = cifar100_archive()
    server.files[CIFAR] = data
    before = prepare("cifar100", "official", tmp_path, mirror=server.url, expected_md5=md5(data))
    real_save, calls = np.save, []

    def failing_save(path, array):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        prepare("cifar100", "synthetic", tmp_path, synthetic_sizes={"train": 5, "test": 5})
    monkeypatch.undo()
    assert leftovers(tmp_path) == ["cifar100"]
    assert load_prepared(tmp_path / "prepared" / "cifar100").manifest == before


def test_a_killed_prepare_leaves_nothing_behind_after_the_next(tmp_path):
    sizes = {"train": 5, "test": 5}
    prepare("cifar100", "synthetic", tmp_path, synthetic_sizes=sizes)
    # What a SIGKILL during writing or during the swap of directories leaves.
    prepared = tmp_path / "prepared"
    for name in (".cifar100.tmp-x1", ".cifar100.old-x2/cifar100"):
        (prepared / name).mkdir(parents=True)
        (prepared / name / "train_x.npy").write_bytes(b"partial")
    (prepared / ".tinyimagenet.tmp-x3").mkdir()  # another dataset's: not ours to remove
    prepare("cifar100", "synthetic", tmp_path, synthetic_sizes=sizes)  # intact: no work
    assert leftovers(tmp_path) == [".tinyimagenet.tmp-x3", "cifar100"]


def test_resume_partial_download(server, tmp_path):
    data, _, _ = cifar100_archive()
    server.files[CIFAR] = data
    part = tmp_path / "downloads" / (CIFAR + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    prepare("cifar100", "official", tmp_path, mirror=server.url, expected_md5=md5(data))
    assert server.gets(CIFAR) == ["bytes=1000-"]
    assert (tmp_path / "downloads" / CIFAR).read_bytes() == data and not part.exists()


def test_retry_resumes_after_dropped_connection(server, tmp_path):
    data = bytes(range(256)) * 4000
    server.files["blob"] = data
    server.drop_after["blob"] = 300_000
    dest = fetch(f"{server.url}/blob", tmp_path / "blob", md5(data), backoff_s=0)
    assert dest.read_bytes() == data
    assert server.gets("blob") == [None, "bytes=300000-"]


def test_server_without_range_support_restarts(server, tmp_path):
    data = bytes(range(256)) * 100
    server.files["blob"], server.ranges = data, False
    (tmp_path / "blob.part").write_bytes(b"stale bytes")
    assert fetch(f"{server.url}/blob", tmp_path / "blob", md5(data)).read_bytes() == data


def test_missing_file_fails_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        fetch(f"{server.url}/nothing", tmp_path / "x", "0" * 32, backoff_s=0)
    assert len(server.requests) == 1


def test_official_urls_and_checksums():
    c, t = DATASETS["cifar100"], DATASETS["tinyimagenet"]
    assert (c.archive.url, c.archive.md5) == (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    )
    assert (t.archive.url, t.archive.md5) == (
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "90528d7ca1a48142e341f4ef8d21d0de",
    )
    assert (c.image_size, c.num_classes, t.image_size, t.num_classes) == (32, 100, 64, 200)
    assert c["mean"] == (0.5071, 0.4867, 0.4408) and c["std"] == (0.2675, 0.2565, 0.2761)
    assert t.mean == (0.485, 0.456, 0.406) and t.std == (0.229, 0.224, 0.225)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare("mnist", "official", tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        prepare("cifar100", "fake", tmp_path)
    with pytest.raises(ValueError, match="official source only"):
        prepare("cifar100", "synthetic", tmp_path, mirror="http://x")
    with pytest.raises(ValueError, match="synthetic source only"):
        prepare("cifar100", "official", tmp_path, synthetic_sizes={"train": 1, "test": 1})
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_prepared(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_shaped(tmp_path):
    sizes = {"train": 300, "test": 50}
    a = prepare("tinyimagenet", "synthetic", tmp_path / "a", synthetic_sizes=sizes)
    b = prepare("tinyimagenet", "synthetic", tmp_path / "b", synthetic_sizes=sizes)
    assert a["checksum"] == b["checksum"] and a["archive"] is None
    assert a["counts"] == sizes and len(a["classes"]) == 200
    p = load_prepared(tmp_path / "a" / "prepared" / "tinyimagenet")
    assert p.train_x.shape == (300, 64, 64, 3) and p.test_y.max() < 200
    # Other sizes are other data: regenerated, not reused.
    c = prepare(
        "tinyimagenet", "synthetic", tmp_path / "a", synthetic_sizes={"train": 200, "test": 50}
    )
    assert c["counts"]["train"] == 200 and c["checksum"] != a["checksum"]


def test_synthetic_is_learnable(tmp_path):
    prepare("cifar100", "synthetic", tmp_path, synthetic_sizes={"train": 5000, "test": 1000})
    p = load_prepared(tmp_path / "prepared" / "cifar100")

    def features(x):  # 8x8 average-pooled pixels, standardised
        return F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2).float(), 8).flatten(1)

    xtr, xte = features(p.train_x), features(p.test_x)
    mu, sd = xtr.mean(0), xtr.std(0)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr, yte = torch.from_numpy(p.train_y), torch.from_numpy(p.test_y)
    torch.manual_seed(0)
    model = torch.nn.Linear(xtr.shape[1], 100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        i = torch.randint(0, len(xtr), (128,))
        loss = F.cross_entropy(model(xtr[i]), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = (model(xte).argmax(1) == yte).float().mean().item()
    assert accuracy > 0.2  # chance is 0.01


def test_cli(server, tmp_path, capsys):
    args = [
        "prepare",
        "--dataset",
        "cifar100",
        "--source",
        "synthetic",
        "--root",
        str(tmp_path),
        "--train-size",
        "20",
        "--test-size",
        "10",
    ]
    assert cli_main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"] == {"train": 20, "test": 10}
    manifest = json.loads((tmp_path / "prepared" / "cifar100" / "manifest.json").read_text())
    assert printed["checksum"] == manifest["checksum"]
    assert (
        cli_main(
            [
                "prepare",
                "--dataset",
                "cifar100",
                "--source",
                "official",
                "--root",
                str(tmp_path),
                "--mirror",
                server.url,
            ]
        )
        == 1
    )
    assert "HTTP 404" in capsys.readouterr().err
    # Flags that do not go together are a configuration error: 78, the cause, no traceback.
    assert (
        cli_main(
            [
                "prepare",
                "--dataset",
                "cifar100",
                "--source",
                "official",
                "--root",
                str(tmp_path),
                "--train-size",
                "5",
            ]
        )
        == 78
    )
    assert "--train-size and --test-size go together" in capsys.readouterr().err


def test_prepare_stage_on_the_default_params_downloads_and_verifies(server, tmp_path):
    """`python -m pipeline prepare` (the DVC stage) on params.yaml as shipped: the official
    source, whose `synthetic_sizes` setting must not reach it. A mirror serving a stand-in
    archive gets it requested, and refused for its md5, with a message and no traceback."""
    root = Path(__file__).resolve().parents[1]
    server.files[CIFAR] = cifar100_archive()[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "prepare",
            "cifar100",
            "--params",
            str(root / "params.yaml"),
            "--set",
            f"data.mirror={server.url}",
            "--set",
            f"data.root={tmp_path}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert server.gets(CIFAR), proc.stderr
    assert f"prepare cifar100: {server.url}/{CIFAR}: md5 " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftovers(tmp_path) == []


def test_failed_download_says_how_to_proceed_without_the_network(server, tmp_path):
    """Offline (here: the mirror has no archive), the stage fails in one message that names
    the ways forward: a mirror, a hand-placed archive, the synthetic preset."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "prepare",
            "cifar100",
            "--params",
            str(root / "params.yaml"),
            "--set",
            f"data.mirror={server.url}",
            "--set",
            f"data.root={tmp_path}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "prepare cifar100: GET " in proc.stderr and "HTTP 404" in proc.stderr
    for way in ("data.mirror", f"{tmp_path}/downloads/", "dvc exp run -S preset=demo"):
        assert way in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
