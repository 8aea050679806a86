"""Small helpers on lists of tensors (one per parameter); inner products are global."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dot", "is_finite", "norm", "sq_norm"]


def _flat(x: Tensor) -> Tensor:
    return x if x.ndim == 1 else x.reshape(-1)


def dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Global inner product :math:`\\sum_i \\langle x_i, y_i \\rangle` as a 0-d tensor."""
    if not xs:
        return torch.zeros(())
    if len(xs) == 1:
        return (xs[0] * ys[0]).sum()
    return torch.stack([torch.vdot(_flat(x), _flat(y)) for x, y in zip(xs, ys)]).sum()


def norm(xs: list[Tensor]) -> Tensor:
    """Global Euclidean norm as a 0-d tensor (one fused per-tensor norm; for reporting, where
    the last bits need not match ``sq_norm(xs).sqrt()``)."""
    if not xs:
        return torch.zeros(())
    if len(xs) == 1:
        return torch.linalg.vector_norm(xs[0])
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)))


def sq_norm(xs: list[Tensor]) -> Tensor:
    """Global squared Euclidean norm."""
    return dot(xs, xs)


def is_finite(x: Tensor | float | None) -> bool:
    """Whether a scalar (tensor or float) is finite; ``None`` counts as finite."""
    if x is None:
        return True
    if isinstance(x, Tensor):
        return bool(torch.isfinite(x).all())
    return x == x and abs(x) != float("inf")
