r"""Diagonal-GGN preconditioning from BackPACK (``DiagGGNExact`` or ``DiagGGNMC``).

.. math::
    D_t = \epsilon D_{t-1} + (1-\epsilon)\operatorname{diag}(\hat G_t)\ (D_1 = \operatorname{diag}
    \hat G_1), \qquad d = g / (D_t + \lambda)

with :math:`\lambda` the damping schedule's :math:`\lambda_{t-1}` (floored at ``min_damping``).
The diagonal is computed during the gradient pass on a BackPACK twin sharing the model's
Parameters (:mod:`qlrlab.directions._backpack`); layers without a BackPACK rule (LayerNorm,
train-mode BatchNorm, ...) use ``torch.func`` per-layer Jacobians. A diagonal, second-order
cousin of Adam's :math:`\sqrt{v}` (Dangel et al., 2020).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from qlrlab.directions._backpack import BackpackTwin
from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec

__all__ = ["DiagGGNDirection", "DiagGGNSpec"]


@DIRECTIONS.register("diag_ggn")
class DiagGGNSpec(ComponentSpec):
    """Spec of the diagonal-GGN direction.

    Attributes:
        exact: ``DiagGGNExact`` (``True``) or ``DiagGGNMC`` (``False``).
        mc_samples: Monte-Carlo samples (``exact: false`` only).
        curvature_ema: decay :math:`\\epsilon \\in [0, 1)` of the diagonal.
        min_damping: floor of :math:`\\lambda`.
        converter: BackPACK's fx converter: ``"auto"``, ``"always"`` or ``"never"``.
    """

    supports_nan_padding: ClassVar[bool] = False
    name: Literal["diag_ggn"] = "diag_ggn"
    exact: bool = True
    mc_samples: int = Field(1, ge=1)
    curvature_ema: float = Field(0.95, ge=0.0, lt=1.0)
    min_damping: float = Field(1e-8, ge=0.0)
    converter: Literal["auto", "always", "never"] = "auto"

    def nan_padding_unsupported(self, family: str) -> str | None:
        """BackPACK computes this direction's curvature with its own loss handling."""
        return f"the {self.name!r} direction takes its curvature from BackPACK"

    def build(self) -> DiagGGNDirection:
        """Build the direction provider."""
        return DiagGGNDirection(self)


class DiagGGNDirection(DirectionProvider):
    """Diagonal-GGN direction; state: ``step`` and the averaged diagonals."""

    spec: DiagGGNSpec

    def __init__(self, spec: DiagGGNSpec | None = None) -> None:
        super().__init__(spec or DiagGGNSpec())
        self.twin: BackpackTwin | None = None
        self.step = 0
        self.diags: list[Tensor | None] = []

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Build the BackPACK twin."""
        s = self.spec
        self.twin = BackpackTwin(
            model,
            loss_fn,
            params,
            owner="diag_ggn",
            extension="diag_ggn_exact" if s.exact else "diag_ggn_mc",
            mc_samples=s.mc_samples,
            converter=s.converter,
        )
        self.step = 0
        self.diags = [None] * len(params)

    @contextlib.contextmanager
    def gradient_pass(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the gradient pass on the extended twin."""
        assert self.twin is not None, "setup() was not called"
        with self.twin.gradient_pass() as twin:
            yield twin

    @torch.no_grad()
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Average the fresh diagonal and return :math:`g / (D + \\lambda)`."""
        assert self.twin is not None, "setup() was not called"
        fresh = self.twin.collect()
        self.step += 1
        eps = self.spec.curvature_ema if self.step > 1 else 0.0
        for i, local in fresh.items():
            new = ctx.all_reduce(local)  # the global batch's diagonal (workers average)
            old = self.diags[i]
            self.diags[i] = new.clone() if old is None or eps == 0 else eps * old + (1 - eps) * new
        lam = max(float(ctx.damping), self.spec.min_damping)
        return [g.clone() if dg is None else g / (dg + lam) for g, dg in zip(grads, self.diags)]

    def state_dict(self) -> dict[str, Any]:
        """Step counter and the averaged diagonals."""
        return {"step": self.step, "diags": list(self.diags)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (copies of) the averaged diagonals."""
        self.step = int(state["step"])
        self.diags = [None if t is None else t.clone() for t in state["diags"]]
