"""Dense float64 references built with torch.func, independent of qlrlab's curvature code."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

from qlrlab.testing import _reference

# one copy of the flat-parameter helpers and the dense GGN: the contract suite's
flat_params = _reference._flat
unflatten = _reference._as_dict
dense_ggn = _reference.dense_ggn


def to_flat(vs: list[Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in vs])


def dense_hessian(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, *, vmap: bool = True
) -> Tensor:
    """Dense Hessian of the loss. ``vmap=False`` loops over basis vectors with plain autograd:
    torch.func's vmapped transforms get train-mode BatchNorm wrong on torch 2.13 (2% off
    finite differences), so the BatchNorm references use the loop."""
    names, shapes, flat = flat_params(model)

    def f(theta: Tensor) -> Tensor:
        return loss_fn(functional_call(model, unflatten(theta, names, shapes), (x,)), y)

    if not vmap:
        return torch.autograd.functional.hessian(f, flat)
    return hessian(f)(flat)
