"""Fixed learning rate: :math:`\\alpha_g =` the param group's ``lr``.

The spec's ``lr`` is written into every param group at construction, so
``torch.optim.lr_scheduler`` schedules apply unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from qlrlab.interfaces import Proposal, StepContext, StepSizeRule
from qlrlab.registry import STEP_SIZES, ComponentSpec
from qlrlab.step_sizes.norm_constraint import norm_constraint_coefficient

__all__ = ["FixedSpec", "FixedStepSize"]


@STEP_SIZES.register("fixed")
class FixedSpec(ComponentSpec):
    """Spec of the fixed step size.

    Attributes:
        lr: the learning rate :math:`\\alpha \\ge 0` (initial value of every group's ``lr``).
        norm_constraint: K-FAC's norm constraint :math:`c > 0`: the direction is scaled by
            :math:`\\min(1, \\sqrt{c / \\sum_i \\alpha_i^2 g_i^\\top d_i})`
            (:mod:`qlrlab.step_sizes.norm_constraint`); ``None`` (default): off.
    """

    name: Literal["fixed"] = "fixed"
    lr: float = Field(1e-3, ge=0.0)
    norm_constraint: float | None = Field(None, gt=0.0)

    def build(self) -> FixedStepSize:
        """Build the rule."""
        return FixedStepSize(self)


class FixedStepSize(StepSizeRule):
    """Proposes :math:`\\alpha = 1`, scaled by each group's ``lr`` in the optimiser."""

    initial_group_lr: float

    def __init__(self, spec: FixedSpec | None = None) -> None:
        super().__init__(spec or FixedSpec())
        self.initial_group_lr = self.spec.lr

    def propose(self, ctx: StepContext) -> Proposal:
        """:math:`\\alpha = 1` (the group learning rate is applied by the optimiser), or the
        norm-constraint coefficient :math:`\\kappa \\le 1` when one is set."""
        ref = ctx.grads[0] if ctx.grads else torch.zeros(())
        bound = self.spec.norm_constraint
        if bound is None or ctx.direction is None:
            return Proposal(alpha=torch.ones((), dtype=ref.dtype, device=ref.device))
        lrs = [float(ctx.param_groups[gi]["lr"]) for gi in ctx.group_index]
        kappa = norm_constraint_coefficient(ctx.grads, ctx.direction, lrs, bound)
        return Proposal(alpha=kappa, extras={"norm_coefficient": kappa})
