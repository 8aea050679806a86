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


def state_to_device(obj: Any, device: torch.device) -> Any:
    """The state tree with every tensor moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: state_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_to_device(v, device) for v in obj)
    return obj
