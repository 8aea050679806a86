"""Stochastic-gradient direction with heavy-ball or Nesterov momentum and L2 weight decay.

.. math::
    \\tilde g_t = g_t + w\\theta_t,\\quad b_t = \\mu b_{t-1} + (1-\\tau)\\tilde g_t\\ (b_1 = \\tilde g_1),\\quad
    d_t = \\begin{cases}\\tilde g_t + \\mu b_t & \\text{Nesterov}\\\\ b_t & \\text{otherwise}\\end{cases}

With the ``fixed`` step size this is exactly ``torch.optim.SGD``. The paper's "SGD Full" is
heavy-ball momentum with weight decay added to the gradient before momentum (this rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec

__all__ = ["SGDDirection", "SGDSpec"]


@DIRECTIONS.register("sgd")
class SGDSpec(ComponentSpec):
    """Spec of the SGD direction.

    Attributes:
        momentum: momentum :math:`\\mu` in [0, 1).
        dampening: momentum dampening :math:`\\tau` in [0, 1].
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening = 0``).
        weight_decay: L2 weight decay :math:`w \\ge 0` added to the gradient.
    """

    name: Literal["sgd"] = "sgd"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    dampening: float = Field(0.0, ge=0.0, le=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check_nesterov(self) -> SGDSpec:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "nesterov: Nesterov momentum needs momentum > 0 and dampening = 0; "
                "set momentum (e.g. 0.9) or nesterov: false"
            )
        return self

    def build(self) -> SGDDirection:
        """Build the direction provider."""
        return SGDDirection(self)


class SGDDirection(DirectionProvider):
    """SGD direction provider; state: the momentum buffers."""

    spec: SGDSpec

    def __init__(self, spec: SGDSpec | None = None) -> None:
        super().__init__(spec or SGDSpec())
        self.buffers: list[Tensor] | None = None

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Reset the momentum buffers."""
        self.buffers = None

    @torch.no_grad()
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Return :math:`d` (and update the momentum buffers)."""
        s = self.spec
        if s.weight_decay:
            g = list(torch._foreach_add(grads, ctx.problem.params, alpha=s.weight_decay))
        else:
            g = [t.clone() for t in grads]
        if s.momentum == 0:
            return g
        if self.buffers is None:
            self.buffers = [t.clone() for t in g]
        else:
            torch._foreach_mul_(self.buffers, s.momentum)
            torch._foreach_add_(self.buffers, g, alpha=1.0 - s.dampening)
        if s.nesterov:
            torch._foreach_add_(g, self.buffers, alpha=s.momentum)
            return g
        return [b.clone() for b in self.buffers]

    def param_state(self) -> list[dict[str, Any]] | None:
        """``momentum_buffer`` per parameter (``torch.optim.SGD``'s key), once there is one."""
        if self.buffers is None:
            return None
        return [{"momentum_buffer": b} for b in self.buffers]

    def state_dict(self) -> dict[str, Any]:
        """The momentum buffers (``None`` before the first step)."""
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the momentum buffers."""
        bufs = state.get("buffers")
        self.buffers = None if bufs is None else [b.clone() for b in bufs]
