"""Data directory, downloads (against a local HTTP server) and raw-format readers."""

from __future__ import annotations

import gzip
import http.server
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from qlrlab.data import (
    DATASET_FILES,
    ENV_VAR,
    MIRROR_ENV_VAR,
    PACKAGE_DATA,
    REMOTE_FILES,
    ChecksumError,
    DataUnavailableError,
    RemoteFile,
    build_vocab,
    download_file,
    ensure_file,
    file_digest,
    get_data_dir,
    load_cifar10,
    load_svhn_mat,
    read_idx,
    read_permutation,
    read_ptb_words,
    set_default_data_dir,
    verify_file,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


# --------------------------------------------------------------------------- local HTTP server


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus ``/truncated/<n>``: promises 2n bytes, sends n, hangs up."""

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        if self.path.startswith("/truncated/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(2 * n))
            self.end_headers()
            self.wfile.write(b"x" * n)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def serve() -> Iterator:
    """Start a 127.0.0.1 HTTP server on a directory; yields ``start(directory) -> base_url``."""
    servers = []

    def start(directory: Path) -> str:
        srv = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(_Handler, directory=str(directory))
        )
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _no_partials(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".part")]


# --------------------------------------------------------------------------- data directory


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_default_data_dir(None)
    assert get_data_dir().parts[-2:] == ("qlrlab", "data")
    set_default_data_dir(tmp_path / "configured")
    try:
        assert get_data_dir() == (tmp_path / "configured").resolve()
        monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
        assert get_data_dir() == (tmp_path / "env").resolve()
        assert get_data_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    finally:
        set_default_data_dir(None)


def test_remote_files_are_well_formed():
    for path, remote in REMOTE_FILES.items():
        assert remote.path == path
        assert remote.urls and all(u.startswith(("http://", "https://")) for u in remote.urls)
        assert remote.sha256 or remote.md5
    for files in DATASET_FILES.values():
        assert all(f in REMOTE_FILES for f in files)
    assert REMOTE_FILES["cifar10/cifar-10-python.tar.gz"].md5 == "c58f30108f718f92721af3b95e74349a"


@needs_shared
def test_shared_data_checksums_match_sums_file_and_registry():
    sums = {}
    for line in (SHARED / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    for name, digest in sums.items():
        assert file_digest(SHARED / name) == digest, name
    for path, remote in REMOTE_FILES.items():
        if remote.sha256 and path in sums:
            assert remote.sha256 == sums[path]
    for path, remote in REMOTE_FILES.items():  # every file we have is in the registry
        if (SHARED / path).is_file():
            verify_file(SHARED / path, remote)  # sha256 + official md5 + size


def test_bundled_files_match_their_checksums():
    energy = REMOTE_FILES["uci_energy/dropout_uncertainty_exps/data.txt"]
    verify_file(PACKAGE_DATA / "uci_energy" / "data.txt", energy)
    assert len(read_permutation(PACKAGE_DATA / "uci_energy" / "permutation_indices.txt")) == 768
    assert len(read_permutation(PACKAGE_DATA / "uci_protein" / "permutation_indices.txt")) == 45730
    assert "CC BY 4.0" in (PACKAGE_DATA / "uci_energy" / "README.md").read_text()


# --------------------------------------------------------------------------- downloads


@needs_shared
def test_download_from_local_mirror_of_shared_data(tmp_path, serve, monkeypatch):
    base = serve(SHARED)
    monkeypatch.setenv(MIRROR_ENV_VAR, base)
    for name in ("penn_treebank/ptb.valid.txt", "fashion_mnist/t10k-labels-idx1-ubyte.gz"):
        path = ensure_file(name, tmp_path, progress=False)
        assert path == tmp_path.resolve() / name
        assert path.read_bytes() == (SHARED / name).read_bytes()
    # a second call finds the file and does not download again
    monkeypatch.setenv(MIRROR_ENV_VAR, "http://127.0.0.1:9")
    assert ensure_file("penn_treebank/ptb.valid.txt", tmp_path, verify=True).is_file()
    assert not _no_partials(tmp_path)


def test_download_checksum_mismatch_leaves_nothing(tmp_path, serve):
    src = tmp_path / "src" / "demo"
    src.mkdir(parents=True)
    (src / "file.bin").write_bytes(b"hello world")
    base = serve(tmp_path / "src")
    bad = RemoteFile("demo/file.bin", ("https://example.invalid/file.bin",), sha256="0" * 64)
    dest = tmp_path / "data" / "demo" / "file.bin"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download_file(bad, dest, mirror=base, progress=False)
    assert not dest.exists()
    assert not _no_partials(tmp_path / "data")
    bad_md5 = RemoteFile("demo/file.bin", ("https://example.invalid/file.bin",), md5="0" * 32)
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        download_file(bad_md5, dest, mirror=base, progress=False)
    import hashlib

    good = RemoteFile(
        "demo/file.bin",
        ("https://example.invalid/file.bin",),
        sha256=hashlib.sha256(b"hello world").hexdigest(),
        md5=hashlib.md5(b"hello world").hexdigest(),
    )
    assert download_file(good, dest, mirror=base, progress=False).read_bytes() == b"hello world"


def test_interrupted_download_leaves_no_partial_file(tmp_path, serve):
    base = serve(tmp_path)
    remote = RemoteFile("truncated/5000", ("https://example.invalid/x",), sha256="0" * 64)
    dest = tmp_path / "data" / "file.bin"
    with pytest.raises(DataUnavailableError, match=r"could not download truncated/5000"):
        download_file(remote, dest, mirror=base, progress=False)
    assert not dest.exists()
    assert not _no_partials(tmp_path / "data")
    # an existing good file is untouched by a failed re-download
    dest.write_bytes(b"old")
    with pytest.raises(DataUnavailableError):
        download_file(remote, dest, mirror=base, progress=False)
    assert dest.read_bytes() == b"old"


def test_offline_error_names_file_and_destination(tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV_VAR, "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(DataUnavailableError) as err:
        ensure_file("svhn/test_32x32.mat", tmp_path, progress=False)
    msg = str(err.value)
    assert "svhn/test_32x32.mat" in msg
    assert str(tmp_path.resolve() / "svhn" / "test_32x32.mat") in msg
    assert "http://ufldl.stanford.edu/housenumbers/test_32x32.mat" in msg
    with pytest.raises(DataUnavailableError, match="downloading is disabled"):
        ensure_file("cifar10/cifar-10-python.tar.gz", tmp_path, download=False)
    assert isinstance(err.value, FileNotFoundError)


def test_verify_detects_corruption(tmp_path):
    remote = RemoteFile("a/b.txt", ("https://example.invalid",), sha256=file_digest(__file__))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.txt").write_bytes(Path(__file__).read_bytes())
    assert ensure_file(remote, tmp_path, verify=True, download=False).is_file()
    (tmp_path / "a" / "b.txt").write_bytes(b"corrupt")
    with pytest.raises(ChecksumError):
        ensure_file(remote, tmp_path, verify=True, download=False)


# --------------------------------------------------------------------------- formats


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes())
    with pytest.raises(ValueError):
        read_idx(tmp_path / "short")


@needs_shared
def test_fashion_mnist_files_shapes_and_labels():
    root = SHARED / "fashion_mnist"
    x = read_idx(root / "t10k-images-idx3-ubyte.gz")
    y = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.min() == 0 and y.max() == 9
    assert np.all(np.bincount(y) == 1000)


def _cifar_batch(n: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    return {b"batch_label": b"x", b"labels": labels, b"data": data}, data, np.asarray(labels)


def write_tiny_cifar(root: Path, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Write ``cifar-10-batches-py`` with 5 training batches of ``n`` and a test batch."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch, data, labels = _cifar_batch(n, i)
        (d / name).write_bytes(pickle.dumps(batch))
        xs.append(data)
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def test_cifar10_reader_directory_and_tarball(tmp_path):
    x, y = write_tiny_cifar(tmp_path, n=4)
    (tr_x, tr_y), (te_x, te_y) = load_cifar10(tmp_path)
    assert tr_x.shape == (20, 3, 32, 32) and te_x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(tr_x.reshape(20, -1), x[:20])  # CHW row-major as stored
    np.testing.assert_array_equal(tr_y, y[:20])
    np.testing.assert_array_equal(te_y, y[20:])
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (tr_x2, _), (te_x2, _) = load_cifar10(tar_path)
    np.testing.assert_array_equal(tr_x2, tr_x)
    np.testing.assert_array_equal(te_x2, te_x)


def test_cifar10_reader_refuses_arbitrary_pickles(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    write_tiny_cifar(tmp_path, n=2)
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": io.BytesIO, b"labels": []}))
    with pytest.raises(pickle.UnpicklingError):
        load_cifar10(tmp_path)


def write_tiny_svhn(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write an SVHN-format ``.mat`` (``X`` ``[32, 32, 3, n]``, ``y`` ``[n, 1]`` in 1..10)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10
    savemat(str(path), {"X": x, "y": y})
    return x, y


def test_svhn_mat_reader(tmp_path):
    x, y = write_tiny_svhn(tmp_path / "train_32x32.mat", 7)
    images, labels = load_svhn_mat(tmp_path / "train_32x32.mat")
    assert images.shape == (7, 3, 32, 32) and images.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() <= 9 and labels[0] == 0
    expected = np.where(y[:, 0] == 10, 0, y[:, 0])
    np.testing.assert_array_equal(labels, expected)
    # pixel (row 5, col 7, channel 2) of image 3
    assert images[3, 2, 5, 7] == x[5, 7, 2, 3]


def test_ptb_words_and_vocab(tmp_path):
    (tmp_path / "t.txt").write_text(" a b c \n b <unk> \n")
    words = read_ptb_words(tmp_path / "t.txt")
    assert words == ["a", "b", "c", "<eos>", "b", "<unk>", "<eos>"]
    vocab = build_vocab(words, ["z", "a"])
    assert vocab == {"a": 0, "b": 1, "c": 2, "<eos>": 3, "<unk>": 4, "z": 5}


@needs_shared
def test_ptb_files_token_counts_and_vocab():
    root = SHARED / "penn_treebank"
    splits = [read_ptb_words(root / f"ptb.{s}.txt") for s in ("train", "valid", "test")]
    assert [len(s) for s in splits] == [929_589, 73_760, 82_430]
    vocab = build_vocab(*splits)
    assert len(vocab) == 10_000
    assert len(build_vocab(splits[0])) == 10_000  # valid/test add no new words
