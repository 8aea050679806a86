r"""The Rosenbrock function as a two-parameter least-squares "model".

.. math::
    R(x, y) = (a - x)^2 + b\,(y - x^2)^2, \qquad
    r(x, y) = \big(a - x,\ \sqrt b\,(y - x^2)\big),

so that the mean ½-squared residual :math:`\tfrac12 \cdot \tfrac12 (r_1^2 + r_2^2) = R/4`
(:class:`qlrlab.losses.HalfMSELoss` against zero targets). This is the AdamQLR v3 formulation
(Clarke & Hernández-Lobato, 2024), which gives K-FAC and the GGN a proper output space. The
minimum is :math:`(a, a^2) = (1, 1)` for the default :math:`a=1, b=100`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["RosenbrockModel"]


class RosenbrockModel(nn.Module):
    """Parameters ``x`` and ``y`` (0-d); the output is the residual vector.

    Args:
        a: the Rosenbrock :math:`a`.
        b: the Rosenbrock :math:`b`.
        start: initial ``(x, y)``; the paper's fixed start is ``(1, −1)``.
    """

    def __init__(
        self, a: float = 1.0, b: float = 100.0, start: tuple[float, float] = (1.0, -1.0)
    ) -> None:
        super().__init__()
        self.a = float(a)
        self.b = float(b)
        self.x = nn.Parameter(torch.tensor(float(start[0])))
        self.y = nn.Parameter(torch.tensor(float(start[1])))

    def forward(self, input: Tensor) -> Tensor:
        """Residuals ``[N, 2]`` (the same row for each of the ``N`` dummy inputs)."""
        r = torch.stack([self.a - self.x, math.sqrt(self.b) * (self.y - self.x**2)])
        return r.to(input.dtype).unsqueeze(0).expand(input.shape[0], 2)

    def rosenbrock(self) -> float:
        """The Rosenbrock value :math:`R(x, y)` at the current parameters."""
        x, y = self.position
        return (self.a - x) ** 2 + self.b * (y - x * x) ** 2

    @property
    def position(self) -> tuple[float, float]:
        """The current ``(x, y)``."""
        return float(self.x.detach()), float(self.y.detach())
