r"""Generalised Gauss–Newton curvature :math:`G = J^\top H_z J` (= Fisher for CE, ½·MSE, BCE).

The quadratic form costs one forward-mode Jacobian-vector product :math:`u = J d` and the
closed-form output Hessian of the loss (:mod:`qlrlab.losses`):

.. math:: d^\top G d = u^\top H_z u,

e.g. :math:`\frac1N\sum_n \big(\sum_k p_{nk} u_{nk}^2 - (\sum_k p_{nk}u_{nk})^2\big)` for
softmax cross-entropy (Martens & Grosse, 2015; Clarke & Hernández-Lobato, 2024, §1.4 of
``notes/adamqlr-paper-and-code.md``). Products :math:`Gv` add one vector–Jacobian product.
Losses without a closed form use a double-backward output-Hessian product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from qlrlab._passes import functional_forward, side_effect_free
from qlrlab.interfaces import BoundCurvature, CurvatureOracle, Problem
from qlrlab.losses import output_hvp
from qlrlab.registry import CURVATURES, ComponentSpec

__all__ = ["BoundGGN", "GGNOracle", "GGNSpec"]


@CURVATURES.register("ggn")
class GGNSpec(ComponentSpec):
    """Spec of the GGN / Fisher curvature oracle.

    Attributes:
        backend: ``"own"`` (forward-mode JVP + closed-form output Hessian) or ``"curvlinops"``
            (``GGNLinearOperator``, rebuilt each step; reference).
    """

    name: Literal["ggn"] = "ggn"
    backend: Literal["own", "curvlinops"] = "own"

    def build(self) -> GGNOracle:
        """Build the oracle."""
        return GGNOracle(self)


class BoundGGN(BoundCurvature):
    """GGN of one mini-batch, own path (``torch.func.jvp`` / ``vjp`` on a functional model)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self._params = tuple(p.detach() for p in problem.params)
        self._vjp = None
        self._z: Tensor | None = None

    def _f(self, *params: Tensor) -> Tensor:
        return functional_forward(
            self.problem.model, self.problem.param_names, params, self.problem.inputs
        )

    def jvp(self, v: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Outputs :math:`z` and output tangent :math:`u = Jv` (one forward-mode pass)."""
        with torch.no_grad(), side_effect_free(self.problem.model):
            z, u = torch.func.jvp(self._f, self._params, tuple(t.detach() for t in v))
        self._z = z
        return z, u

    def quadratic_form(self, v: list[Tensor]) -> Tensor:
        """:math:`v^\\top G v = u^\\top H_z u` with :math:`u = Jv`."""
        z, u = self.jvp(v)
        hu = output_hvp(self.problem.loss_fn, z, self.problem.targets, u)
        return (u * hu).sum()

    def quadratic_forms(self, vs: list[list[Tensor]]) -> Tensor:
        """Gram matrix :math:`[v_i^\\top G v_j]` from one JVP per vector."""
        us = [self.jvp(v)[1] for v in vs]
        z = self._z
        assert z is not None
        hus = [output_hvp(self.problem.loss_fn, z, self.problem.targets, u) for u in us]
        k = len(vs)
        out = torch.empty(k, k, dtype=z.dtype, device=z.device)
        for i in range(k):
            for j in range(k):
                out[i, j] = (us[i] * hus[j]).sum()
        return 0.5 * (out + out.T)

    def matvec(self, v: list[Tensor]) -> list[Tensor]:
        """:math:`Gv = J^\\top H_z J v`."""
        z, u = self.jvp(v)
        hu = output_hvp(self.problem.loss_fn, z, self.problem.targets, u)
        if self._vjp is None:
            with torch.enable_grad(), side_effect_free(self.problem.model):
                _, self._vjp = torch.func.vjp(self._f, *self._params)
        return [t.detach() for t in self._vjp(hu)]


class GGNOracle(CurvatureOracle):
    """Binds :class:`BoundGGN` (own back-end) or the curvlinops ``GGNLinearOperator``."""

    spec: GGNSpec

    def __init__(self, spec: GGNSpec | None = None) -> None:
        super().__init__(spec or GGNSpec())

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Check the loss is supported by the chosen back-end."""
        if self.spec.backend == "curvlinops":
            from qlrlab.curvature._curvlinops import check_curvlinops_support

            check_curvlinops_support(model, loss_fn)

    def bind(self, problem: Problem) -> BoundCurvature:
        """Bind to ``problem``."""
        if self.spec.backend == "curvlinops":
            from curvlinops import GGNLinearOperator

            from qlrlab.curvature._curvlinops import CurvlinopsBound

            return CurvlinopsBound(problem, GGNLinearOperator)
        return BoundGGN(problem)
