r"""Hypergradient learning rate (Baydin et al., 2018; the paper's "Baydin SGD").

.. math:: \alpha_t = \alpha_{t-1} + \beta\, g_t^\top d_{t-1}, \qquad d_0 = 0,

i.e. gradient descent on :math:`\alpha` using
:math:`\partial f(\theta_{t-1} - \alpha d_{t-1})/\partial\alpha = -g_t^\top d_{t-1}`. With the
``sgd`` direction (:math:`d = g`) this is SGD-HD, :math:`\alpha_t = \alpha_{t-1} + \beta
g_t^\top g_{t-1}`; with ``adam`` it is Adam-HD. The step is :math:`\theta - \alpha_t d_t` (times
the param group's ``lr``, 1 unless changed).

Reference: Baydin, Cornish, Martínez Rubio, Schmidt & Wood, *Online learning rate adaptation with
hypergradient descent*, ICLR 2018.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from qlrlab._tensorlist import dot
from qlrlab.interfaces import Proposal, StepContext, StepSizeRule
from qlrlab.registry import STEP_SIZES, ComponentSpec

__all__ = ["HypergradientSpec", "HypergradientStepSize"]


@STEP_SIZES.register("hypergradient")
class HypergradientSpec(ComponentSpec):
    """Spec of the hypergradient step size.

    Attributes:
        lr: initial learning rate :math:`\\alpha_0`.
        beta: hypergradient learning rate :math:`\\beta \\ge 0`.
    """

    name: Literal["hypergradient"] = "hypergradient"
    lr: float = Field(1e-2, ge=0.0)
    beta: float = Field(1e-4, ge=0.0)

    def build(self) -> HypergradientStepSize:
        """Build the rule."""
        return HypergradientStepSize(self)


class HypergradientStepSize(StepSizeRule):
    """State: :math:`\\alpha_{t-1}` and :math:`d_{t-1}`."""

    spec: HypergradientSpec

    def __init__(self, spec: HypergradientSpec | None = None) -> None:
        super().__init__(spec or HypergradientSpec())
        self.alpha = float(self.spec.lr)
        self.previous: list[Tensor] | None = None

    def propose(self, ctx: StepContext) -> Proposal:
        """Update :math:`\\alpha` with the hypergradient and propose it."""
        assert ctx.direction is not None
        if self.previous is not None:
            self.alpha = self.alpha + self.spec.beta * float(dot(ctx.grads, self.previous))
        self.previous = [t.detach().clone() for t in ctx.direction]
        ref = ctx.direction[0]
        return Proposal(alpha=torch.tensor(self.alpha, dtype=ref.dtype, device=ref.device))

    def state_dict(self) -> dict[str, Any]:
        """:math:`\\alpha` and the previous direction."""
        return {"alpha": self.alpha, "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :math:`\\alpha` and the previous direction."""
        self.alpha = float(state["alpha"])
        prev = state.get("previous")
        self.previous = None if prev is None else [t.clone() for t in prev]
