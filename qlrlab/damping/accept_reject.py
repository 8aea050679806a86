r"""The "decreasing loss" rule: accept a step only if the mini-batch loss fell.

After the step, on the same batch:

.. math::
    f(\theta_{new}) \le f(\theta) \Rightarrow \text{accept},\ \lambda \leftarrow \omega_{dec}\lambda;
    \qquad\text{otherwise reject},\ \lambda \leftarrow \omega_{inc}\lambda,

with :math:`\lambda \in [\lambda_{min}, \lambda_{max}]`. A rejected step restores the parameters
and the state of the direction, curvature and step-size components exactly (``may_reject = True``
makes the optimiser copy the parameters too). A non-finite new loss is rejected. This is the
original AdamQLR code's ``damping_algorithm: decreasing_loss`` (its legacy configs). It needs no curvature oracle, although a curvature-based step size usually goes with it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from qlrlab.damping.levenberg_marquardt import LevenbergMarquardt, LevenbergMarquardtSpec
from qlrlab.registry import DAMPINGS, ComponentSpec

__all__ = ["AcceptReject", "AcceptRejectSpec"]


@DAMPINGS.register("accept_reject")
class AcceptRejectSpec(ComponentSpec):
    """Spec of the accept/reject damping rule.

    Attributes:
        initial: :math:`\\lambda_0`.
        decrease: :math:`\\omega_{dec} \\in (0, 1]` after an accepted step.
        increase: :math:`\\omega_{inc} \\ge 1` after a rejected step.
        min_damping: floor.
        max_damping: ceiling or ``None``.
    """

    name: Literal["accept_reject"] = "accept_reject"
    initial: float = Field(1e-3, ge=0.0)
    decrease: float = Field(0.5, gt=0.0, le=1.0)
    increase: float = Field(2.0, ge=1.0)
    min_damping: float = Field(1e-8, ge=0.0)
    max_damping: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> AcceptRejectSpec:
        self.to_levenberg_marquardt()
        return self

    def to_levenberg_marquardt(self) -> LevenbergMarquardtSpec:
        """The Levenberg–Marquardt spec whose λ bookkeeping is reused."""
        return LevenbergMarquardtSpec(
            initial=self.initial,
            decrease=self.decrease,
            increase=self.increase,
            min_damping=self.min_damping,
            max_damping=self.max_damping,
        )

    def build(self) -> AcceptReject:
        """Build the schedule."""
        return AcceptReject(self)


class AcceptReject(LevenbergMarquardt):
    """Accept/reject on the batch loss; state: :math:`\\lambda`."""

    may_reject = True

    def __init__(self, spec: AcceptRejectSpec | None = None) -> None:
        self.accept_spec = spec or AcceptRejectSpec()
        super().__init__(self.accept_spec.to_levenberg_marquardt())

    def needs_new_loss(self, step: int) -> bool:
        """Every step."""
        return True

    def update(self, *, rho: float | None, loss: float, new_loss: float | None, step: int) -> bool:
        """Accept (and decrease λ) iff the loss did not increase; else reject and increase λ."""
        if new_loss is not None and math.isfinite(new_loss) and new_loss <= loss:
            self._lambda = self._clip(self._lambda * self.spec.decrease)
            return True
        self._lambda = self._clip(self._lambda * self.spec.increase)
        return False
