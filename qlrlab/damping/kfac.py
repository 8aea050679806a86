r"""K-FAC's damping rule as implemented by kfac-jax (Martens & Grosse, 2015, §6.5).

A Levenberg–Marquardt rule (:class:`~qlrlab.damping.LevenbergMarquardt`) with kfac-jax's
settings: every ``interval`` steps :math:`T`, with :math:`\omega = \text{decay}^{T}`,

.. math::
    \lambda \leftarrow \begin{cases} \omega\lambda & \rho > 3/4\\ \lambda/\omega & \rho < 1/4\\
    \lambda & \text{otherwise}\end{cases},\qquad \lambda \in [\lambda_{min}, \lambda_{max}],

:math:`\rho` from the **undamped** quadratic model (kfac-jax ``include_damping_in_quad_change =
False``) and a NaN :math:`\rho` treated as very negative (:math:`\lambda` increases). kfac-jax
0.0.3's default ``damping_adaptation_decay`` is 0.9 and the paper's configuration adapts every
step (:math:`T = 1`), so :math:`\lambda` is multiplied by 0.9 or divided by 0.9 per step (the
default here). Martens & Grosse's original choice is decay 0.95 with :math:`T = 5`
(:math:`\omega = (19/20)^5`). The λ entering the factor inverses and the (α, μ) model is the one
before the step (``ctx.damping``).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from qlrlab.damping.levenberg_marquardt import LevenbergMarquardt, LevenbergMarquardtSpec
from qlrlab.registry import DAMPINGS, ComponentSpec

__all__ = ["KFACDamping", "KFACDampingSpec"]


@DAMPINGS.register("kfac")
class KFACDampingSpec(ComponentSpec):
    """Spec of K-FAC's damping rule.

    Attributes:
        initial: :math:`\\lambda_0` (the paper's untuned K-FAC: 1.0).
        decay: per-step decay; the factor per adjustment is :math:`\\omega =
            \\text{decay}^{\\text{interval}}` (kfac-jax ``damping_adaptation_decay``, 0.9).
        interval: adjust every ``interval`` steps (kfac-jax ``damping_adaptation_interval``).
        lower_threshold: 1/4.
        upper_threshold: 3/4.
        min_damping: 1e-8.
        max_damping: ``None`` (unbounded, kfac-jax's default).
        min_relative_change: a step whose loss change :math:`|f(\\theta_{new}) - f(\\theta)|`
            is at most this times :math:`|f(\\theta)|` is below the loss's float32 rounding
            resolution: its :math:`\\rho` says nothing about the model's fit and :math:`\\lambda`
            is left unchanged (``None`` or 0: off, every :math:`\\rho` counts, as in kfac-jax).
            Without it, a loss at its floor gives :math:`\\rho = 0` step after step and
            :math:`\\lambda` grows without bound (UCI Energy, full batch).
    """

    requires_curvature: ClassVar[bool] = True

    name: Literal["kfac"] = "kfac"
    initial: float = Field(1.0, ge=0.0)
    decay: float = Field(0.9, gt=0.0, lt=1.0)
    interval: int = Field(1, ge=1)
    lower_threshold: float = 0.25
    upper_threshold: float = 0.75
    min_damping: float = Field(1e-8, ge=0.0)
    max_damping: float | None = Field(None, gt=0.0)
    min_relative_change: float | None = Field(1e-6, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> KFACDampingSpec:
        self.to_levenberg_marquardt()  # same checks (thresholds, bounds)
        return self

    @property
    def omega(self) -> float:
        """The factor per adjustment, :math:`\\text{decay}^{\\text{interval}}`."""
        return self.decay**self.interval

    def to_levenberg_marquardt(self) -> LevenbergMarquardtSpec:
        """The equivalent Levenberg–Marquardt spec."""
        return LevenbergMarquardtSpec(
            initial=self.initial,
            decrease=self.omega,
            increase=1.0 / self.omega,
            lower_threshold=self.lower_threshold,
            upper_threshold=self.upper_threshold,
            interval=self.interval,
            min_damping=self.min_damping,
            max_damping=self.max_damping,
            model="undamped",
            nan_policy="increase",
        )

    def build(self) -> KFACDamping:
        """Build the schedule."""
        return KFACDamping(self)


class KFACDamping(LevenbergMarquardt):
    """Levenberg–Marquardt with kfac-jax's settings; ``kfac_spec`` keeps the original spec."""

    def __init__(self, spec: KFACDampingSpec | None = None) -> None:
        self.kfac_spec = spec or KFACDampingSpec()
        super().__init__(self.kfac_spec.to_levenberg_marquardt())

    def update(self, *, rho: float | None, loss: float, new_loss: float | None, step: int) -> bool:
        """The :math:`\\rho` rule, skipped when the loss change is below ``min_relative_change``
        (see :class:`KFACDampingSpec`)."""
        tol = self.kfac_spec.min_relative_change
        if tol and new_loss is not None and math.isfinite(loss) and math.isfinite(new_loss):
            if abs(new_loss - loss) <= tol * abs(loss):
                return True
        return super().update(rho=rho, loss=loss, new_loss=new_loss, step=step)
