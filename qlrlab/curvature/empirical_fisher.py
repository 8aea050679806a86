r"""Empirical Fisher :math:`E = c\sum_n \nabla_\theta\ell_n \nabla_\theta\ell_n^\top`.

For a loss :math:`f = c\sum_n \ell_n` (:math:`\ell_n` the unnormalised loss of sample :math:`n`,
summed over its outputs; :math:`c` = 1/non-ignored targets for cross-entropy ``mean``,
:math:`1/(NC)` for the MSE/BCE ``mean`` losses, 1 for ``sum``) — curvlinops' ``EFLinearOperator``
convention. With the per-sample output gradients :math:`e_n = \partial\ell_n/\partial z_n`
(closed form: :math:`p - t` for cross-entropy with targets or smoothed targets :math:`t`,
:math:`2(z-y)` for MSE, :math:`z-y` for ½·MSE, :math:`\sigma - y` for BCE),
:math:`v^\top E v = c\sum_n (e_n^\top J_n v)^2` costs one JVP. Not a curvature of the loss in
general (Kunstner et al., 2019); offered for the ablations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlrlab.curvature._outer import BoundOuterProduct, ce_mask
from qlrlab.curvature.fisher_mc import check_outer_loss
from qlrlab.interfaces import BoundCurvature, CurvatureOracle, Problem
from qlrlab.losses import HalfMSELoss
from qlrlab.registry import CURVATURES, ComponentSpec

__all__ = ["EmpiricalFisherOracle", "EmpiricalFisherSpec", "ef_factors"]


def ef_factors(loss_fn: nn.Module, y: Tensor, z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """:math:`\\sqrt c\\, e` as ``[1, *z.shape]``, grouped per sample."""
    mean = getattr(loss_fn, "reduction", "mean") == "mean"
    groups = tuple(range(2, z.ndim + 1))
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        zc = z if z.ndim > 1 else z.unsqueeze(0)
        yc = y if z.ndim > 1 else y.unsqueeze(0)
        p = torch.softmax(zc, dim=1)
        mask, count = ce_mask(loss_fn, zc, yc)
        if yc.dtype.is_floating_point:
            t = yc
        else:
            safe = torch.where(yc == loss_fn.ignore_index, torch.zeros_like(yc), yc)
            t = F.one_hot(safe, p.shape[1]).movedim(-1, 1).to(p.dtype)
        if loss_fn.label_smoothing:
            t = (1 - loss_fn.label_smoothing) * t + loss_fn.label_smoothing / p.shape[1]
        c = 1.0 / max(count, 1.0) if mean else 1.0
        e = (p - t) * mask * math.sqrt(c)
        return e.reshape(1, *z.shape), groups
    c = 1.0 / z.numel() if mean else 1.0
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        e = torch.sigmoid(z) - y
    elif isinstance(loss_fn, HalfMSELoss):
        e = z - y
    else:
        e = 2.0 * (z - y)
    return (e * math.sqrt(c)).unsqueeze(0), groups


@CURVATURES.register("empirical_fisher")
class EmpiricalFisherSpec(ComponentSpec):
    """Spec of the empirical-Fisher oracle.

    Attributes:
        backend: ``"own"`` (JVP + closed-form per-sample output gradients) or ``"curvlinops"``
            (``EFLinearOperator``).
    """

    supports_nan_padding: ClassVar[bool] = False
    name: Literal["empirical_fisher"] = "empirical_fisher"
    backend: Literal["own", "curvlinops"] = "own"

    def build(self) -> EmpiricalFisherOracle:
        """Build the oracle."""
        return EmpiricalFisherOracle(self)


class EmpiricalFisherOracle(CurvatureOracle):
    """Binds the empirical Fisher of each batch."""

    reference = "empirical_fisher"

    spec: EmpiricalFisherSpec

    def __init__(self, spec: EmpiricalFisherSpec | None = None) -> None:
        super().__init__(spec or EmpiricalFisherSpec())

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Check the loss."""
        check_outer_loss(loss_fn, "empirical_fisher")
        if self.spec.backend == "curvlinops":
            from qlrlab.backends.curvlinops_adapter import check_curvlinops_support

            check_curvlinops_support(model, loss_fn)

    def bind(self, problem: Problem) -> BoundCurvature:
        """Bind to ``problem``."""
        if self.spec.backend == "curvlinops":
            from curvlinops import EFLinearOperator

            from qlrlab.backends.curvlinops_adapter import CurvlinopsBound

            bound = CurvlinopsBound(problem, EFLinearOperator)
            bound.scale = bound.scale**2  # the EF is quadratic in the loss scale (½·MSE: ¼)
            return bound
        return BoundOuterProduct(
            problem, functools.partial(ef_factors, problem.loss_fn, problem.targets)
        )
