r"""Monte-Carlo Fisher: :math:`F = \frac1S\sum_s c\sum_k J_k^\top \nabla_z\ell(\hat y_{sk})\nabla_z\ell(\hat y_{sk})^\top J_k`
with targets :math:`\hat y` sampled from the model's predictive distribution.

Its expectation is the GGN (= Fisher) of the loss as computed (:mod:`qlrlab.losses`), with the
same normaliser :math:`c`. Per loss (``mean`` reduction; ``sum`` drops :math:`c`):

======================  ===========================================  ============================
loss                    sampled residual :math:`r`                   :math:`c`
======================  ===========================================  ============================
``CrossEntropyLoss``    :math:`p - e_{\hat y}`, :math:`\hat y\sim p`   1 / non-ignored targets
``MSELoss``             :math:`\varepsilon\sqrt2`, :math:`\varepsilon\sim\mathcal N(0, I)`  :math:`1/(N C)`
``HalfMSELoss``         :math:`\varepsilon`                            :math:`1/(N C)`
``BCEWithLogitsLoss``   :math:`\sigma - \hat y`, :math:`\hat y\sim\text{Bern}(\sigma)`  :math:`1/(N C)`
======================  ===========================================  ============================

Cross-entropy samples one class per position (class dimension 1); the other losses group all
outputs of a sample. Fresh samples each step: the generator is seeded with ``seed + k`` for the
:math:`k`-th bound batch, and one bound batch reuses its samples for all its products (so
Gram matrices are consistent). The ``curvlinops`` back-end (``FisherMCLinearOperator``, seeded
the same way) is a reference with a different random stream.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from qlrlab.curvature._outer import BoundOuterProduct, ce_mask
from qlrlab.interfaces import BoundCurvature, CurvatureOracle, Problem
from qlrlab.losses import HalfMSELoss
from qlrlab.registry import CURVATURES, ComponentSpec

__all__ = ["FisherMCOracle", "FisherMCSpec", "check_outer_loss"]


def check_outer_loss(loss_fn: nn.Module, owner: str) -> None:
    """Raise ``ValueError`` unless the loss has a closed-form per-sample structure."""
    ok = isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss, HalfMSELoss, nn.BCEWithLogitsLoss))
    if (
        ok
        and getattr(loss_fn, "weight", None) is None
        and getattr(loss_fn, "pos_weight", None) is None
    ):
        if getattr(loss_fn, "reduction", "mean") in ("mean", "sum"):
            return
    from qlrlab.losses import UnsupportedLossError, _zero_hessian_hint

    alt = (
        "use curvature: {name: hessian}"
        if _zero_hessian_hint(loss_fn) is not None
        else "use curvature: {name: ggn} or {name: hessian}"
    )
    raise UnsupportedLossError(
        f"curvature {owner!r} supports CrossEntropyLoss, MSELoss, HalfMSELoss and "
        f"BCEWithLogitsLoss (mean or sum, without class weights), not {loss_fn!r}; {alt}"
    )


_ce_mask = ce_mask  # the shared helper's former name here


def mc_factors(
    loss_fn: nn.Module, y: Tensor, samples: int, generator: torch.Generator, z: Tensor
) -> tuple[Tensor, tuple[int, ...]]:
    """Scaled sampled residuals ``[S, *z.shape]`` and their group dimensions."""
    s = samples
    mean = getattr(loss_fn, "reduction", "mean") == "mean"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        zc = z if z.ndim > 1 else z.unsqueeze(0)
        p = torch.softmax(zc, dim=1)
        flat = p.movedim(1, -1).reshape(-1, p.shape[1])
        idx = torch.multinomial(flat, s, replacement=True, generator=generator)  # [M, S]
        onehot = F.one_hot(idx.T, p.shape[1]).to(p.dtype)  # [S, M, C]
        onehot = onehot.reshape(s, *p.movedim(1, -1).shape).movedim(-1, 2)
        mask, count = ce_mask(loss_fn, zc, y if z.ndim > 1 else y.unsqueeze(0))
        c = 1.0 / max(count, 1.0) if mean else 1.0
        r = (p.unsqueeze(0) - onehot) * mask.unsqueeze(0) * math.sqrt(c / s)
        return r.reshape(s, *z.shape), (2,) if z.ndim > 1 else (1,)
    c = 1.0 / z.numel() if mean else 1.0
    groups = tuple(range(2, z.ndim + 1))
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        sig = torch.sigmoid(z)
        u = torch.rand((s, *z.shape), generator=generator, dtype=z.dtype, device=z.device)
        yhat = (u < sig.unsqueeze(0)).to(z.dtype)
        return (sig.unsqueeze(0) - yhat) * math.sqrt(c / s), groups
    eps = torch.randn((s, *z.shape), generator=generator, dtype=z.dtype, device=z.device)
    h = 1.0 if isinstance(loss_fn, HalfMSELoss) else 2.0
    return eps * math.sqrt(h * c / s), groups


@CURVATURES.register("fisher_mc")
class FisherMCSpec(ComponentSpec):
    """Spec of the Monte-Carlo Fisher oracle.

    Attributes:
        mc_samples: sampled targets per example.
        seed: base seed; the :math:`k`-th bound batch uses ``seed + k``.
        backend: ``"own"`` (JVP + sampled residuals) or ``"curvlinops"``
            (``FisherMCLinearOperator``).
    """

    supports_nan_padding: ClassVar[bool] = False
    name: Literal["fisher_mc"] = "fisher_mc"
    mc_samples: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    backend: Literal["own", "curvlinops"] = "own"

    def build(self) -> FisherMCOracle:
        """Build the oracle."""
        return FisherMCOracle(self)


class FisherMCOracle(CurvatureOracle):
    """Binds a fresh Monte-Carlo Fisher per batch; state: the number of batches bound."""

    data_parallel_exact = False  # each worker samples its own targets

    spec: FisherMCSpec

    def __init__(self, spec: FisherMCSpec | None = None) -> None:
        super().__init__(spec or FisherMCSpec())
        self.count = 0

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Check the loss."""
        check_outer_loss(loss_fn, "fisher_mc")
        if self.spec.backend == "curvlinops":
            from qlrlab.backends.curvlinops_adapter import check_curvlinops_support

            check_curvlinops_support(model, loss_fn)

    def bind(self, problem: Problem) -> BoundCurvature:
        """Bind with fresh samples (seed ``seed + k``)."""
        seed = self.spec.seed + self.count
        self.count += 1
        if self.spec.backend == "curvlinops":
            from curvlinops import FisherMCLinearOperator

            from qlrlab.backends.curvlinops_adapter import CurvlinopsBound

            op = functools.partial(
                FisherMCLinearOperator, seed=seed, mc_samples=self.spec.mc_samples
            )
            return CurvlinopsBound(problem, op)
        device = problem.params[0].device if problem.params else torch.device("cpu")
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        fn = functools.partial(
            mc_factors, problem.loss_fn, problem.targets, self.spec.mc_samples, gen
        )
        return BoundOuterProduct(problem, fn)

    def state_dict(self) -> dict[str, Any]:
        """The bind counter (which seeds the next samples)."""
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the bind counter."""
        self.count = int(state.get("count", 0))
