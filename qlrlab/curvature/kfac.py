r"""K-FAC curvature as an oracle, so the quadratic model itself can use :math:`\oplus_l G_l\otimes A_l`.

:math:`v^\top K v = \sum_l \langle G_l V_l A_l, V_l\rangle + \sum_{\text{bias}} b^\top G_l b`
(weights ``V_l`` reshaped to ``[out, in']``). Back-ends:

* ``curvlinops`` (reference, default): ``KFACLinearOperator`` **rebuilt for every bound batch**
  (its cached factors go stale and a second factor computation accumulates; measured on
  curvlinops with torch 2.13, tests/test_kfac_backends.py), ``check_deterministic=False``; MC factors use the seed
  ``seed + k`` for the :math:`k`-th batch. Conv layers follow curvlinops' KFAC-expand.
* ``backpack``: one extra BackPACK pass (``KFLR``/``KFAC``) on a twin sharing the Parameters
  (:mod:`qlrlab.directions._backpack`), no gradient written; conv input factors divided by the
  number of output locations, :math:`G` the exact bias GGN (reduce-style); parameters of other
  layers use the GGN diagonal from the same pass (``fallback: diag_ggn``) or are rejected.

Both are per-batch (no moving average): the oracle describes the current batch's curvature.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from qlrlab.directions._backpack import KFAC_LAYERS, BackpackTwin
from qlrlab.interfaces import BoundCurvature, CurvatureOracle, Problem
from qlrlab.registry import CURVATURES, ComponentSpec

__all__ = ["BoundKFAC", "KFACOracle", "KFACOracleSpec"]


@CURVATURES.register("kfac")
class KFACOracleSpec(ComponentSpec):
    """Spec of the K-FAC curvature oracle.

    Attributes:
        fisher: ``"type-2"`` (exact loss-Hessian square root) or ``"mc"`` (sampled).
        mc_samples: samples for ``fisher: mc``.
        seed: base seed of the curvlinops MC factors.
        backend: ``"curvlinops"`` (``KFACLinearOperator``) or ``"backpack"``.
        fallback: ``backpack`` back-end only: ``"diag_ggn"`` or ``"error"`` for parameters of
            layers other than ``Linear``/``Conv2d`` (curvlinops always rejects them).
    """

    supports_nan_padding: ClassVar[bool] = False
    name: Literal["kfac"] = "kfac"
    fisher: Literal["type-2", "mc"] = "type-2"
    mc_samples: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    backend: Literal["curvlinops", "backpack"] = "curvlinops"
    fallback: Literal["diag_ggn", "error"] = "error"

    @model_validator(mode="after")
    def _check(self) -> KFACOracleSpec:
        if self.fisher == "type-2" and self.mc_samples != 1:
            raise ValueError("mc_samples: only used with fisher: mc; remove it or set fisher: mc")
        return self

    def build(self) -> KFACOracle:
        """Build the oracle."""
        return KFACOracle(self)


class BoundKFAC(BoundCurvature):
    """K-FAC of one batch from BackPACK factors (``{index: [G, A] | [G] | diag}``)."""

    def __init__(self, factors: dict[int, Any], n: int) -> None:
        self.factors = factors
        self.n = n

    def matvec(self, v: list[Tensor]) -> list[Tensor]:
        """:math:`Kv` block by block."""
        out = []
        for i, t in enumerate(v):
            f = self.factors.get(i)
            if f is None:
                out.append(torch.zeros_like(t))
            elif isinstance(f, Tensor):
                out.append(f * t)
            elif len(f) == 2:
                m = t.reshape(t.shape[0], -1)
                out.append((f[0] @ m @ f[1]).reshape(t.shape))
            else:
                out.append(f[0] @ t)
        return out


class KFACOracle(CurvatureOracle):
    """Binds a K-FAC operator rebuilt for each batch; state: the bind counter."""

    spec: KFACOracleSpec

    def __init__(self, spec: KFACOracleSpec | None = None) -> None:
        super().__init__(spec or KFACOracleSpec())
        self.twin: BackpackTwin | None = None
        self.count = 0

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Check the layers (and build the BackPACK twin for that back-end)."""
        s = self.spec
        if s.backend == "backpack":
            self.twin = BackpackTwin(
                model,
                loss_fn,
                params,
                owner="curvature kfac",
                extension="kflr" if s.fisher == "type-2" else "kfac",
                mc_samples=s.mc_samples,
                fallback=s.fallback,
            )
            return
        from qlrlab.backends.curvlinops_adapter import check_curvlinops_support

        check_curvlinops_support(model, loss_fn)
        ids = {id(p) for p in params}
        for path, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False) if id(p) in ids]
            if own and type(m) not in KFAC_LAYERS:
                raise ValueError(
                    f"curvature kfac: layer {type(m).__name__} at {path!r} has parameters that "
                    f"curvlinops' KFACLinearOperator does not support (nn.Linear and nn.Conv2d "
                    f"only); use backend: backpack with fallback: diag_ggn, or exclude them"
                )

    def bind(self, problem: Problem) -> BoundCurvature:
        """Build this batch's K-FAC operator."""
        s = self.spec
        seed = s.seed + self.count
        self.count += 1
        if s.backend == "backpack":
            assert self.twin is not None
            # BackPACK samples with the global generator: seed it inside a forked RNG state
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.twin.extra_pass(problem.inputs, problem.targets)
            return BoundKFAC(self.twin.collect(), len(problem.params))
        from curvlinops import KFACLinearOperator

        from qlrlab.backends.curvlinops_adapter import CurvlinopsBound

        kw: dict[str, Any] = {"fisher_type": s.fisher, "seed": seed}
        if s.fisher == "mc":
            kw["mc_samples"] = s.mc_samples
        return CurvlinopsBound(problem, functools.partial(KFACLinearOperator, **kw))

    def state_dict(self) -> dict[str, Any]:
        """The bind counter."""
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the bind counter."""
        self.count = int(state.get("count", 0))
