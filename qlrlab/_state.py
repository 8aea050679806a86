"""Component state as a value: deep copies and device moves of ``state_dict`` trees.

A state tree is what a component's ``state_dict`` returns: dicts, lists and tuples of tensors and
Python scalars. :func:`clone_state` copies one so that later in-place updates of the live state
cannot change the copy (the default :meth:`qlrlab.interfaces.Component.snapshot`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

__all__ = ["clone_state", "state_to_device"]


def clone_state(obj: Any) -> Any:
    """A deep copy of a state tree (tensors detached and cloned)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return copy.deepcopy(obj)


def state_to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """The state tree with every tensor moved to ``device`` and, when ``dtype`` is given (the
    parameters' dtype), every floating tensor cast to it (a float32 checkpoint loads into a
    float64 model)."""
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: state_to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_to_device(v, device, dtype) for v in obj)
    return obj
