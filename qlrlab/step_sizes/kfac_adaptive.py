r"""K-FAC's joint learning-rate and momentum selection (Martens & Grosse, 2015, §7; kfac-jax).

The update is :math:`\delta = \alpha\Delta + \mu\delta_{t-1}` with :math:`\Delta = -d` and the
previous update :math:`\delta_{t-1}`; :math:`(\alpha, \mu)` minimise the damped exact quadratic
model :math:`M(\delta) = g^\top\delta + \tfrac12\delta^\top(C + \lambda I)\delta`:

.. math::
    \begin{bmatrix}\alpha\\ \mu\end{bmatrix} = -\begin{bmatrix}
      \Delta^\top \tilde C \Delta & \Delta^\top \tilde C \delta_{t-1}\\
      \delta_{t-1}^\top \tilde C\Delta & \delta_{t-1}^\top \tilde C \delta_{t-1}
    \end{bmatrix}^{-1}\begin{bmatrix} g^\top\Delta \\ g^\top\delta_{t-1}\end{bmatrix},
    \qquad \tilde C = C + \lambda I,

with :math:`\lambda = \lambda_{t-1}` (``ctx.damping``) and the Gram matrix from one call of
``quadratic_forms([d, δ_prev])``. On the first step (or with ``momentum: false``, or a singular
system) only :math:`\alpha = g^\top d / d^\top\tilde C d` is solved (:math:`\mu = 0`). The rule
returns the explicit update with :math:`g^\top\delta`, :math:`\delta^\top C\delta` and
:math:`\|\delta\|^2`, so the optimiser's :math:`\Delta M` needs no extra product. The previous
update (as applied, after the param group's ``lr``) is state, restored on rejection.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from qlrlab._tensorlist import dot
from qlrlab.interfaces import Proposal, StepContext, StepSizeRule
from qlrlab.registry import STEP_SIZES, ComponentSpec

__all__ = ["KFACAdaptiveSpec", "KFACAdaptiveStepSize"]


@STEP_SIZES.register("kfac_adaptive")
class KFACAdaptiveSpec(ComponentSpec):
    """Spec of K-FAC's adaptive learning rate and momentum.

    Attributes:
        momentum: also solve for :math:`\\mu` (kfac-jax ``use_adaptive_momentum``); ``False``
            gives the adaptive learning rate only.
    """

    requires_curvature: ClassVar[bool] = True

    name: Literal["kfac_adaptive"] = "kfac_adaptive"
    momentum: bool = True

    def build(self) -> KFACAdaptiveStepSize:
        """Build the rule."""
        return KFACAdaptiveStepSize(self)


class KFACAdaptiveStepSize(StepSizeRule):
    """Solves the 2×2 (or 1×1) quadratic model; state: the previous update."""

    spec: KFACAdaptiveSpec

    def __init__(self, spec: KFACAdaptiveSpec | None = None) -> None:
        super().__init__(spec or KFACAdaptiveSpec())
        self.previous: list[Tensor] | None = None

    def propose(self, ctx: StepContext) -> Proposal:
        """Return :math:`\\delta = -\\alpha d + \\mu\\delta_{t-1}` and its model scalars."""
        assert ctx.direction is not None and ctx.curvature is not None
        d = ctx.direction
        lam = float(ctx.damping)
        use_mom = self.spec.momentum and self.previous is not None
        vs = [d, self.previous] if use_mom else [d]
        assert all(v is not None for v in vs)
        cq = ctx.all_reduce(ctx.curvature.quadratic_forms(vs))  # type: ignore[arg-type]
        gram = torch.stack([torch.stack([dot(a, b) for b in vs]) for a in vs])  # type: ignore[arg-type]
        b = torch.stack([-dot(ctx.grads, d)] + ([dot(ctx.grads, self.previous)] if use_mom else []))  # type: ignore[arg-type]
        # in the basis (Δ = -d, δ_prev): Gram of Δ flips the sign of the off-diagonal terms
        sign = torch.tensor([-1.0, 1.0][: len(vs)], dtype=cq.dtype, device=cq.device)
        s_outer = sign[:, None] * sign[None, :]
        cq_b = cq * s_outer
        gram_b = gram.to(cq.dtype) * s_outer
        q = cq_b + lam * gram_b
        coef = self._solve(q, b.to(cq.dtype))
        alpha, mu = coef[0], (coef[1] if len(coef) > 1 else torch.zeros_like(coef[0]))
        update = [-alpha * t for t in d]
        combination: list[tuple[Tensor, list[Tensor]]] = [(-alpha.detach(), d)]
        if use_mom:
            assert self.previous is not None
            torch._foreach_add_(update, self.previous, alpha=float(mu))
            combination.append((mu.detach(), self.previous))
        grad_dot = (coef * b).sum()
        quad = coef @ cq_b @ coef
        sq = coef @ gram_b @ coef
        mults = [float(ctx.param_groups[gi]["lr"]) for gi in ctx.group_index]
        self.previous = [u.detach() * m for u, m in zip(update, mults)]
        return Proposal(
            alpha=alpha.detach(),
            update=[u.detach() for u in update],
            grad_dot_direction=grad_dot.detach(),
            curvature=quad.detach(),
            sq_norm=sq.detach(),
            momentum=mu.detach(),
            combination=combination,  # the loss at theta + delta from the two tangents
        )

    @staticmethod
    def _solve(q: Tensor, b: Tensor) -> Tensor:
        """:math:`-Q^{-1}b` in float64 by Cramer's rule (never raises), falling back to the 1×1
        solve when the 2×2 system is (numerically) singular or its solution is not finite; the
        result is in ``q``'s dtype (a non-finite α is then reported by the optimiser)."""
        q64, b64 = q.double(), b.double()
        if q.shape[0] == 2:
            det = q64[0, 0] * q64[1, 1] - q64[0, 1] * q64[1, 0]
            scale = (q64[0, 0] * q64[1, 1]).abs()
            if bool(torch.isfinite(det)) and float(det.abs()) > 1e-12 * float(scale):
                alpha = -(q64[1, 1] * b64[0] - q64[0, 1] * b64[1]) / det
                mu = -(q64[0, 0] * b64[1] - q64[1, 0] * b64[0]) / det
                out = torch.stack([alpha, mu])
                if bool(torch.isfinite(out).all()):
                    return out.to(q.dtype)
            alpha = _one_by_one(b64[0], q64[0, 0])
            return torch.stack([alpha, torch.zeros_like(b64[0])]).to(q.dtype)
        return _one_by_one(b64[0], q64[0, 0]).reshape(1).to(q.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The previous update (``None`` before the first step)."""
        return {"previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the previous update."""
        prev = state.get("previous")
        self.previous = None if prev is None else [t.clone() for t in prev]


def _one_by_one(b: Tensor, q: Tensor) -> Tensor:
    """:math:`-b/q`, and 0 at a stationary point (:math:`b = q = 0`: a flat model, not 0/0)."""
    if float(b) == 0.0 and float(q) == 0.0:
        return torch.zeros_like(b)
    return -b / q
