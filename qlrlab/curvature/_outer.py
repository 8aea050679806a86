r"""Shared machinery of the outer-product curvatures (Monte-Carlo Fisher, empirical Fisher).

Both are :math:`C = \sum_s \sum_k J_k^\top r_{sk} r_{sk}^\top J_k`, where :math:`k` runs over the
independent output groups (a sample, or a position of a sequence output for sampled
cross-entropy targets), :math:`J_k` is the Jacobian of that group's outputs and the scaled
output-space vectors :math:`r_{sk}` are given (sampled residuals or per-sample loss gradients,
already multiplied by the loss normaliser's square root). With :math:`u = Jv` from one
forward-mode pass,

.. math:: v^\top C v = \sum_{s,k} (r_{sk}^\top u_k)^2, \qquad
          Cv = J^\top\Big[\sum_s r_s \odot (r_s^\top u)\Big]

(one JVP; one extra VJP for products).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from qlrlab._passes import functional_forward, side_effect_free
from qlrlab.interfaces import BoundCurvature, Problem

__all__ = ["BoundOuterProduct"]


def ce_mask(loss_fn: nn.CrossEntropyLoss, z: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """Which cross-entropy outputs count (targets not ``ignore_index``), broadcast to ``z``, and
    how many positions count (the ``mean`` reduction's divisor). Class-probability targets all
    count."""
    if y.dtype.is_floating_point:  # class probabilities
        count = z.numel() // z.shape[1] if z.ndim > 1 else 1
        return torch.ones_like(z), float(count)
    mask = (y != loss_fn.ignore_index).unsqueeze(1).to(z.dtype)
    return mask.expand_as(z), float(mask.sum())


class BoundOuterProduct(BoundCurvature):
    """Outer-product curvature of one batch given the output-space factors.

    Args:
        problem: the bound problem.
        factors: ``fn(z) -> (R, group_dims)`` with ``R`` of shape ``[S, *z.shape]`` and the
            dimensions of ``R`` (counted with the leading ``S``) summed within one group.
    """

    def __init__(
        self, problem: Problem, factors: Callable[[Tensor], tuple[Tensor, tuple[int, ...]]]
    ) -> None:
        self.problem = problem
        self._params = tuple(p.detach() for p in problem.params)
        self._factors_fn = factors
        self._r: Tensor | None = None
        self._dims: tuple[int, ...] = ()
        self._vjp: Callable[..., tuple[Tensor, ...]] | None = None

    def _f(self, *params: Tensor) -> Tensor:
        pr = self.problem
        return functional_forward(pr.model, pr.param_names, params, pr.inputs)

    def _jvp(self, v: Sequence[Tensor]) -> Tensor:
        with torch.no_grad(), side_effect_free(self.problem.model):
            z, u = torch.func.jvp(self._f, self._params, tuple(t.detach() for t in v))  # type: ignore[misc]
        if self._r is None:
            self._r, self._dims = self._factors_fn(z.detach())
        return u

    def factors(self) -> Tensor:
        """The output-space factors :math:`R` (computed on first use, then fixed)."""
        if self._r is None:
            with torch.no_grad(), side_effect_free(self.problem.model):
                z = self._f(*self._params)
            self._r, self._dims = self._factors_fn(z.detach())
        return self._r

    def _ru(self, u: Tensor) -> Tensor:
        assert self._r is not None
        return (self._r * u.unsqueeze(0)).sum(dim=self._dims, keepdim=True)

    def quadratic_form(self, v: list[Tensor]) -> Tensor:
        """:math:`\\sum_{s,k} (r_{sk}^\\top u_k)^2`."""
        u = self._jvp(v)
        return (self._ru(u) ** 2).sum()

    def quadratic_forms(self, vs: list[list[Tensor]]) -> Tensor:
        """Gram matrix from one JVP per vector."""
        rus = [self._ru(self._jvp(v)) for v in vs]
        k = len(vs)
        out = torch.empty(k, k, dtype=rus[0].dtype, device=rus[0].device)
        for i in range(k):
            for j in range(k):
                out[i, j] = (rus[i] * rus[j]).sum()
        return 0.5 * (out + out.T)

    def matvec(self, v: list[Tensor]) -> list[Tensor]:
        """:math:`J^\\top [\\sum_s r_s (r_s^\\top u)]`."""
        u = self._jvp(v)
        assert self._r is not None
        w = (self._r * self._ru(u)).sum(0)
        if self._vjp is None:
            with torch.enable_grad(), side_effect_free(self.problem.model):
                _, self._vjp = torch.func.vjp(self._f, *self._params)  # type: ignore[misc]
        return [t.detach() for t in self._vjp(w)]
