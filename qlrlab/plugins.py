"""Load user modules that register their own components (``--plugin``).

A plugin is a Python module that registers specs in the family registries
(:mod:`qlrlab.registry`) or the task registry when it is imported. The command line loads the
plugins it is *explicitly* given (``qlrlab ablate SPEC --plugin my_pkg.heuristics`` or
``--plugin path/to/my_heuristics.py``); spec files never name code to import, so reading a spec
cannot execute anything.

Loaded plugins are recorded in the ``QLRLAB_PLUGINS`` environment variable, which worker
processes (spawned local workers, Ray workers) read with :func:`load_plugins_from_env` so that
the same components exist there.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

__all__ = ["ENV_VAR", "PluginError", "load_plugins", "load_plugins_from_env"]

#: Environment variable listing the loaded plugins (``os.pathsep``-separated).
ENV_VAR = "QLRLAB_PLUGINS"


class PluginError(ImportError):
    """A plugin could not be imported (the message names it and the fix)."""


def _env_plugins() -> list[str]:
    """The plugins recorded in ``QLRLAB_PLUGINS``, in order."""
    return [n for n in os.environ.get(ENV_VAR, "").split(os.pathsep) if n]


def _is_file(name: str) -> bool:
    return name.endswith(".py") or os.sep in name or "/" in name


def _load_one(name: str) -> tuple[ModuleType, str]:
    if _is_file(name):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise PluginError(
                f"plugin file {name!r} does not exist; pass a path to a .py file or an importable "
                f"module name (e.g. --plugin my_package.heuristics)"
            )
        for module in list(sys.modules.values()):  # already imported (under any name)?
            if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:  # type: ignore[arg-type]
                return module, str(path)
        mod_name = f"qlrlab_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        # the plugin's own directory is importable (helpers beside it)
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[mod_name]
            raise PluginError(f"plugin {name!r} failed while importing: {exc!r}") from exc
        return module, str(path)
    try:
        return importlib.import_module(name), name
    except ImportError as exc:
        raise PluginError(
            f"cannot import plugin module {name!r} ({exc}); install it, add its directory to "
            f"PYTHONPATH, or pass the path of the .py file"
        ) from exc


def load_plugins(plugins: Iterable[str]) -> list[ModuleType]:
    """Import each plugin (a module name or a ``.py`` path) and record it in ``QLRLAB_PLUGINS``.

    Args:
        plugins: module names or file paths.

    Returns:
        The imported modules.

    Raises:
        PluginError: a plugin could not be imported.
    """
    modules, names = [], []
    for name in plugins:
        module, key = _load_one(name)
        modules.append(module)
        names.append(key)
    if names:
        os.environ[ENV_VAR] = os.pathsep.join(dict.fromkeys(_env_plugins() + names))
    return modules


def load_plugins_from_env() -> list[ModuleType]:
    """Import the plugins listed in ``QLRLAB_PLUGINS`` (in worker processes)."""
    return [_load_one(n)[0] for n in _env_plugins()]
