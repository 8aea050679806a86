"""Dense float64 references built with torch.func, independent of qlrlab's curvature code."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev


def flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return names, shapes, flat


def unflatten(flat: Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = int(torch.Size(s).numel())
        out[n] = flat[i : i + k].reshape(s)
        i += k
    return out


def to_flat(vs: list[Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in vs])


def dense_ggn(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """G = Jᵀ H_z J from full Jacobians (train/eval mode as the model is; buffers not updated
    because BatchNorm modules must be given track_running_stats=False by the caller if needed)."""
    names, shapes, flat = flat_params(model)

    def f(theta: Tensor) -> Tensor:
        return functional_call(model, unflatten(theta, names, shapes), (x,))

    z = f(flat).detach()
    J = jacrev(f)(flat).reshape(z.numel(), -1)
    H = hessian(lambda zz: loss_fn(zz.reshape(z.shape), y))(z.reshape(-1))
    return J.T @ H @ J


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
