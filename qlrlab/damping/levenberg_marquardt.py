r"""Levenberg–Marquardt adaptive damping (Moré, 1978; Martens & Grosse, 2015; AdamQLR).

Every ``interval`` steps, with :math:`\rho = (f(\theta_{new}) - f(\theta))/\Delta M`:

.. math::
    \lambda \leftarrow \begin{cases}
        \omega_{dec}\lambda & \rho > \text{upper} \ (3/4)\\
        \omega_{inc}\lambda & \rho < \text{lower} \ (1/4)\\
        \lambda & \text{otherwise}
    \end{cases}, \qquad \lambda \leftarrow \operatorname{clip}(\lambda, \lambda_{min}, \lambda_{max}).

:math:`\Delta M` uses the damped model :math:`C + \lambda I` (AdamQLR) or the undamped one
(kfac-jax's default). A NaN :math:`\rho` keeps :math:`\lambda` (AdamQLR) or increases it (K-FAC).
A non-finite loss or step increases :math:`\lambda`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from qlrlab.damping.bounds import check_damping_bounds, clip_damping
from qlrlab.interfaces import DampingSchedule
from qlrlab.registry import DAMPINGS, ComponentSpec

__all__ = ["LevenbergMarquardt", "LevenbergMarquardtSpec"]


@DAMPINGS.register("levenberg_marquardt")
class LevenbergMarquardtSpec(ComponentSpec):
    """Spec of Levenberg–Marquardt damping.

    Attributes:
        initial: :math:`\\lambda_0 \\ge 0` (clipped into ``[min_damping, max_damping]``).
        decrease: :math:`\\omega_{dec} \\in (0, 1]`, applied when :math:`\\rho >` upper.
        increase: :math:`\\omega_{inc} \\ge 1`, applied when :math:`\\rho <` lower.
        lower_threshold: 1/4 by default.
        upper_threshold: 3/4 by default (must exceed ``lower_threshold``).
        interval: adjust every ``interval`` steps (1 = every step).
        min_damping: floor (1e-8).
        max_damping: ceiling or ``None``.
        model: ``"damped"`` (AdamQLR) or ``"undamped"`` (kfac-jax) quadratic model for :math:`\\rho`.
        nan_policy: ``"keep"`` (AdamQLR) or ``"increase"`` (kfac-jax) on a NaN :math:`\\rho`.
    """

    requires_curvature: ClassVar[bool] = True

    name: Literal["levenberg_marquardt"] = "levenberg_marquardt"
    initial: float = Field(1e-3, ge=0.0)
    decrease: float = Field(0.5, gt=0.0, le=1.0)
    increase: float = Field(2.0, ge=1.0)
    lower_threshold: float = 0.25
    upper_threshold: float = 0.75
    interval: int = Field(1, ge=1)
    min_damping: float = Field(1e-8, ge=0.0)
    max_damping: float | None = Field(None, gt=0.0)
    model: Literal["damped", "undamped"] = "damped"
    nan_policy: Literal["keep", "increase"] = "keep"

    @model_validator(mode="after")
    def _check_order(self) -> LevenbergMarquardtSpec:
        if not self.lower_threshold < self.upper_threshold:
            raise ValueError(
                f"lower_threshold ({self.lower_threshold}) must be below upper_threshold "
                f"({self.upper_threshold}); the usual values are 0.25 and 0.75"
            )
        check_damping_bounds(self.min_damping, self.max_damping)
        return self

    def build(self) -> LevenbergMarquardt:
        """Build the schedule."""
        return LevenbergMarquardt(self)


class LevenbergMarquardt(DampingSchedule):
    """Levenberg–Marquardt rule; state: :math:`\\lambda`."""

    spec: LevenbergMarquardtSpec

    def __init__(self, spec: LevenbergMarquardtSpec | None = None) -> None:
        super().__init__(spec or LevenbergMarquardtSpec())
        self.rho_model = self.spec.model
        self._lambda = self._clip(self.spec.initial)

    def _clip(self, lam: float) -> float:
        return clip_damping(lam, self.spec.min_damping, self.spec.max_damping)

    @property
    def value(self) -> float:
        """Current :math:`\\lambda`."""
        return self._lambda

    def needs_new_loss(self, step: int) -> bool:
        """True on adjustment steps (every ``interval``)."""
        return step % self.spec.interval == 0

    def update(self, *, rho: float | None, loss: float, new_loss: float | None, step: int) -> bool:
        """Apply the :math:`\\rho` rule (always accepts the step)."""
        if rho is None or not self.needs_new_loss(step):
            return True
        s = self.spec
        if rho != rho:  # NaN
            if s.nan_policy == "increase":
                self._lambda = self._clip(self._lambda * s.increase)
        elif rho > s.upper_threshold:
            self._lambda = self._clip(self._lambda * s.decrease)
        elif rho < s.lower_threshold:
            self._lambda = self._clip(self._lambda * s.increase)
        return True

    def on_nonfinite(self) -> None:
        """Increase :math:`\\lambda` after a non-finite loss or step."""
        self._lambda = self._clip(self._lambda * self.spec.increase)

    def state_dict(self) -> dict[str, Any]:
        """:math:`\\lambda`."""
        return {"damping": self._lambda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :math:`\\lambda`."""
        self._lambda = float(state["damping"])
