"""Dense float64 curvature matrices: the oracle's own (from ``matvec``) and ``torch.func``
references independent of qlrlab's curvature code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from qlrlab.interfaces import BoundCurvature, Problem

__all__ = ["REFERENCES", "bind", "dense_curvature", "unflat"]


def _flat(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    return names, shapes, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflat(model: nn.Module, flat: Tensor) -> list[Tensor]:
    """A flat vector as a list shaped like ``model.parameters()``."""
    out, i = [], 0
    for p in model.parameters():
        out.append(flat[i : i + p.numel()].reshape(p.shape).to(p.dtype))
        i += p.numel()
    return out


def _as_dict(flat: Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = int(torch.Size(s).numel())
        out[n] = flat[i : i + k].reshape(s)
        i += k
    return out


def bind(oracle: Any, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> BoundCurvature:
    """Bind ``oracle`` to the batch after a gradient pass inside its ``gradient_pass`` context
    (as the optimiser does)."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    with torch.enable_grad(), oracle.gradient_pass(model) as module:
        out = module(x)
        loss = loss_fn(out, y)
        loss.backward()
    problem = Problem(
        model=model, loss_fn=loss_fn, inputs=x, targets=y, params=params,  # type: ignore[arg-type]
        param_names=[n for n, _ in model.named_parameters()], outputs=out.detach(),
        loss=loss.detach(),
    )  # fmt: skip
    return oracle.bind(problem)


def dense_curvature(bound: BoundCurvature, model: nn.Module) -> Tensor:
    """A bound oracle's :math:`C` as a dense float64 matrix, column by column from ``matvec``."""
    n = sum(p.numel() for p in model.parameters())
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = 1.0
        cols.append(torch.cat([t.reshape(-1) for t in bound.matvec(unflat(model, e))]))
    return torch.stack(cols, dim=1).to(torch.float64)


def dense_ggn(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """:math:`G = J^\\top H_z J` from full Jacobians."""
    names, shapes, flat = _flat(model)

    def f(theta: Tensor) -> Tensor:
        return functional_call(model, _as_dict(theta, names, shapes), (x,))

    z = f(flat).detach()
    jac = jacrev(f)(flat).reshape(z.numel(), -1)
    h = hessian(lambda zz: loss_fn(zz.reshape(z.shape), y))(z.reshape(-1))
    return jac.T @ h @ jac


def dense_hessian(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The Hessian of the mean batch loss."""
    names, shapes, flat = _flat(model)
    return hessian(
        lambda theta: loss_fn(functional_call(model, _as_dict(theta, names, shapes), (x,)), y)
    )(flat)


def dense_empirical_fisher(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """:math:`E = \\frac1N\\sum_n \\nabla\\ell_n\\nabla\\ell_n^\\top` for a mean-reduced
    cross-entropy (per-sample gradients with ``vmap``)."""
    if not isinstance(loss_fn, nn.CrossEntropyLoss):
        raise NotImplementedError("the empirical-Fisher reference is for CrossEntropyLoss")
    names, shapes, flat = _flat(model)

    def sample_loss(theta: Tensor, xn: Tensor, yn: Tensor) -> Tensor:
        z = functional_call(model, _as_dict(theta, names, shapes), (xn.unsqueeze(0),))
        return F.cross_entropy(z, yn.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(flat, x, y)
    return per_sample.T @ per_sample / x.shape[0]


#: what a curvature oracle class may declare as its ``reference``, and the dense reference
REFERENCES: dict[str, Callable[[nn.Module, nn.Module, Tensor, Tensor], Tensor]] = {
    "ggn": dense_ggn,
    "hessian": dense_hessian,
    "empirical_fisher": dense_empirical_fisher,
}
