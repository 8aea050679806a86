"""Every private PyTorch API qlrlab relies on, in one place, each behind feature detection with
a public (or conservative) fallback.

* :data:`fused_adam`: ``torch._fused_adam_`` (the kernel behind ``torch.optim.Adam(fused=True)``),
  ``None`` when absent: :class:`~qlrlab.directions.adam.AdamDirection` then uses ``foreach`` ops;
* :func:`in_functorch_transform`: ``torch._C._functorch.peek_interpreter_stack``; fallback
  ``False``;
* :func:`global_module_hooks`: ``nn.modules.module._global_*_hooks``; fallback ``True`` (assume
  hooks may exist: the fast paths that check it step aside);
* :func:`plain_module_call`: ``nn.Module._call_impl`` / ``_compiled_call_impl``; fallback
  ``False`` (not provably plain);
* :func:`version`: ``Tensor._version``, the in-place write counter; fallback ``None`` (callers
  treat an unknown version as written).

BackPACK's name-mangled extension table (``qlrlab.directions._backpack``) is the one private
access outside this module (it belongs to the K-FAC/BackPACK code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "fused_adam",
    "global_module_hooks",
    "in_functorch_transform",
    "plain_module_call",
    "version",
    "written_since",
]

#: ``torch._fused_adam_`` when this torch has it, else ``None``
fused_adam: Callable[..., Any] | None = getattr(torch, "_fused_adam_", None)

_functorch = getattr(torch._C, "_functorch", None)
_peek = getattr(_functorch, "peek_interpreter_stack", None)
_module_mod = nn.modules.module
_HOOK_TABLES = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
_HAS_HOOK_TABLES = all(hasattr(_module_mod, n) for n in _HOOK_TABLES)


def in_functorch_transform() -> bool:
    """Whether the caller runs inside a ``torch.func`` transform (jvp, vjp, grad, vmap...)."""
    return _peek is not None and _peek() is not None


def global_module_hooks(*, backward: bool = True) -> bool:
    """Whether any global module hook is registered (forward and forward-pre; also backward
    ones with ``backward``). ``True`` when this torch does not expose the tables."""
    if not _HAS_HOOK_TABLES:
        return True
    names = _HOOK_TABLES if backward else _HOOK_TABLES[:2]
    return any(bool(getattr(_module_mod, n)) for n in names)


def plain_module_call(model: nn.Module) -> bool:
    """Whether calling ``model`` is exactly ``nn.Module.__call__`` of an uncompiled module (no
    override of ``__call__``/``_call_impl``, no ``torch.compile`` wrapper)."""
    cls = type(model)
    impl = getattr(nn.Module, "_call_impl", None)
    if impl is None or cls.__call__ is not nn.Module.__call__:
        return False
    if getattr(cls, "_call_impl", None) is not impl:
        return False
    return getattr(model, "_compiled_call_impl", None) is None


def version(t: Tensor) -> int | None:
    """The tensor's in-place write counter (``None`` when unavailable)."""
    return getattr(t, "_version", None)


def written_since(t: Tensor, recorded: int | None) -> bool:
    """Whether ``t`` may have been written in place since :func:`version` returned
    ``recorded`` (always ``True`` when the counter is unavailable)."""
    return recorded is None or version(t) != recorded
