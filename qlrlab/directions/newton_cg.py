r"""Truncated-Newton / Hessian-free direction: solve :math:`(C + \lambda I)\,d = g` by conjugate
gradients (Martens, 2010; Nocedal & Wright, 2006, Alg. 7.1).

Only products :math:`Cv` from the curvature oracle are used (GGN for Hessian-free, or the
Hessian for Newton-CG). :math:`\lambda` is the damping schedule's :math:`\lambda_{t-1}`
(``ctx.damping``) plus the spec's fixed ``damping``. CG starts from the previous solution scaled by
``warm_start`` (Martens' :math:`\zeta`; 0 = cold start) and stops when
:math:`\|r\| \le \text{tol}\,\|g\|`, after ``max_iter`` iterations, or at a direction of
non-positive curvature :math:`p^\top(C+\lambda I)p \le 0` (returning the current iterate, or
:math:`g` if that is still zero). In exact arithmetic CG solves an :math:`n`-dimensional SPD
system in at most :math:`n` iterations. The step is :math:`\theta - \alpha d` (``fixed`` lr 1 is
the plain Newton step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from qlrlab._tensorlist import dot
from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec

__all__ = ["NewtonCGDirection", "NewtonCGSpec", "conjugate_gradient"]


@DIRECTIONS.register("newton_cg")
class NewtonCGSpec(ComponentSpec):
    """Spec of the Newton-CG direction.

    Attributes:
        max_iter: maximum CG iterations per step.
        tol: relative residual tolerance :math:`\\|r\\|/\\|g\\|`.
        warm_start: scale :math:`\\zeta \\in [0, 1]` of the previous solution used as the
            starting point (0 = start from zero).
        damping: extra fixed damping added to the schedule's :math:`\\lambda`.
    """

    requires_curvature: ClassVar[bool] = True

    name: Literal["newton_cg"] = "newton_cg"
    max_iter: int = Field(50, ge=1)
    tol: float = Field(1e-5, gt=0.0)
    warm_start: float = Field(0.95, ge=0.0, le=1.0)
    damping: float = Field(0.0, ge=0.0)

    def build(self) -> NewtonCGDirection:
        """Build the direction provider."""
        return NewtonCGDirection(self)


def conjugate_gradient(
    matvec: Any, b: list[Tensor], x0: list[Tensor] | None, *, max_iter: int, tol: float
) -> tuple[list[Tensor], int, bool]:
    """Solve :math:`Ax = b` for SPD :math:`A` given as ``matvec`` on tensor lists.

    Returns:
        ``(x, iterations, converged)``; stops early on non-positive curvature.
    """
    x = [torch.zeros_like(t) for t in b] if x0 is None else [t.clone() for t in x0]
    r = [bi - ai for bi, ai in zip(b, matvec(x))] if x0 is not None else [t.clone() for t in b]
    p = [t.clone() for t in r]
    rr = dot(r, r)
    bnorm = float(dot(b, b).sqrt())
    target = tol * bnorm
    if float(rr.sqrt()) <= target:
        return x, 0, True
    for it in range(1, max_iter + 1):
        ap = matvec(p)
        pap = dot(p, ap)
        if not float(pap) > 0.0:
            if all(float(t.abs().max()) == 0.0 for t in x if t.numel()):
                return [t.clone() for t in b], it, False
            return x, it, False
        a = rr / pap
        torch._foreach_add_(x, p, alpha=float(a))
        torch._foreach_add_(r, ap, alpha=-float(a))
        rr_new = dot(r, r)
        if float(rr_new.sqrt()) <= target:
            return x, it, True
        beta = float(rr_new / rr)
        rr = rr_new
        torch._foreach_mul_(p, beta)
        torch._foreach_add_(p, r)
    return x, max_iter, False


class NewtonCGDirection(DirectionProvider):
    """Newton-CG direction; state: the previous solution (warm start) and the last CG count."""

    spec: NewtonCGSpec

    def __init__(self, spec: NewtonCGSpec | None = None) -> None:
        super().__init__(spec or NewtonCGSpec())
        self.previous: list[Tensor] | None = None
        self.last_iterations = 0
        self.last_converged = True

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Forget the previous solution."""
        self.previous = None

    @torch.no_grad()
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Run CG on :math:`(C + \\lambda I) d = g`."""
        if ctx.curvature is None:
            raise ValueError("newton_cg needs a curvature oracle; set curvature: {name: ggn}")
        bound = ctx.curvature
        lam = float(ctx.damping) + self.spec.damping

        def matvec(v: list[Tensor]) -> list[Tensor]:
            cv = [ctx.all_reduce(t) for t in bound.matvec(v)]  # C of the global batch
            if lam:
                return list(torch._foreach_add(cv, v, alpha=lam))
            return list(cv)

        x0 = None
        if self.previous is not None and self.spec.warm_start > 0.0:
            x0 = [self.spec.warm_start * t for t in self.previous]
        d, its, ok = conjugate_gradient(
            matvec, [g.detach() for g in grads], x0, max_iter=self.spec.max_iter, tol=self.spec.tol
        )
        self.previous = [t.clone() for t in d]
        self.last_iterations, self.last_converged = its, ok
        ctx.cache["cg_iterations"] = its
        return d

    def state_dict(self) -> dict[str, Any]:
        """The previous solution (``None`` before the first step)."""
        return {"previous": self.previous, "last_iterations": self.last_iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the previous solution."""
        prev = state.get("previous")
        self.previous = None if prev is None else [t.clone() for t in prev]
        self.last_iterations = int(state.get("last_iterations", 0))
