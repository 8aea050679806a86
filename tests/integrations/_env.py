"""Import a framework for the integration tests, or skip the module with the reason.

The main development venv carries torchvision (BackPACK requires it), and on this CPU build
torchvision fails at import, as do torchmetrics and hence Lightning. These tests therefore run
in a separate venv without torchvision (``.ci/run`` builds ``.venv-integrations``); elsewhere
they skip, saying so.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

HOW = (
    "run them in the integration venv: python3 -m venv .venv-integrations && "
    ".venv-integrations/bin/pip install -c constraints.txt --no-deps -e . && "
    ".venv-integrations/bin/pip install -c constraints.txt torch pydantic pyyaml numpy "
    "pytest lightning transformers accelerate (see .ci/run)"
)


def require(name: str) -> ModuleType:
    """``import name`` or skip the calling test module."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or torchvision's own failure at import
        pytest.skip(f"{name} is not importable here ({exc!r:.120}); {HOW}", allow_module_level=True)
        raise  # unreachable
