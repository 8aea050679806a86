r"""Generalised Gauss–Newton curvature :math:`G = J^\top H_z J` (= Fisher for CE, ½·MSE, BCE).

The quadratic form costs one forward-mode Jacobian-vector product :math:`u = J d` and the
closed-form output Hessian of the loss (:mod:`qlrlab.losses`):

.. math:: d^\top G d = u^\top H_z u,

e.g. :math:`\frac1N\sum_n \big(\sum_k p_{nk} u_{nk}^2 - (\sum_k p_{nk}u_{nk})^2\big)` for
softmax cross-entropy (Martens & Grosse, 2015; Clarke & Hernández-Lobato, 2024). Products :math:`Gv` add one vector–Jacobian product.
Losses without a closed form use a double-backward output-Hessian product.

Back-ends (``GGNSpec.backend``):

* ``"auto"`` (default; formerly ``"own"``, still accepted): the fast path (:mod:`qlrlab.backends.fastpath`: tangents from the
  gradient pass's cached activations, and :math:`f(\theta-\alpha d)` with the first layer's
  output updated as :math:`z - \alpha u`) whenever every parametrised layer is supported and
  the recorded chain checks out, otherwise the general ``torch.func`` path;
* ``"fast"``: the fast path, an error when the model is not supported;
* ``"jvp"``: always the general ``torch.func.jvp`` path (any model);
* ``"curvlinops"``: ``GGNLinearOperator``, rebuilt each step (reference).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from qlrlab._passes import autocast_off, functional_forward, side_effect_free
from qlrlab.backends import fastpath as _fastpath
from qlrlab.interfaces import BoundCurvature, CurvatureOracle, Problem
from qlrlab.losses import check_output_hessian, loss_value, output_hvp, output_quadratic_form
from qlrlab.registry import CURVATURES, ComponentSpec

__all__ = ["BoundGGN", "FastBoundGGN", "GGNOracle", "GGNSpec"]


@CURVATURES.register("ggn")
class GGNSpec(ComponentSpec):
    """Spec of the GGN / Fisher curvature oracle.

    Attributes:
        backend: ``"auto"`` (fast path when the model is supported, else forward-mode JVP; both
            with the closed-form output Hessian), ``"fast"`` (fast path or error), ``"jvp"``
            (general ``torch.func`` path) or ``"curvlinops"`` (``GGNLinearOperator``, rebuilt
            each step; reference). ``"own"``, the former name of ``"auto"``, is accepted and
            read as ``"auto"``; the JSON form (stored specs, run identities) keeps spelling it
            ``"own"`` (:attr:`~qlrlab.registry.ComponentSpec.renamed_values`), so stored runs
            keep their hashes.
    """

    supports_nan_padding: ClassVar[bool] = True
    name: Literal["ggn"] = "ggn"
    renamed_values: ClassVar[dict[str, dict[Any, Any]]] = {"backend": {"auto": "own"}}
    backend: Literal["auto", "fast", "jvp", "curvlinops"] = "auto"

    def nan_padding_unsupported(self, family: str) -> str | None:
        """The curvlinops back-end has no NaN-padding emulation."""
        if self.backend == "curvlinops":
            return "the curvlinops back-end has no NaN-padding emulation"
        return None

    def build(self) -> GGNOracle:
        """Build the oracle."""
        return GGNOracle(self)


class BoundGGN(BoundCurvature):
    """GGN of one mini-batch, own path (``torch.func.jvp`` / ``vjp`` on a functional model)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self._detached: tuple[Tensor, ...] | None = None
        self._vjp = None
        self._z: Tensor | None = None

    @property
    def _params(self) -> tuple[Tensor, ...]:
        """The detached parameters (made on first use: the fast path never needs them)."""
        if self._detached is None:
            self._detached = tuple(p.detach() for p in self.problem.params)
        return self._detached

    def _f(self, *params: Tensor) -> Tensor:
        return functional_forward(
            self.problem.model, self.problem.param_names, params, self.problem.inputs
        )

    def jvp(self, v: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Outputs :math:`z` and output tangent :math:`u = Jv` (one forward-mode pass; fused
        attention kernels, which lack forward-mode AD on the CPU, e.g. in
        ``nn.MultiheadAttention``, run with the math back-end)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.no_grad(), side_effect_free(self.problem.model), sdpa_kernel(SDPBackend.MATH):
            z, u = torch.func.jvp(self._f, self._params, tuple(t.detach() for t in v))  # type: ignore[misc]
        self._z = z
        return z, u

    def quadratic_form(self, v: list[Tensor]) -> Tensor:
        """:math:`v^\\top G v = u^\\top H_z u` with :math:`u = Jv`."""
        z, u = self.jvp(v)
        return output_quadratic_form(self.problem.loss_fn, z, self.problem.targets, u)

    def quadratic_forms(self, vs: list[list[Tensor]]) -> Tensor:
        """Gram matrix :math:`[v_i^\\top G v_j]` from one JVP per vector."""
        return self._gram([self.jvp(v)[1] for v in vs])

    def _gram(self, us: list[Tensor]) -> Tensor:
        """:math:`[u_i^\\top H_z u_j]`, symmetrised, for output tangents ``us`` at ``self._z``."""
        z = self._z
        assert z is not None
        hus = [output_hvp(self.problem.loss_fn, z, self.problem.targets, u) for u in us]
        k = len(us)
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
                _, self._vjp = torch.func.vjp(self._f, *self._params)  # type: ignore[assignment, misc]
        return [t.detach() for t in self._vjp(hu)]  # type: ignore[misc]


class FastBoundGGN(BoundGGN):
    """GGN of one mini-batch from the gradient pass's cached activations (fast path).

    :meth:`jvp` needs no forward pass (see :mod:`qlrlab.backends.fastpath`), and
    :meth:`loss_after` evaluates :math:`f(\theta - \alpha d)` reusing the cached outputs of
    every layer up to and including the first optimised one. :meth:`matvec` (rarely needed)
    uses the general path's vector–Jacobian product.

    Args:
        problem: the bound mini-batch problem.
        chain: validated records of the gradient pass.
    """

    def __init__(self, problem: Problem, chain: list[_fastpath.Record]) -> None:
        super().__init__(problem)
        if problem.params:
            _upcast_records(chain, problem.params[0].dtype)
        self.fast = _fastpath.ChainTangents(chain, problem.params)

    def jvp(self, v: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Outputs :math:`z` and :math:`u = Jv` from the cached activations."""
        with torch.no_grad(), autocast_off():
            z, u = self.fast.tangent(v)
        self._z = z
        return z, u

    def quadratic_forms(self, vs: list[list[Tensor]]) -> Tensor:
        """Gram matrix :math:`[v_i^\\top G v_j]`; the first layer's tangents of all the
        vectors come from one product with its input (:meth:`ChainTangents.first_tangents`)."""
        with torch.no_grad(), autocast_off():
            firsts = self.fast.first_tangents(vs)
            us = []
            for i, v in enumerate(vs):
                z, u = self.fast.tangent(v, None if firsts is None else firsts[i])
                us.append(u)
        self._z = z
        return self._gram(us)

    def loss_after(self, alpha: Tensor, direction: list[Tensor]) -> Tensor | None:
        """:math:`f(\theta - \alpha d)` on the bound batch (``None`` if ``d`` was not the last
        vector passed to :meth:`jvp`)."""
        with torch.no_grad():
            z = self.fast.new_output(alpha, direction)
            if z is None:
                return None
            return loss_value(self.problem.loss_fn, z, self.problem.targets).detach()

    def loss_at(self, terms: list[tuple[Tensor, list[Tensor]]]) -> Tensor | None:
        """:math:`f(\\theta + \\sum_i c_i v_i)` on the bound batch from the cached activations
        and the first layer's tangents of the last two :meth:`jvp` vectors (``None`` for any
        other vector)."""
        with torch.no_grad():
            z = self.fast.new_output_combination(terms)
            if z is None:
                return None
            return loss_value(self.problem.loss_fn, z, self.problem.targets).detach()


def _upcast_records(chain: list[_fastpath.Record], dtype: torch.dtype) -> None:
    """Cast the cached activations of an autocast gradient pass (bfloat16/float16) to the
    parameters' dtype, so that the tangents, :math:`d^\top G d` and :math:`f(\theta-\alpha d)`
    are computed in it (a no-op without autocast)."""
    for r in chain:
        for name in ("x", "y"):
            t = getattr(r, name)
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                setattr(r, name, t.to(dtype))


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (without importing dynamo)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule)


class GGNOracle(CurvatureOracle):
    """Binds :class:`FastBoundGGN`, :class:`BoundGGN` or the curvlinops ``GGNLinearOperator``."""

    reference = "ggn"

    spec: GGNSpec
    gradient_pass_optional = True

    def __init__(self, spec: GGNSpec | None = None) -> None:
        super().__init__(spec or GGNSpec())
        self._fast = False
        self._recorder: _fastpath.ChainRecorder | None = None
        self._params: list[Tensor] = []
        self.fast_unsupported: str | None = None
        #: which path the last :meth:`bind` chose: ``"fast"``, ``"jvp"`` or ``"curvlinops"``.
        self.last_path: str | None = None
        #: why the last :meth:`bind` did not take the fast path (``None`` when it did).
        self.last_fallback: str | None = None

    @property
    def records_forward(self) -> bool:
        """Whether the gradient pass records activations for the fast path."""
        return self._fast

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Check the loss/model are supported by the chosen back-end; decide on the fast path."""
        check_output_hessian(loss_fn, "ggn")
        if self.spec.backend == "curvlinops":
            from qlrlab.backends.curvlinops_adapter import check_curvlinops_support

            check_curvlinops_support(model, loss_fn)
        self._fast = False
        if self.spec.backend in ("auto", "fast"):
            self.fast_unsupported = _fastpath.fast_path_unsupported(model, params)
            if _is_compiled(model):
                self.fast_unsupported = (
                    "the model is wrapped by torch.compile (dynamo would trace the fast path's "
                    "recording hooks); the curvature uses the torch.func path"
                )
            if self.fast_unsupported is not None and self.spec.backend == "fast":
                raise ValueError(
                    f"curvature.backend: fast: {self.fast_unsupported}; use backend: auto "
                    f"(falls back to torch.func automatically) or jvp"
                )
            self._fast = self.fast_unsupported is None
        self._params = list(params)

    @contextlib.contextmanager
    def gradient_pass(self, model: nn.Module) -> Iterator[nn.Module]:
        """Record the leaf layers' inputs and outputs when the fast path is on."""
        self._recorder = None
        if not self._fast:
            yield model
            return
        rec = _fastpath.ChainRecorder(model, self._params)
        with rec.recording():
            yield rec.module  # the model itself, or an equivalent recording runner
        self._recorder = rec

    def bind(self, problem: Problem) -> BoundCurvature:
        """Bind to ``problem``."""
        if self.spec.backend == "curvlinops":
            from curvlinops import GGNLinearOperator

            from qlrlab.backends.curvlinops_adapter import CurvlinopsBound

            self.last_path = "curvlinops"
            return CurvlinopsBound(problem, GGNLinearOperator)
        rec, self._recorder = self._recorder, None
        if rec is not None:
            chain = rec.chain()
            if chain is not None:
                self.last_path, self.last_fallback = "fast", None
                return FastBoundGGN(problem, chain)
            if self.spec.backend == "fast":
                raise RuntimeError(f"curvature.backend: fast: {rec.failure}; use backend: auto")
        self.last_path = "jvp"
        if rec is not None:
            self.last_fallback = rec.failure
        elif self._fast:
            self.last_fallback = (
                "the gradient pass was not recorded: it ran in micro-batches, or in a "
                "closure that called the model through a wrapper"
            )
        else:
            self.last_fallback = self.fast_unsupported
        return BoundGGN(problem)
