"""Small helpers on lists of tensors (one per parameter); inner products are global."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dot", "flat_span", "is_finite", "norm", "sq_norm"]


def _flat(x: Tensor) -> Tensor:
    return x if x.ndim == 1 else x.reshape(-1)


def flat_span(xs: list[Tensor]) -> Tensor | None:
    """The 1-d view that ``xs`` tile back to back in one storage (e.g. the views of one flat
    buffer that :class:`qlrlab.directions.adam.AdamDirection` returns), else ``None``."""
    if len(xs) < 2:
        return None
    x0 = xs[0]
    ptr = x0.untyped_storage().data_ptr()
    start = off = x0.storage_offset()
    for x in xs:
        if (
            x.storage_offset() != off
            or not x.is_contiguous()
            or x.dtype != x0.dtype
            or x.untyped_storage().data_ptr() != ptr
        ):
            return None
        off += x.numel()
    return x0.as_strided((off - start,), (1,), start)


def dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Global inner product :math:`\\sum_i \\langle x_i, y_i \\rangle` as a 0-d tensor."""
    if not xs:
        return torch.zeros(())
    if len(xs) == 1:
        return (xs[0] * ys[0]).sum()
    if xs is ys:
        span = flat_span(xs)
        if span is not None:  # one kernel instead of one per tensor plus a sum
            return torch.dot(span, span)
    return torch.stack([torch.vdot(_flat(x), _flat(y)) for x, y in zip(xs, ys)]).sum()


def norm(xs: list[Tensor]) -> Tensor:
    """Global Euclidean norm as a 0-d tensor (one fused per-tensor norm; for reporting, where
    the last bits need not match ``sq_norm(xs).sqrt()``).

    Never overflows while every element is finite: float32 norms accumulate squares in float32,
    so elements above about 1.8e19 give ``inf`` (a finite gradient would read as non-finite).
    When the fast result is not finite, the norm is recomputed in float64 (squares up to 1e308)
    and cast back; it stays ``inf``/``nan`` only when an element is. The check reads one scalar
    (a host sync on CUDA; the optimiser reads the norm right after anyway).
    """
    if not xs:
        return torch.zeros(())
    if len(xs) == 1:
        out = torch.linalg.vector_norm(xs[0])
    else:
        out = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)))
    if out.dtype != torch.float64 and not math.isfinite(float(out)):
        wide = torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64) for x in xs])
        out = torch.linalg.vector_norm(wide).to(out.dtype)
    return out


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
