"""Result storage: atomic files, one directory per run keyed by its spec hash, and checkpoints.

Layout of an output directory::

    OUT/
      .lock                   # held (flock) by the one qlrlab process writing here
      index.json              # every planned run: labels + hash (rewritten atomically)
      runs/<hash>/spec.json   # resolved spec, seed, package versions, git revision
      runs/<hash>/metrics.parquet   # per-step metrics (tidy, one row per logged step)
      runs/<hash>/summary.json      # final row; written last, so it marks a finished run
      runs/<hash>/checkpoint.pt     # latest checkpoint (removed when the run finishes)
      report/                 # tables and plots from ``qlrlab report``

A run whose ``summary.json`` says ``completed``, ``diverged`` or ``pruned`` is done and skipped on
``--resume``; any other run is (re-)run, from its checkpoint when one exists. Because results are
keyed by hash and collected from the run directories, a resumed ablation never duplicates a row.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

try:
    import fcntl
except ImportError:  # not POSIX: output directories are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DONE_STATUSES",
    "FolderLock",
    "RunStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "confined",
    "environment_info",
    "git_revision",
    "read_json",
    "safe_name",
    "warn",
]

#: Summary statuses that count as finished (skipped on resume).
DONE_STATUSES = frozenset({"completed", "diverged", "pruned"})


_WARNED: set[str] = set()


def warn(message: str) -> None:
    """Print ``warning: message`` to stderr (once per process for the same message)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (non-finite floats become null)."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return _jsonable(obj.item())
        except (ValueError, RuntimeError):
            return str(obj)
    return obj


def read_json(path: str | Path) -> Any:
    """Read a JSON file (``None`` when it does not exist or is unreadable)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def safe_name(text: str) -> str:
    """A file-name-safe version of a label (letters, digits, ``._-``)."""
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(text)).strip("._")
    return out[:100] or "x"


def confined(root: str | Path, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and refuse anything that escapes ``root``.

    Raises:
        ValueError: when the resolved path is outside ``root``.
    """
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"path {path} escapes the output directory {base}")
    return path


def git_revision() -> str | None:
    """The git commit of the qlrlab source tree (with ``-dirty`` when modified), or ``None``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


_ENV_CACHE: dict[str, Any] | None = None


def environment_info() -> dict[str, Any]:
    """Package versions, Python, platform and git revision (cached per process)."""
    global _ENV_CACHE
    if _ENV_CACHE is None:
        versions: dict[str, str | None] = {}
        for pkg in ("qlrlab", "torch", "numpy", "pydantic", "pandas", "pyarrow", "optuna", "ray"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        _ENV_CACHE = {
            "versions": versions,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "git_revision": git_revision(),
            "cuda": torch.version.cuda,
        }
    return dict(_ENV_CACHE)


class RunStore:
    """The on-disk store of one output directory.

    Args:
        root: the output directory (created on demand).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        #: the directory's lock, when this store writes (see ``prepare_output``)
        self.lock: FolderLock = FolderLock(self.root)

    # paths -----------------------------------------------------------------------------------
    def run_dir(self, run_hash: str) -> Path:
        """The directory of the run with hash ``run_hash``."""
        if not run_hash.isalnum():
            raise ValueError(f"bad run hash {run_hash!r}")
        return confined(self.root, "runs", run_hash)

    def path(self, *parts: str) -> Path:
        """A path inside the output directory (refusing escapes)."""
        return confined(self.root, *parts)

    # index -----------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        """``OUT/index.json``."""
        return self.root / "index.json"

    def read_index(self) -> dict[str, Any]:
        """The index (``{"kind", "name", "entries": [...]}``), empty when absent.

        An index that exists but is unreadable (not JSON, not an object, malformed entries) is
        rebuilt from the run folders' ``spec.json`` files, with a warning, instead of reading as
        "no runs".
        """
        if not self.index_path.exists():
            return {"entries": []}
        data = read_json(self.index_path)
        if _valid_index(data):
            return data
        entries = self._entries_from_run_folders()
        warn(
            f"{self.index_path} is unreadable or malformed; rebuilt its {len(entries)} entries "
            "from the run folders (runs/*/spec.json)"
        )
        return {"entries": entries}

    def _entries_from_run_folders(self) -> list[dict[str, Any]]:
        out = []
        runs = self.root / "runs"
        for d in sorted(runs.iterdir()) if runs.is_dir() else []:
            rec = read_json(d / "spec.json")
            if (
                isinstance(rec, dict)
                and rec.get("hash") == d.name
                and isinstance(rec.get("labels"), dict)
            ):
                out.append({"hash": d.name, "labels": rec["labels"]})
        return out

    def write_index(self, index: Mapping[str, Any]) -> None:
        """Atomically replace the index."""
        atomic_write_json(self.index_path, index)

    def add_entries(
        self, entries: list[dict[str, Any]], *, replace: bool = False, **meta: Any
    ) -> None:
        """Add ``{"hash", "labels"}`` entries to the index, without duplicates.

        Args:
            entries: the entries.
            replace: drop the existing entries first (an ablation re-planned on ``--resume``).
            **meta: top-level fields of the index (``kind``, ``name``, ``spec``).
        """
        index = self.read_index()
        if replace:
            index["entries"] = []
        index.update(meta)
        seen = {(e["hash"], json.dumps(e["labels"], sort_keys=True)) for e in index["entries"]}
        for e in entries:
            key = (e["hash"], json.dumps(e["labels"], sort_keys=True))
            if key not in seen:
                index["entries"].append({"hash": e["hash"], "labels": e["labels"]})
                seen.add(key)
        self.write_index(index)

    # runs ------------------------------------------------------------------------------------
    def summary(self, run_hash: str) -> dict[str, Any] | None:
        """The run's summary, or ``None`` when it has not finished.

        A ``summary.json`` that is not a JSON object is reported (a warning naming the file)
        and counts as unfinished, so ``--resume`` runs the run again.
        """
        path = self.run_dir(run_hash) / "summary.json"
        data = read_json(path)
        if isinstance(data, dict):
            return data
        if path.exists():
            warn(
                f"{path} is not a run summary ({_what(data)}); the run counts as unfinished: "
                "rerun it with --resume"
            )
        return None

    def is_done(self, run_hash: str) -> bool:
        """Whether the run finished (completed, diverged or pruned) and its metrics file is
        readable (a finished run whose ``metrics.parquet`` is damaged is run again)."""
        s = self.summary(run_hash)
        if not s or s.get("status") not in DONE_STATUSES:
            return False
        return self.metrics(run_hash) is not None

    def metrics(self, run_hash: str) -> pd.DataFrame | None:
        """The run's per-step metrics, or ``None`` when absent or unreadable (the latter with
        a warning naming the file)."""
        p = self.run_dir(run_hash) / "metrics.parquet"
        return read_metrics(p)

    def iter_entries(self) -> Iterator[dict[str, Any]]:
        """Index entries joined with their summaries (``summary`` may be ``None``)."""
        for e in self.read_index()["entries"]:
            yield {**e, "summary": self.summary(e["hash"])}


def _valid_index(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    entries = data.setdefault("entries", [])
    return isinstance(entries, list) and all(
        isinstance(e, dict)
        and isinstance(e.get("hash"), str)
        and e["hash"].isalnum()
        and isinstance(e.get("labels"), dict)
        for e in entries
    )


def _what(data: Any) -> str:
    if data is None:
        return "not valid JSON"
    return f"a JSON {type(data).__name__}, not an object"


def read_metrics(path: str | Path) -> pd.DataFrame | None:
    """Read a ``metrics.parquet``; ``None`` when it is absent, or when it is unreadable
    (truncated, corrupt), then with a warning naming the file."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        return pd.read_parquet(p)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        warn(
            f"{p} is unreadable ({type(exc).__name__}: {exc}); its run counts as unfinished "
            "and is left out of the curves: --resume runs it again"
        )
        return None


class FolderLock:
    """An exclusive lock on an output directory (``OUT/.lock``, ``flock``), so that only one
    qlrlab process writes into it at a time; released on exit (also when the process is
    killed, by the kernel).

    Raises:
        SpecError: (on entering) another process holds the lock; names its pid and the fix.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    def acquire(self) -> None:
        """Take the lock (not blocking)."""
        if fcntl is None:
            return
        from qlrlab.engine.specs import SpecError

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise SpecError(
                f"another qlrlab process (pid {holder}) is writing into {self.root.resolve()}",
                fix="wait for it to finish (or stop it: Ctrl-C, then --resume), or use --out DIR",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (a no-op when not held)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def write_parquet_atomic(df: pd.DataFrame, path: str | Path) -> None:
    """Write a DataFrame as Parquet atomically."""
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` a checkpoint atomically; it must hold only tensors, numbers, strings,
    lists and dicts, so that :func:`load_checkpoint` can use ``weights_only=True``."""
    import io

    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no code execution); ``None``
    when absent or unreadable."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file is treated as absent
        warn(f"{p} is unreadable ({type(exc).__name__}); its run starts again from step 0")
        return None


__all__ += ["load_checkpoint", "read_metrics", "save_checkpoint", "write_parquet_atomic"]
