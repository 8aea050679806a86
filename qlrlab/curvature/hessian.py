r"""Hessian curvature :math:`H = \nabla^2 f` of the mean mini-batch loss.

Products use double backward (Pearlmutter, 1994): :math:`Hv = \nabla_\theta (\nabla_\theta f \cdot v)`;
the gradient graph is built once per bound batch and reused for several products. Used by the
paper's curvature ablation ("AdamQLR (Hessian)") and on Rosenbrock. The Hessian may be
indefinite, so :math:`d^\top H d + \lambda\|d\|^2` can be negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from qlrlab._passes import functional_forward, side_effect_free
from qlrlab._tensorlist import dot
from qlrlab.interfaces import BoundCurvature, CurvatureOracle, Problem
from qlrlab.registry import CURVATURES, ComponentSpec

__all__ = ["BoundHessian", "HessianOracle", "HessianSpec"]


@CURVATURES.register("hessian")
class HessianSpec(ComponentSpec):
    """Spec of the Hessian curvature oracle.

    Attributes:
        backend: ``"own"`` (double backward) or ``"curvlinops"`` (``HessianLinearOperator``).
    """

    supports_nan_padding: ClassVar[bool] = True
    name: Literal["hessian"] = "hessian"
    backend: Literal["own", "curvlinops"] = "own"

    def nan_padding_unsupported(self, family: str) -> str | None:
        """The curvlinops back-end has no NaN-padding emulation."""
        if self.backend == "curvlinops":
            return "the curvlinops back-end has no NaN-padding emulation"
        return None

    def build(self) -> HessianOracle:
        """Build the oracle."""
        return HessianOracle(self)


class BoundHessian(BoundCurvature):
    """Hessian of one mini-batch by double backward."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self._params: list[Tensor] | None = None
        self._grads: tuple[Tensor, ...] | None = None

    def _build(self) -> None:
        pr = self.problem
        self._params = [p.detach().requires_grad_(True) for p in pr.params]
        with torch.enable_grad(), side_effect_free(pr.model):
            out = functional_forward(pr.model, pr.param_names, self._params, pr.inputs)
            loss = pr.loss_fn(out, pr.targets)
            self._grads = torch.autograd.grad(loss, self._params, create_graph=True)

    def matvec(self, v: list[Tensor]) -> list[Tensor]:
        """:math:`Hv`."""
        if self._grads is None:
            self._build()
        assert self._grads is not None and self._params is not None
        with torch.enable_grad():
            hv = torch.autograd.grad(
                self._grads,
                self._params,
                [t.detach() for t in v],
                retain_graph=True,
                allow_unused=True,
            )
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self._params, hv)]

    def quadratic_form(self, v: list[Tensor]) -> Tensor:
        """:math:`v^\\top H v`."""
        return dot(v, self.matvec(v))


class HessianOracle(CurvatureOracle):
    """Binds :class:`BoundHessian` (own back-end) or curvlinops ``HessianLinearOperator``."""

    reference = "hessian"

    spec: HessianSpec

    def __init__(self, spec: HessianSpec | None = None) -> None:
        super().__init__(spec or HessianSpec())

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Check the loss is supported by the chosen back-end."""
        if self.spec.backend == "curvlinops":
            from qlrlab.backends.curvlinops_adapter import check_curvlinops_support

            check_curvlinops_support(model, loss_fn)

    def bind(self, problem: Problem) -> BoundCurvature:
        """Bind to ``problem``."""
        if self.spec.backend == "curvlinops":
            from curvlinops import HessianLinearOperator

            from qlrlab.backends.curvlinops_adapter import CurvlinopsBound

            return CurvlinopsBound(problem, HessianLinearOperator)
        return BoundHessian(problem)
