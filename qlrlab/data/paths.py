"""Where qlrlab keeps its data files.

One data directory holds every dataset, laid out as ``<data_dir>/<dataset>/<file>`` (the same
layout as the project's shared offline copies, so pointing ``QLRLAB_DATA`` at such a copy works).
The directory is chosen, in order of precedence, by

1. an explicit argument (e.g. ``TaskSpec.data_dir``);
2. the ``QLRLAB_DATA`` environment variable;
3. the process-wide default set with :func:`set_default_data_dir` (config files use this);
4. ``~/.cache/qlrlab/data`` (or ``$XDG_CACHE_HOME/qlrlab/data``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_VAR", "PACKAGE_DATA", "get_data_dir", "set_default_data_dir"]

#: Environment variable naming the data directory.
ENV_VAR = "QLRLAB_DATA"

#: Data files bundled inside the package (UCI Energy and the UCI permutation files).
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "tasks" / "data"

_default_dir: Path | None = None


def set_default_data_dir(path: str | os.PathLike[str] | None) -> None:
    """Set (or with ``None`` clear) the process-wide default data directory.

    It is used when neither an explicit directory nor ``$QLRLAB_DATA`` is given.

    Args:
        path: the directory; created on first download, not here.
    """
    global _default_dir
    _default_dir = None if path is None else Path(path).expanduser()


def get_data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data directory (see the module docstring for the precedence).

    Args:
        override: an explicit directory, which wins over everything else.

    Returns:
        The directory as an absolute path (it need not exist yet).
    """
    if override is not None:
        return Path(override).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    if _default_dir is not None:
        return _default_dir.resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(cache) / "qlrlab" / "data").resolve()
