r"""K-FAC direction: Kronecker-factored natural-gradient preconditioning (Martens & Grosse, 2015).

For a ``Linear`` or ``Conv2d`` layer with weight gradient :math:`\nabla W` (``[out, in']``) the
GGN/Fisher block is approximated by :math:`G \otimes A` (row-major ``W.flatten()``), with
:math:`A` the input (patch) second moment and :math:`G` the second moment of the backpropagated
output-gradient factors; the bias block is :math:`G` (``bias: separate``) or the bias joins the
weight in one :math:`[W\ b]` block (``bias: joint``, kfac-jax). ``backend: hooks`` (the default
via ``auto``) captures the factors with module hooks during the gradient pass
(``qlrlab.backends.kfac_hooks``; KFAC-expand or -reduce, any model whose K-FAC layers are
modules; see ``docs/kfac.md``). With ``backend: backpack`` the factors come from **BackPACK** during
the gradient pass — ``KFAC`` (one or more Monte-Carlo samples of the model's predictive
distribution, ``fisher: mc``, kfac-jax's ``fisher_gradients``) or ``KFLR`` (the exact square root
of the loss Hessian, ``fisher: type-2``) — on a twin of the model that shares its Parameters
(:mod:`qlrlab.directions._backpack`). Conventions match curvlinops ``KFACLinearOperator``
(separate weight and bias, curvature of the loss *as computed*); for ``Conv2d`` BackPACK's input
factor is divided by the number of output locations :math:`T` (BackPACK's :math:`A` is
:math:`T\times` curvlinops' KFAC-expand one; tests/test_kfac_backends.py checks both), and :math:`G`
is the exact bias GGN (reduce-style).

Per step :math:`t` the factors are averaged, :math:`F_t = \epsilon F_{t-1} + (1-\epsilon)\hat F_t`
(:math:`F_1 = \hat F_1`; ``curvature_ema`` :math:`\epsilon`, 0.95 by default as in the paper's
kfac-jax configuration), and every ``inverse_period`` steps the damped inverses are recomputed with
the damping schedule's :math:`\lambda` (``ctx.damping``, i.e. :math:`\lambda_{t-1}`); in between the
cached inverses are applied. ``damping_mode`` names how :math:`\lambda` enters:

* ``factored_pi`` — factored Tikhonov with the :math:`\pi` correction (Martens & Grosse §6.3,
  kfac-jax, curvlinops ``use_heuristic_damping``):
  :math:`(A + \pi\sqrt\lambda I)^{-1} \otimes (G + \pi^{-1}\sqrt\lambda I)^{-1}`,
  :math:`\pi = \sqrt{(\operatorname{tr}A/\dim A)/(\operatorname{tr}G/\dim G)}`;
* ``factored`` — the same with :math:`\pi = 1`;
* ``exact`` — :math:`(G\otimes A + \lambda I)^{-1}` from the eigendecompositions of both factors.

Biases use :math:`(G + \lambda I)^{-1}` in ``exact`` mode (and when the layer's weight is not
optimised), and the weight's damped :math:`(G + \pi^{-1}\sqrt\lambda I)^{-1}` in the factored
modes (curvlinops' convention for separate biases). Each factor's damping is floored at
``min_damping``. Cholesky and ``eigh`` run in the factor dtype and are retried in float64.

Data parallelism: the fresh factors are averaged over the workers before the EMA, so every worker
holds identical factors. ``inverses`` says who inverts them: ``redundant`` (default) — every
worker computes every inverse (identical inputs give identical results, no communication; the
cheaper choice while the inversions cost less than broadcasting their results, e.g. small layers
or a fast interconnect) — or ``owner`` — the :math:`l`-th Kronecker-factored layer's inverses are computed only by worker
:math:`l \bmod W` and broadcast from it (:func:`qlrlab.distributed.broadcast_from_owners`), which divides the
inversion work by :math:`W` for models with many large layers. Outside ``torch.distributed`` the
two are the same.

Parameters of other layers follow ``fallback``: ``diag_ggn`` (the GGN diagonal of the same
BackPACK pass, MC or exact like the factors, averaged the same way, preconditioner
:math:`(\operatorname{diag} + \lambda)^{-1}`), ``identity`` (the gradient) or ``error``
(construction fails naming the layer). The step is :math:`\theta - \alpha d`; use the
``kfac_adaptive`` step size for K-FAC's (α, μ) or ``momentum`` for fixed ones.

References:
    Martens & Grosse, *Optimizing neural networks with Kronecker-factored approximate curvature*,
    ICML 2015. Grosse & Martens, *A Kronecker-factored approximate Fisher matrix for convolution
    layers*, ICML 2016. Dangel et al., *BackPACK*, ICLR 2020.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from qlrlab.directions._backpack import BackpackTwin, LayerInfo
from qlrlab.distributed import broadcast_from_owners, is_distributed
from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec

__all__ = [
    "KFACDirection",
    "KFACSpec",
    "damped_cholesky",
    "damped_cholesky_inverse",
    "safe_eigh",
]


@DIRECTIONS.register("kfac")
class KFACSpec(ComponentSpec):
    r"""Spec of the K-FAC direction.

    Attributes:
        backend: where the Kronecker factors come from: ``"hooks"``
            (``qlrlab.backends.kfac_hooks``: module hooks during the gradient pass, any model
            whose K-FAC layers are ``nn.Linear``/``nn.Conv2d`` modules), ``"backpack"`` (BackPACK
            on an fx-converted twin, :mod:`qlrlab.directions._backpack`) or ``"auto"``
            (``hooks``, the faster one, unless ``fallback: diag_ggn`` has parameters to serve,
            which only BackPACK can).
        fisher: ``"mc"`` (sampled targets; kfac-jax's default) or ``"type-2"`` (exact
            loss-Hessian square root).
        mc_samples: Monte-Carlo samples per step (``fisher: mc`` only).
        kfac_approx: weight-sharing (sequence / conv location) dimension, ``"expand"`` or
            ``"reduce"`` (Eschenhagen et al., 2023); ``hooks`` back-end only (BackPACK's conv
            factors are fixed: expand-style :math:`A`, reduce-style :math:`G`).
        bias: ``"separate"`` (own block :math:`G` for the bias; curvlinops) or ``"joint"``
            (kfac-jax: one :math:`[W\ b]` block, ones appended to the layer inputs).
        seed: seed of the direction's own sampling generator (``hooks`` back-end; step
            :math:`t` samples with the seed ``(seed, t)``; the global RNG is never used).
        curvature_ema: factor decay :math:`\epsilon \in [0, 1)` (0 = no averaging).
        inverse_period: recompute the damped inverses every this many steps.
        damping_mode: ``"factored_pi"``, ``"factored"`` or ``"exact"`` (see module docstring).
        min_damping: floor of each factor's damping (and of :math:`\lambda` in ``exact`` mode).
        fallback: parameters that get no Kronecker factors (see :meth:`KFACDirection.describe`):
            ``"diag_ggn"`` (BackPACK's GGN diagonal), ``"adam"`` (Adam's bias-corrected
            squared-gradient EMA, :math:`d = g/(\sqrt{\hat v} + \epsilon)`), ``"identity"``
            (the gradient) or ``"error"``.
        adam_beta2: :math:`\beta_2` of the ``adam`` fallback.
        adam_eps: :math:`\epsilon` of the ``adam`` fallback.
        converter: BackPACK's fx converter: ``"auto"`` (for anything but plain ``nn.Sequential``
            models, e.g. residual nets), ``"always"`` or ``"never"``.
        inverses: under ``torch.distributed``, ``"redundant"`` (every worker inverts every
            factor) or ``"owner"`` (one worker per layer inverts and broadcasts; see the module
            docstring).
    """

    supports_nan_padding: ClassVar[bool] = False
    name: Literal["kfac"] = "kfac"
    backend: Literal["auto", "hooks", "backpack"] = "auto"
    fisher: Literal["mc", "type-2"] = "mc"
    mc_samples: int = Field(1, ge=1)
    kfac_approx: Literal["expand", "reduce"] = "expand"
    bias: Literal["separate", "joint"] = "separate"
    seed: int = Field(0, ge=0)
    curvature_ema: float = Field(0.95, ge=0.0, lt=1.0)
    inverse_period: int = Field(1, ge=1)
    damping_mode: Literal["factored_pi", "factored", "exact"] = "factored_pi"
    min_damping: float = Field(1e-8, ge=0.0)
    fallback: Literal["diag_ggn", "adam", "identity", "error"] = "diag_ggn"
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, ge=0.0)
    converter: Literal["auto", "always", "never"] = "auto"
    inverses: Literal["redundant", "owner"] = "redundant"

    @model_validator(mode="after")
    def _check(self) -> KFACSpec:
        if self.fisher == "type-2" and self.mc_samples != 1:
            raise ValueError(
                "mc_samples: only used with fisher: mc (type-2 is exact); remove mc_samples or "
                "set fisher: mc"
            )
        if self.backend == "backpack" and self.kfac_approx != "expand":
            raise ValueError(
                "kfac_approx: reduce is only available with backend: hooks (BackPACK's factors "
                "have a fixed convention); set backend: hooks"
            )
        return self

    def nan_padding_unsupported(self, family: str) -> str | None:
        """BackPACK computes this direction's curvature with its own loss handling."""
        return f"the {self.name!r} direction takes its curvature from BackPACK"

    def build(self) -> KFACDirection:
        """Build the direction provider."""
        return KFACDirection(self)


def damped_cholesky_inverse(m: Tensor, damping: float) -> Tensor:
    """:math:`(M + \\text{damping}\\,I)^{-1}` by Cholesky, retried in float64, then by ``eigh``."""
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    mat = m + damping * eye
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    chol64, info64 = torch.linalg.cholesky_ex(mat.double())
    if int(info64) == 0:
        return torch.cholesky_inverse(chol64).to(m.dtype)
    warnings.warn(
        "kfac: a damped factor is not positive definite even in float64; using an eigenvalue-"
        "clamped inverse (increase the damping)",
        RuntimeWarning,
        stacklevel=2,
    )
    evals, evecs = safe_eigh(mat)
    return (evecs / evals.clamp_min(max(damping, 1e-12))) @ evecs.T


def damped_cholesky(m: Tensor, damping: float) -> Tensor:
    r"""Lower Cholesky factor :math:`L` of :math:`M + \text{damping}\,I` (retried in float64;
    if even that fails, of the eigenvalue-clamped matrix), for ``torch.cholesky_solve``."""
    mat = m.clone()
    mat.diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) == 0:
        return chol
    chol64, info64 = torch.linalg.cholesky_ex(mat.double())
    if int(info64) == 0:
        return chol64.to(m.dtype)
    warnings.warn(
        "kfac: a damped factor is not positive definite even in float64; using an eigenvalue-"
        "clamped factor (increase the damping)",
        RuntimeWarning,
        stacklevel=2,
    )
    evals, evecs = safe_eigh(mat.double())
    clamped = (evecs * evals.clamp_min(max(damping, 1e-12))) @ evecs.T
    return torch.linalg.cholesky(clamped).to(m.dtype)


def safe_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in the matrix dtype, retried in float64 on failure."""
    try:
        return torch.linalg.eigh(m)
    except RuntimeError:
        evals, evecs = torch.linalg.eigh(m.double())
        return evals.to(m.dtype), evecs.to(m.dtype)


class _HookSource:
    """The ``hooks`` back-end behind the same interface as :class:`BackpackTwin` (``layers``,
    ``gradient_pass``, ``collect``)."""

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, params: Sequence[Tensor], spec: KFACSpec,
        generator: torch.Generator, names: Sequence[str] | None,
    ) -> None:  # fmt: skip
        from qlrlab.backends.kfac_hooks import KroneckerFactorCapture, check_loss

        check_loss(loss_fn)  # fail at construction, not mid-step
        self.capture = KroneckerFactorCapture(
            model, loss_fn, params, fisher=spec.fisher, mc_samples=spec.mc_samples,
            approx=spec.kfac_approx, bias=spec.bias, generator=generator, names=names,
        )  # fmt: skip
        self.layers = self._table()

    def _table(self) -> list[LayerInfo]:
        a = self.capture.assignment
        layers = [
            LayerInfo(lay.path, lay.module, "kfac", weight=lay.weight, bias=lay.bias,
                      joint=lay.joint)
            for lay in a.layers
        ]  # fmt: skip
        for i, why in sorted(a.fallback.items()):
            layers.append(LayerInfo("", nn.Module(), "fallback", others=[i], reason=why))
        return layers

    @contextlib.contextmanager
    def gradient_pass(self, model: nn.Module) -> Iterator[nn.Module]:
        with self.capture.capture():
            yield model

    def collect(self) -> dict[int, Any]:
        before = len(self.capture.layers)
        fresh = self.capture.factors()
        if len(self.capture.layers) != before:  # layers demoted at the first capture
            self.layers = self._table()
        out: dict[int, Any] = {}
        for li, (a, g) in fresh.items():
            lay = self.capture.layers[li]
            out[lay.weight] = [g, a]
            if lay.bias is not None and not lay.joint:
                out[lay.bias] = [g]
        return out


class KFACDirection(DirectionProvider):
    """K-FAC direction provider.

    State (``state_dict``): ``step``, the averaged ``factors`` per parameter (``[G, A]`` weights
    — ``A`` with the ones row/column under ``bias: joint`` —, ``[G]`` separate biases, ``[diag]``
    ``diag_ggn`` fallback parameters, ``None`` otherwise), the cached ``inverses`` and the
    damping they were computed with, the ``adam`` fallback's moments and step. The Monte-Carlo samples of step :math:`t` come from the
    direction's own generator seeded with ``(seed, t)``, so the step counter is all the sampling
    state (a resumed or rejected-and-retried step draws the same samples; the global RNG is never
    used).
    """

    spec: KFACSpec

    def __init__(self, spec: KFACSpec | None = None) -> None:
        super().__init__(spec or KFACSpec())
        self.twin: BackpackTwin | _HookSource | None = None
        #: the back-end in use after :meth:`setup`: ``"hooks"`` or ``"backpack"``
        self.backend: str | None = None
        self.step = 0
        self.factors: list[list[Tensor] | None] = []
        self.inverses: list[list[Tensor] | None] = []
        self.inverse_damping = float("nan")
        self.adam_v: list[Tensor | None] = []
        self.adam_step = 0
        self.generator: torch.Generator | None = None
        self._names: list[str] = []
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Choose the back-end, build it and check that every parameter is served."""
        from qlrlab.backends.kfac_hooks import assign_parameters

        s = self.spec
        params = list(params)
        pn: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            pn.setdefault(id(p), n)  # the first name of a shared parameter
        self._names = [pn.get(id(p), f"#{i}") for i, p in enumerate(params)]
        self._dtype = params[0].dtype if params else None
        self._device = params[0].device if params else None
        backend = s.backend
        if backend == "auto":
            needs_bp = s.fallback == "diag_ggn" and bool(
                assign_parameters(model, params, bias=s.bias).fallback
            )
            backend = "backpack" if needs_bp else "hooks"
            if backend == "backpack" and s.kfac_approx != "expand":
                raise ValueError(
                    "kfac_approx: reduce needs backend: hooks, but fallback: diag_ggn needs "
                    "BackPACK; set fallback: adam or identity"
                )
        self.generator = torch.Generator(device=self._device or "cpu")
        self.generator.manual_seed(s.seed)
        if backend == "backpack":
            try:
                self.twin = BackpackTwin(
                    model, loss_fn, params, owner="kfac",
                    extension="kfac" if s.fisher == "mc" else "kflr",
                    mc_samples=s.mc_samples, fallback=s.fallback, converter=s.converter,
                    joint_bias=s.bias == "joint",
                )  # fmt: skip
            except ValueError as err:
                if s.backend == "auto":
                    raise ValueError(
                        f"{err} — or keep the hook back-end (no BackPACK, any forward) with "
                        "fallback: adam or identity"
                    ) from err
                raise
        else:
            self.twin = _HookSource(model, loss_fn, params, s, self.generator, self._names)
            if s.fallback in ("error", "diag_ggn"):
                bad = [lay for lay in self.twin.layers if lay.kind == "fallback"]
                if bad and s.fallback == "diag_ggn":
                    raise ValueError(
                        f"fallback: diag_ggn needs BackPACK, but backend: hooks serves "
                        f"{self._names[bad[0].others[0]]!r} ({bad[0].reason}); set fallback: "
                        f"adam or identity, or backend: backpack"
                    )
                if bad:
                    raise ValueError(
                        f"kfac: {self._names[bad[0].others[0]]!r} gets no Kronecker factors "
                        f"({bad[0].reason}); set fallback: adam (Adam's diagonal) or identity "
                        f"(plain gradient), or exclude it from the optimised parameters"
                    )
        self.backend = backend
        self.step = 0
        self.factors = [None] * len(params)
        self.inverses = [None] * len(params)
        self.inverse_damping = float("nan")
        self.adam_v = [None] * len(params)
        self.adam_step = 0

    def describe(self) -> str:
        """Which back-end runs and which parameters got Kronecker factors or went to the
        fallback (with the reason), one line each."""
        assert self.twin is not None, "setup() was not called"
        s = self.spec
        approx = s.kfac_approx if self.backend == "hooks" else "BackPACK (conv: A expand, G reduce)"
        lines = [
            f"backend: {self.backend}; fisher: {s.fisher}; kfac_approx: {approx}; bias: {s.bias}; "
            f"fallback: {s.fallback}"
        ]
        for lay in self.twin.layers:
            if lay.kind == "kfac":
                idx = [i for i in (lay.weight, lay.bias) if i is not None]
                names = ", ".join(self._names[i] for i in idx)
                joint = " (joint [W b] block)" if lay.joint else ""
                lines.append(
                    f"kfac     {names} <- {type(lay.module).__name__} at {lay.path!r}{joint}"
                )
            else:
                for i in lay.others:
                    why = lay.reason or f"{type(lay.module).__name__} at {lay.path!r}"
                    lines.append(f"{s.fallback:<8} {self._names[i]}: {why}")
        return "\n".join(lines)

    @contextlib.contextmanager
    def gradient_pass(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the gradient pass with the back-end's capture active (the BackPACK twin, or the
        user's model with factor hooks)."""
        assert self.twin is not None, "setup() was not called"
        if self.generator is not None:  # this step's samples: a function of (seed, step) only
            self.generator.manual_seed((self.spec.seed << 32) + self.step)
        if isinstance(self.twin, _HookSource):
            with self.twin.gradient_pass(model) as module:
                yield module
        else:
            with self.twin.gradient_pass() as module:
                yield module

    # -- curvature ------------------------------------------------------------------------------
    def _update_factors(self, fresh: dict[int, Any]) -> None:
        eps = self.spec.curvature_ema if self.step > 1 else 0.0
        for i, new in fresh.items():
            new_list = list(new) if isinstance(new, list) else [new]
            old = self.factors[i]
            if old is None or eps == 0.0:
                self.factors[i] = [t.clone() for t in new_list]
            else:  # into the fresh factors (ours): a snapshot (:meth:`snapshot`) holds the old
                self.factors[i] = [
                    n.mul_(1.0 - eps).add_(o, alpha=eps) for o, n in zip(old, new_list)
                ]

    def _update_adam(self, grads: list[Tensor]) -> None:
        assert self.twin is not None
        b2 = self.spec.adam_beta2
        self.adam_step += 1
        for lay in self.twin.layers:
            if lay.kind != "fallback":
                continue
            for i in lay.others:
                g2 = grads[i] * grads[i]
                v = self.adam_v[i]
                self.adam_v[i] = (1.0 - b2) * g2 if v is None else b2 * v + (1.0 - b2) * g2

    def _invert(self, lam: float) -> None:
        s = self.spec
        lam = max(lam, s.min_damping)
        assert self.twin is not None
        kfac_layers = []
        for lay in self.twin.layers:
            if lay.kind == "fallback":  # element-wise: always computed locally
                for i in lay.others:
                    f = self.factors[i] if self.spec.fallback == "diag_ggn" else None
                    self.inverses[i] = None if f is None else [1.0 / (f[0] + lam)]
            else:
                kfac_layers.append(lay)
        if s.inverses == "owner" and is_distributed():
            # pre-allocated buffers on every worker; the owner fills them (copy_ also makes
            # column-major eigh/Cholesky results row-major, as the broadcast's raw memory must be)
            buffers = [self._placeholder_layer(lay) for lay in kfac_layers]

            def compute(j: int) -> None:
                lay = kfac_layers[j]
                keep = {i: self.inverses[i] for i in (lay.weight, lay.bias) if i is not None}
                self._invert_layer(lay, lam)
                for i, dst in keep.items():
                    for d, t in zip(dst or [], self.inverses[i] or []):
                        d.copy_(t)
                    self.inverses[i] = dst

            broadcast_from_owners(buffers, compute)
        else:
            for lay in kfac_layers:
                self._invert_layer(lay, lam)
        self.inverse_damping = lam

    def _invert_layer(self, lay: Any, lam: float) -> None:
        """Damped inverses of one Kronecker-factored layer (weight and bias)."""
        s = self.spec
        has_w = lay.weight is not None and self.factors[lay.weight] is not None
        if lay.bias is not None and not lay.joint and self.factors[lay.bias] is not None:
            if s.damping_mode == "exact" or not has_w:
                (g,) = self.factors[lay.bias]
                self.inverses[lay.bias] = [damped_cholesky(g, lam)]
        if not has_w:
            return
        assert lay.weight is not None
        g, a = self.factors[lay.weight]
        if s.damping_mode == "exact":
            eg, qg = safe_eigh(g)
            ea, qa = safe_eigh(a)
            denom = eg.clamp_min(0.0)[:, None] * ea.clamp_min(0.0)[None, :] + lam
            self.inverses[lay.weight] = [qg, qa, 1.0 / denom]
            return
        pi = 1.0
        if s.damping_mode == "factored_pi":
            tr_a = float(a.diagonal().mean())
            tr_g = float(g.diagonal().mean())
            if tr_a >= 0.0 and tr_g > 0.0:
                pi = math.sqrt(tr_a / tr_g)
        root = math.sqrt(lam)
        damp_a = max(pi * root, s.min_damping)
        damp_g = max(root / pi, s.min_damping)
        ginv = damped_cholesky(g, damp_g)
        self.inverses[lay.weight] = [ginv, damped_cholesky(a, damp_a)]
        if lay.bias is not None and not lay.joint and self.factors[lay.bias] is not None:
            # curvlinops convention: the bias shares the weight's damped G inverse
            self.inverses[lay.bias] = [ginv]

    def _placeholder_layer(self, lay: Any) -> list[Tensor]:
        """Set one layer's inverses to empty buffers shaped like :meth:`_invert_layer`'s
        results (to receive a broadcast); returns them, each once."""
        has_w = lay.weight is not None and self.factors[lay.weight] is not None
        exact = self.spec.damping_mode == "exact"
        out: list[Tensor] = []
        sep_bias = lay.bias is not None and not lay.joint and self.factors[lay.bias] is not None
        if sep_bias and (exact or not has_w):
            (g,) = self.factors[lay.bias]
            self.inverses[lay.bias] = [torch.empty_like(g)]
            out += self.inverses[lay.bias]
        if not has_w:
            return out
        g, a = self.factors[lay.weight]
        if exact:
            denom = g.new_empty(g.shape[0], a.shape[0])
            self.inverses[lay.weight] = [torch.empty_like(g), torch.empty_like(a), denom]
        else:
            ginv = torch.empty_like(g)
            self.inverses[lay.weight] = [ginv, torch.empty_like(a)]
            if sep_bias:
                self.inverses[lay.bias] = [ginv]  # shared, as in _invert_layer
        return out + self.inverses[lay.weight]

    def _apply(self, grads: list[Tensor]) -> list[Tensor]:
        assert self.twin is not None
        d = [g.clone() for g in grads]  # identity for anything without an inverse
        for lay in self.twin.layers:
            if lay.kind == "fallback":
                for i in lay.others:
                    if self.spec.fallback == "adam" and self.adam_v[i] is not None:
                        v_hat = self.adam_v[i] / (1.0 - self.spec.adam_beta2**self.adam_step)  # type: ignore[operator]
                        d[i] = grads[i] / (v_hat.sqrt() + self.spec.adam_eps)  # type: ignore[union-attr]
                        continue
                    inv = self.inverses[i]
                    if inv is not None:
                        d[i] = grads[i] * inv[0]
                continue
            if lay.bias is not None and not lay.joint and self.inverses[lay.bias] is not None:
                (chol_g,) = self.inverses[lay.bias]  # type: ignore[misc]
                gb = grads[lay.bias].reshape(-1, 1)
                d[lay.bias] = torch.cholesky_solve(gb, chol_g).reshape(grads[lay.bias].shape)
            w = lay.weight
            if w is None or self.inverses[w] is None:
                continue
            gm = grads[w].reshape(grads[w].shape[0], -1)
            if lay.joint:
                assert lay.bias is not None
                gm = torch.cat([gm, grads[lay.bias].reshape(-1, 1)], dim=1)
            inv = self.inverses[w]
            assert inv is not None
            if self.spec.damping_mode == "exact":
                qg, qa, dinv = inv
                out = qg @ ((qg.T @ gm @ qa) * dinv) @ qa.T
            else:  # G^-1 gm A^-1 by two Cholesky solves (A symmetric)
                chol_g, chol_a = inv
                out = torch.cholesky_solve(torch.cholesky_solve(gm, chol_g).T, chol_a).T
            if lay.joint:
                assert lay.bias is not None
                d[lay.bias] = out[:, -1].reshape(grads[lay.bias].shape)
                out = out[:, :-1]
            d[w] = out.reshape(grads[w].shape)
        return d

    @torch.no_grad()
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Average the fresh factors, refresh the inverses if due, return :math:`d = F^{-1} g`.

        Under data parallelism the fresh factors are first averaged over the workers with
        ``ctx.all_reduce`` (each worker's factors are means over its equal share of the batch);
        the inverses are then computed on every worker (``inverses: redundant``) or by one
        owner per layer and broadcast (``inverses: owner``).
        """
        assert self.twin is not None, "setup() was not called"
        fresh = self.twin.collect()
        if not fresh and any(lay.kind == "kfac" for lay in self.twin.layers):
            raise RuntimeError(
                "kfac: no BackPACK factors from the gradient pass; compute() must follow the "
                "optimiser's gradient pass (ComposedOptimizer.step does this)"
            )
        if ctx.all_reduce is not None:  # data parallel: average the workers' batch statistics
            fresh = {
                i: [ctx.all_reduce(t) for t in (v if isinstance(v, list) else [v])]
                for i, v in fresh.items()
            }
        self.step += 1
        self._update_factors(fresh)
        if self.spec.fallback == "adam":
            self._update_adam(grads)
        due = (self.step - 1) % self.spec.inverse_period == 0
        if due or all(inv is None for inv in self.inverses):
            self._invert(float(ctx.damping))
        return self._apply(grads)

    def snapshot(self) -> dict[str, Any]:
        """The state by reference, without copying a factor: every step *replaces* the
        factors (an out-of-place average), the inverses and the ``adam`` moments, and never
        writes into a tensor a snapshot holds (a copy of the 785×785 input factor and its
        Cholesky factor, twice each, cost 6.7 ms of a 142 ms step on the Fashion-MNIST MLP)."""
        return {
            "step": self.step,
            "factors": [None if f is None else list(f) for f in self.factors],
            "inverses": [None if f is None else list(f) for f in self.inverses],
            "inverse_damping": self.inverse_damping,
            "adam_v": list(self.adam_v),
            "adam_step": self.adam_step,
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Return to a :meth:`snapshot` (exactly: the same tensors)."""
        self.step = snapshot["step"]
        self.factors = [None if f is None else list(f) for f in snapshot["factors"]]
        self.inverses = [None if f is None else list(f) for f in snapshot["inverses"]]
        self.inverse_damping = snapshot["inverse_damping"]
        self.adam_v = list(snapshot["adam_v"])
        self.adam_step = snapshot["adam_step"]

    def state_dict(self) -> dict[str, Any]:
        """Step counter, averaged factors, cached inverses and their damping, and the ``adam``
        fallback's moments (copies)."""

        def copies(xs: list[Any]) -> list[Any]:
            return [None if f is None else [t.clone() for t in f] for f in xs]

        return {
            "step": self.step,
            "factors": copies(self.factors),
            "inverses": copies(self.inverses),
            "inverse_damping": self.inverse_damping,
            "adam_v": list(self.adam_v),
            "adam_step": self.adam_step,
        }

    def _cast(self, t: Tensor) -> Tensor:
        """A copy of ``t`` in the parameters' dtype and device (floating tensors)."""
        if t.is_floating_point() and self._dtype is not None:
            return t.to(device=self._device, dtype=self._dtype, copy=True)
        return t.clone()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (copies of) the saved state, cast to the parameters' dtype and device."""
        self.step = int(state["step"])
        self.factors = [None if f is None else [self._cast(t) for t in f] for f in state["factors"]]
        self.inverses = [
            None if f is None else [self._cast(t) for t in f] for f in state["inverses"]
        ]
        self.inverse_damping = float(state["inverse_damping"])
        if "adam_v" in state:
            self.adam_v = [None if v is None else self._cast(v) for v in state["adam_v"]]
            self.adam_step = int(state["adam_step"])
