r"""Backtracking (Armijo) line search on the mini-batch loss (Nocedal & Wright, 2006, Alg. 3.1).

Starting from :math:`\alpha = \min(\alpha_{max}, \gamma\alpha_{t-1})` (:math:`\alpha_0` on the
first step), shrink :math:`\alpha \leftarrow \tau\alpha` until

.. math:: f(\theta - \alpha d) \le f(\theta) - c\,\alpha\, g^\top d

on the same batch, or ``max_iter`` trials are spent (the last trial is then used). Each trial is a
side-effect-free forward pass (BatchNorm buffers untouched, same mode). If :math:`g^\top d \le 0`
(not a descent direction) the rule proposes :math:`\alpha = 0`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from qlrlab._passes import functional_forward, side_effect_free
from qlrlab._tensorlist import dot
from qlrlab.interfaces import Proposal, StepContext, StepSizeRule
from qlrlab.registry import STEP_SIZES, ComponentSpec

__all__ = ["BacktrackingSpec", "BacktrackingStepSize"]


@STEP_SIZES.register("backtracking")
class BacktrackingSpec(ComponentSpec):
    """Spec of the Armijo backtracking line search.

    Attributes:
        initial: first trial :math:`\\alpha_0 > 0`.
        max_lr: largest trial :math:`\\alpha_{max}`.
        grow: :math:`\\gamma \\ge 1`, the next step starts at :math:`\\gamma\\alpha_{t-1}`.
        shrink: :math:`\\tau \\in (0, 1)`.
        c: sufficient-decrease constant in (0, 1).
        max_iter: maximum trials per step.
    """

    name: Literal["backtracking"] = "backtracking"
    initial: float = Field(1.0, gt=0.0)
    max_lr: float = Field(10.0, gt=0.0)
    grow: float = Field(2.0, ge=1.0)
    shrink: float = Field(0.5, gt=0.0, lt=1.0)
    c: float = Field(1e-4, gt=0.0, lt=1.0)
    max_iter: int = Field(20, ge=1)

    def build(self) -> BacktrackingStepSize:
        """Build the rule."""
        return BacktrackingStepSize(self)


class BacktrackingStepSize(StepSizeRule):
    """State: the last accepted :math:`\\alpha`."""

    spec: BacktrackingSpec

    def __init__(self, spec: BacktrackingSpec | None = None) -> None:
        super().__init__(spec or BacktrackingSpec())
        self.last: float | None = None

    @torch.no_grad()
    def propose(self, ctx: StepContext) -> Proposal:
        """Search :math:`\\alpha` satisfying the Armijo condition."""
        assert ctx.direction is not None
        s, pr, d = self.spec, ctx.problem, ctx.direction
        gd = dot(ctx.grads, d)
        ref = d[0]
        if not float(gd) > 0.0:
            return Proposal(alpha=torch.zeros((), dtype=ref.dtype, device=ref.device), grad_dot_direction=gd)
        f0 = float(pr.loss) if pr.loss is not None else float("nan")
        alpha = s.initial if self.last is None else min(s.max_lr, s.grow * self.last)
        base = [p.detach() for p in pr.params]
        with side_effect_free(pr.model, keep_autocast=True):
            for trial in range(s.max_iter):
                trial_params = [p - alpha * t for p, t in zip(base, d)]
                out = functional_forward(pr.model, pr.param_names, trial_params, pr.inputs)
                f = float(ctx.all_reduce(pr.loss_fn(out, pr.targets)))  # same f on every worker
                if f <= f0 - s.c * alpha * float(gd):
                    break
                if trial < s.max_iter - 1:
                    alpha *= s.shrink
        self.last = alpha
        return Proposal(
            alpha=torch.tensor(alpha, dtype=ref.dtype, device=ref.device),
            grad_dot_direction=gd,
            extras={"trials": trial + 1},
        )

    def state_dict(self) -> dict[str, Any]:
        """The last accepted step size."""
        return {"last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the last step size."""
        last = state.get("last")
        self.last = None if last is None else float(last)
