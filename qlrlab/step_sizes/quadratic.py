r"""Learning rate from the damped quadratic model (AdamQLR; Clarke & Hernández-Lobato, 2024).

Minimising :math:`M(\theta - \alpha d) = f - \alpha g^\top d + \tfrac12\alpha^2 d^\top(C+\lambda I)d`
over :math:`\alpha` gives

.. math:: \alpha = \frac{g^\top d}{d^\top C d + \lambda \|d\|^2}

with :math:`\lambda = \lambda_{t-1}` (the damping before this step's update). The sign is kept
(a negative :math:`\alpha` still decreases the model). Optionally :math:`|\alpha|\le\alpha_{max}`
(the v1 paper's LR clipping, sign preserved), then :math:`\alpha \leftarrow k\alpha`
(amplification). ``saddle_free`` divides by :math:`|d^\top(C+\lambda I)d|` instead.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from qlrlab._tensorlist import dot, sq_norm
from qlrlab.interfaces import Proposal, StepContext, StepSizeRule
from qlrlab.registry import STEP_SIZES, ComponentSpec

__all__ = ["QuadraticSpec", "QuadraticStepSize"]


@STEP_SIZES.register("quadratic")
class QuadraticSpec(ComponentSpec):
    """Spec of the quadratic-model step size.

    Attributes:
        clip: symmetric clip :math:`\\alpha_{max} > 0`, or ``None`` (no clipping; paper v3).
        amplification: multiply :math:`\\alpha` by :math:`k > 0` after clipping.
        saddle_free: use :math:`|d^\\top (C+\\lambda I) d|` in the denominator.
    """

    requires_curvature: ClassVar[bool] = True

    name: Literal["quadratic"] = "quadratic"
    clip: float | None = Field(None, gt=0.0)
    amplification: float = Field(1.0, gt=0.0)
    saddle_free: bool = False

    def build(self) -> QuadraticStepSize:
        """Build the rule."""
        return QuadraticStepSize(self)


class QuadraticStepSize(StepSizeRule):
    """Computes :math:`\\alpha = g^\\top d / (d^\\top C d + \\lambda\\|d\\|^2)`."""

    spec: QuadraticSpec

    def __init__(self, spec: QuadraticSpec | None = None) -> None:
        super().__init__(spec or QuadraticSpec())

    def propose(self, ctx: StepContext) -> Proposal:
        """Return :math:`\\alpha` with :math:`g^\\top d`, :math:`d^\\top C d` and :math:`\\|d\\|^2`."""
        assert ctx.direction is not None and ctx.curvature is not None
        d = ctx.direction
        q = ctx.all_reduce(ctx.curvature.quadratic_form(d))
        gd = dot(ctx.grads, d)
        dd = sq_norm(d)
        denom = q + ctx.damping * dd
        if self.spec.saddle_free:
            denom = denom.abs()
        alpha = gd / denom
        # at a stationary point (g = 0, so d = 0 for every direction here) the model is flat:
        # alpha = 0, not 0/0 (a NaN the optimiser would refuse as non-finite, ending the run)
        alpha = torch.where((gd == 0) & (denom == 0), torch.zeros_like(alpha), alpha)
        if self.spec.clip is not None:
            alpha = alpha.clamp(-self.spec.clip, self.spec.clip)
        if self.spec.amplification != 1.0:  # (x * 1.0 == x exactly: skip the op)
            alpha = alpha * self.spec.amplification
        return Proposal(alpha=alpha.detach(), grad_dot_direction=gd, curvature=q, sq_norm=dd)
