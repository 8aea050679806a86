r"""Fixed learning rate and fixed momentum on the update (kfac-jax without adaptivity).

.. math:: \delta_t = -\alpha d_t + \mu\,\delta_{t-1}, \qquad \delta_0 = 0.

This is the update of kfac-jax with ``use_adaptive_learning_rate`` and ``use_adaptive_momentum``
off and constant schedules — the paper's "K-FAC (Unadaptive)" with the ``kfac`` direction and
``constant`` damping. With a constant :math:`\alpha` it equals heavy-ball momentum on :math:`d`.
The param group's ``lr`` multiplies the update (it is 1 unless changed); the previous update is
stored as applied.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from qlrlab.interfaces import Proposal, StepContext, StepSizeRule
from qlrlab.registry import STEP_SIZES, ComponentSpec
from qlrlab.step_sizes.norm_constraint import norm_constraint_coefficient

__all__ = ["MomentumSpec", "MomentumStepSize"]


@STEP_SIZES.register("momentum")
class MomentumSpec(ComponentSpec):
    """Spec of the fixed learning-rate-and-momentum rule.

    Attributes:
        lr: :math:`\\alpha \\ge 0`.
        momentum: :math:`\\mu \\in [0, 1)`.
        norm_constraint: K-FAC's norm constraint :math:`c > 0`, applied to :math:`d_t` before
            momentum as in kfac-jax (:mod:`qlrlab.step_sizes.norm_constraint`); ``None``
            (default): off.
    """

    name: Literal["momentum"] = "momentum"
    lr: float = Field(1e-3, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    norm_constraint: float | None = Field(None, gt=0.0)

    def build(self) -> MomentumStepSize:
        """Build the rule."""
        return MomentumStepSize(self)


class MomentumStepSize(StepSizeRule):
    """:math:`\\delta_t = -\\alpha d_t + \\mu\\delta_{t-1}`; state: :math:`\\delta_{t-1}`."""

    spec: MomentumSpec

    def __init__(self, spec: MomentumSpec | None = None) -> None:
        super().__init__(spec or MomentumSpec())
        self.previous: list[Tensor] | None = None

    def propose(self, ctx: StepContext) -> Proposal:
        """Return the explicit update."""
        assert ctx.direction is not None
        s = self.spec
        mults = [float(ctx.param_groups[gi]["lr"]) for gi in ctx.group_index]
        ref = ctx.direction[0]
        alpha = torch.tensor(s.lr, dtype=ref.dtype, device=ref.device)
        extras: dict[str, Any] = {}
        if s.norm_constraint is None:
            update = [-s.lr * t.detach() for t in ctx.direction]
        else:  # kappa * d before momentum, as kfac-jax constrains the preconditioned gradient
            lrs = [s.lr * m for m in mults]
            kappa = norm_constraint_coefficient(ctx.grads, ctx.direction, lrs, s.norm_constraint)
            alpha = alpha * kappa
            update = [-alpha * t.detach() for t in ctx.direction]
            extras["norm_coefficient"] = kappa
        if self.previous is not None and s.momentum:
            torch._foreach_add_(update, self.previous, alpha=s.momentum)
        self.previous = [u * m for u, m in zip(update, mults)]
        return Proposal(
            alpha=alpha,
            update=update,
            momentum=torch.tensor(s.momentum, dtype=ref.dtype, device=ref.device),
            extras=extras,
        )

    def state_dict(self) -> dict[str, Any]:
        """The previous update."""
        return {"previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the previous update."""
        prev = state.get("previous")
        self.previous = None if prev is None else [t.clone() for t in prev]
