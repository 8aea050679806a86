r"""Two new heuristics for qlrlab, written as a user's own module.

* ``capped_quadratic`` (step-size rule): AdamQLR's quadratic-model learning rate, with the step
  length capped by a trust radius :math:`\Delta`:

  .. math::
      \alpha = \frac{g^\top d}{d^\top C d + \lambda\|d\|^2}, \qquad
      \alpha \leftarrow \operatorname{sign}(\alpha)\,\min\Big(|\alpha|,
      \frac{\Delta}{\|d\|}\Big),

  so :math:`\|\alpha d\| \le \Delta` whatever the curvature says.

* ``smooth_rho`` (damping schedule): a continuous version of the Levenberg–Marquardt rule. With
  the reduction ratio :math:`\rho`, a factor :math:`\gamma \ge 1` and
  :math:`s(\rho) = \operatorname{clip}(1 - 2\rho, -1, 1)`,

  .. math:: \lambda \leftarrow \operatorname{clip}\big(\lambda\,\gamma^{s(\rho)},
      \lambda_{min}, \lambda_{max}\big),

  so :math:`\rho \ge 1` divides :math:`\lambda` by :math:`\gamma`, :math:`\rho = 1/2` keeps it,
  :math:`\rho \le 0` multiplies it by :math:`\gamma`, and everything in between moves it
  smoothly instead of jumping at 1/4 and 3/4. A NaN :math:`\rho` increases :math:`\lambda`.

Importing this module registers both in qlrlab's registries, after which optimiser specs (and
therefore presets, run, ablation and tuning specs) can name them like any built-in component::

    import my_heuristics  # noqa: F401  (registers capped_quadratic and smooth_rho)
    spec = qlrlab.OptimizerSpec.model_validate({
        "direction": "adam", "curvature": "ggn",
        "step_size": {"name": "capped_quadratic", "radius": 0.5},
        "damping": {"name": "smooth_rho", "initial": 1e-3, "factor": 2.0},
    })
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from qlrlab.damping import check_damping_bounds, clip_damping
from qlrlab.interfaces import DampingSchedule, Proposal, StepContext, StepSizeRule
from qlrlab.registry import DAMPINGS, STEP_SIZES, ComponentSpec

__all__ = ["CappedQuadratic", "CappedQuadraticSpec", "SmoothRho", "SmoothRhoSpec"]


# --8<-- [start:step_size]
@STEP_SIZES.register("capped_quadratic")
class CappedQuadraticSpec(ComponentSpec):
    """Spec of the trust-region-capped quadratic-model step size.

    Attributes:
        radius: the trust radius :math:`\\Delta > 0`, the largest allowed :math:`\\|\\alpha d\\|`.
    """

    requires_curvature: ClassVar[bool] = True  # refuse specs without a curvature oracle

    name: Literal["capped_quadratic"] = "capped_quadratic"
    radius: float = Field(1.0, gt=0.0)

    def build(self) -> CappedQuadratic:
        """Build the rule."""
        return CappedQuadratic(self)


class CappedQuadratic(StepSizeRule):
    """:math:`\\alpha = g^\\top d / (d^\\top C d + \\lambda\\|d\\|^2)`, capped so that
    :math:`\\|\\alpha d\\| \\le \\Delta`."""

    spec: CappedQuadraticSpec

    def __init__(self, spec: CappedQuadraticSpec | None = None) -> None:
        super().__init__(spec or CappedQuadraticSpec())

    def propose(self, ctx: StepContext) -> Proposal:
        """Return the capped :math:`\\alpha` and the scalars the optimiser needs for :math:`\\rho`."""
        assert ctx.direction is not None and ctx.curvature is not None
        d, g = ctx.direction, ctx.grads
        quad = ctx.all_reduce(ctx.curvature.quadratic_form(d))  # d^T C d, averaged over workers
        grad_dot = sum((gi * di).sum() for gi, di in zip(g, d))  # g^T d
        sq_norm = sum((di * di).sum() for di in d)  # ||d||^2
        alpha = grad_dot / (quad + ctx.damping * sq_norm)  # ctx.damping is lambda_{t-1}
        cap = self.spec.radius / sq_norm.sqrt().clamp_min(1e-30)
        alpha = alpha.sign() * alpha.abs().minimum(cap)
        return Proposal(
            alpha=alpha.detach(),
            grad_dot_direction=grad_dot,  # g^T d, d^T C d and ||d||^2 let the optimiser compute the
            curvature=quad,  # predicted change (and rho) without another curvature product
            sq_norm=sq_norm,
            extras={"capped": bool(alpha.abs() >= cap)},
        )


# --8<-- [end:step_size]


# --8<-- [start:damping]
@DAMPINGS.register("smooth_rho")
class SmoothRhoSpec(ComponentSpec):
    """Spec of the smooth :math:`\\rho`-driven damping schedule.

    Attributes:
        initial: :math:`\\lambda_0 \\ge 0`.
        factor: :math:`\\gamma \\ge 1`, the largest change per step (:math:`\\rho \\le 0` or
            :math:`\\rho \\ge 1`).
        min_damping: floor :math:`\\lambda_{min}`.
        max_damping: ceiling :math:`\\lambda_{max}` (``None``: none).
    """

    requires_curvature: ClassVar[bool] = True  # rho needs the model's predicted change

    name: Literal["smooth_rho"] = "smooth_rho"
    initial: float = Field(1e-3, ge=0.0)
    factor: float = Field(2.0, ge=1.0)
    min_damping: float = Field(1e-8, ge=0.0)
    max_damping: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _check_bounds(self) -> SmoothRhoSpec:
        check_damping_bounds(self.min_damping, self.max_damping)
        return self

    def build(self) -> SmoothRho:
        """Build the schedule."""
        return SmoothRho(self)


class SmoothRho(DampingSchedule):
    """:math:`\\lambda \\leftarrow \\lambda\\,\\gamma^{\\operatorname{clip}(1 - 2\\rho, -1, 1)}`;
    state: :math:`\\lambda`."""

    spec: SmoothRhoSpec
    rho_model = "damped"  # rho divides by the change predicted with C + lambda I

    def __init__(self, spec: SmoothRhoSpec | None = None) -> None:
        super().__init__(spec or SmoothRhoSpec())
        self._lambda = self._clip(self.spec.initial)

    def _clip(self, lam: float) -> float:
        return clip_damping(lam, self.spec.min_damping, self.spec.max_damping)

    @property
    def value(self) -> float:
        """The current :math:`\\lambda`."""
        return self._lambda

    def needs_new_loss(self, step: int) -> bool:
        """Every step needs :math:`f(\\theta_{new})`, hence :math:`\\rho`."""
        return True

    def update(self, *, rho: float | None, loss: float, new_loss: float | None, step: int) -> bool:
        """Move :math:`\\lambda` smoothly with :math:`\\rho` (never rejects the step)."""
        if rho is None:
            return True
        s = 1.0 if math.isnan(rho) else min(1.0, max(-1.0, 1.0 - 2.0 * rho))
        self._lambda = self._clip(self._lambda * self.spec.factor**s)
        return True

    def on_nonfinite(self) -> None:
        """A non-finite loss or step: increase :math:`\\lambda` by :math:`\\gamma`."""
        self._lambda = self._clip(self._lambda * self.spec.factor)

    def state_dict(self) -> dict[str, Any]:
        """:math:`\\lambda` (saved in the optimiser's checkpoint)."""
        return {"damping": self._lambda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :math:`\\lambda`."""
        self._lambda = float(state["damping"])


# --8<-- [end:damping]
