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

__all__ = ["FixedSpec", "FixedStepSize"]


@STEP_SIZES.register("fixed")
class FixedSpec(ComponentSpec):
    """Spec of the fixed step size.

    Attributes:
        lr: the learning rate :math:`\\alpha \\ge 0` (initial value of every group's ``lr``).
    """

    name: Literal["fixed"] = "fixed"
    lr: float = Field(1e-3, ge=0.0)

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
        """:math:`\\alpha = 1` (the group learning rate is applied by the optimiser)."""
        ref = ctx.grads[0] if ctx.grads else torch.zeros(())
        return Proposal(alpha=torch.ones((), dtype=ref.dtype, device=ref.device))
