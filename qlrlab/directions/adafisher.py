r"""AdaFisher: Adam-style momentum preconditioned by a diagonal block-Kronecker empirical Fisher
(Gomes, Zhang, Belilovsky, Wolf & Hosseini, 2024).

For every ``nn.Linear`` / ``nn.Conv2d`` layer the empirical Fisher block is approximated, as in
K-FAC, by the Kronecker product of an input factor and an output-gradient factor; AdaFisher keeps
only their **diagonals** (the paper observes that the factors are diagonally concentrated).
With the layer's rows :math:`\bar h_r` (inputs, or unfolded conv patches, with a trailing 1 for
the bias) and :math:`e_r` (per-term gradients of the loss at the layer's output, at the same
rows/locations — the *empirical* Fisher: the true labels, not sampled ones):

.. math::
    H_D = \operatorname{mean}_r \bar h_r^{\,2},\qquad S_D = \operatorname{mean}_r e_r^{\,2},
    \qquad e_r = n\,\frac{\partial f}{\partial z_r},

where :math:`f` is the batch loss as computed and :math:`n` its number of terms for
``reduction="mean"`` (cross-entropy: the counted targets; other losses: the output's elements;
1 for ``"sum"``). Undoing the mean makes :math:`S_D` independent of the batch size (the K-FAC
convention), so the :math:`10^{-6}` of the Min-Max normalisation stays negligible at any batch
size, and two data-parallel workers with half the batch each agree with one process.

then, per layer (symbols as in the paper),

.. math::
    \begin{aligned}
    \tilde H_D &\leftarrow \gamma \tilde H_D + (1-\gamma) H_D,\qquad
    \tilde S_D \leftarrow \gamma \tilde S_D + (1-\gamma) S_D
        &&\text{(EMA; } \tilde H_D = H_D \text{ at the first update)}\\
    \tilde F_D &= \operatorname{MinMax}(\tilde S_D) \otimes \operatorname{MinMax}(\tilde H_D)
        + \lambda
        &&\text{(Tikhonov damping } \lambda)\\
    m_t &= \beta m_{t-1} + (1-\beta) g_t,\qquad \hat m_t = m_t / (1-\beta^t)\\
    d_t &= \tilde F_D^{-1} \hat m_t\ [+\ \kappa\,\theta]
        &&(\theta \leftarrow \theta - \eta d_t)
    \end{aligned}

with :math:`\operatorname{MinMax}(x) = (x - \min x)/(\max x - \min x + 10^{-6})` and
:math:`\tilde F_D^{-1}` element-wise (the approximation is diagonal, so there is nothing to
factorise: :math:`\tilde F_D[o, i] = S'_o H'_i + \lambda` for the weight ``W.reshape(out, -1)``
and its bias column). :math:`\kappa` is AdamW-style decoupled weight decay (the paper's
AdaFisherW), off by default. ``normalize: before_ema`` applies the Min-Max normalisation to each
fresh :math:`H_D, S_D` before the EMA instead (the order in the authors' released code; the paper
writes it after); ``factor_period`` recomputes the statistics every that many steps (the
authors' ``TCov``; between refreshes the last :math:`\tilde F_D` is reused and the gradient pass
runs without hooks). Not reproduced: the released code's moving average weights the old and the
new diagonal by :math:`0.1\gamma` and :math:`0.01\gamma` (not :math:`\gamma` and
:math:`1-\gamma`), which keeps the normalised diagonals below about 0.009, so that its
:math:`\tilde F_D` is close to :math:`\lambda` everywhere; qlrlab follows the paper's EMA.

**Shared machinery.** Which parameters get factors (and the reason for every other one) is
decided by the K-FAC hook back-end's ``qlrlab.backends.kfac_hooks.assign_parameters`` (with
the joint ``[W b]`` bias); the rows whose squares are averaged are that back-end's own input rows
(Linear inputs over all leading dimensions, conv patches unfolded in the weight's column order:
KFAC-expand), so :math:`H_D` and :math:`S_D` are exactly the diagonals of
``qlrlab.backends.kfac_hooks.input_factor`` and of the output factor of the true-label
gradients, computed in :math:`O(rd)` instead of forming the :math:`d\times d` factors. This
component only records the layer inputs and the output gradients of the optimiser's own backward
(forward hooks and tensor hooks, installed for the gradient pass only; in-place activations are
made out-of-place meanwhile): no extra pass.

**Other layers** follow ``fallback``, with K-FAC's names: ``identity`` (:math:`\tilde F = 1`:
the bias-corrected momentum itself, what the authors' code does for parameters it has no factor
for), ``adam`` (Adam's :math:`\sqrt{\hat v_t} + \epsilon` with K-FAC's ``adam_beta2`` and
``adam_eps``) or ``error`` (construction fails naming the parameter and the reason).

Data parallelism: the fresh diagonals are averaged over the workers with ``ctx.all_reduce``
before the EMA.

Reference:
    D. M. Gomes, Y. Zhang, E. Belilovsky, G. Wolf & M. S. Hosseini, *AdaFisher: Adaptive second
    order optimization via Fisher information*, ICLR 2025 (arXiv:2405.16397).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec

__all__ = [
    "AdaFisherDirection",
    "AdaFisherSpec",
    "input_diagonal",
    "loss_terms",
    "min_max",
    "output_diagonal",
]


@DIRECTIONS.register("adafisher")
class AdaFisherSpec(ComponentSpec):
    """Spec of the AdaFisher direction (paper symbols in brackets).

    Attributes:
        beta: momentum decay [:math:`\\beta`], in [0, 1).
        gamma: EMA decay of the diagonal factors [:math:`\\gamma`], in [0, 1).
        damping: Tikhonov damping [:math:`\\lambda`] added to the normalised Kronecker diagonal,
            :math:`> 0` (named so because qlrlab's :math:`\\lambda` is the damping schedule's).
        weight_decay: decoupled weight decay [:math:`\\kappa`] (AdaFisherW), :math:`\\ge 0`.
        normalize: Min-Max normalisation ``after_ema`` (the paper) or ``before_ema`` (the
            authors' code).
        factor_period: recompute the factor diagonals every this many steps (``TCov``).
        fallback: parameters without Kronecker factors: ``identity``, ``adam`` or ``error``.
        adam_beta2: :math:`\\beta_2` of the ``adam`` fallback.
        adam_eps: :math:`\\epsilon` of the ``adam`` fallback.
    """

    name: Literal["adafisher"] = "adafisher"
    beta: float = Field(0.9, ge=0.0, lt=1.0)
    gamma: float = Field(0.8, ge=0.0, lt=1.0)
    damping: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    normalize: Literal["after_ema", "before_ema"] = "after_ema"
    factor_period: int = Field(1, ge=1)
    fallback: Literal["identity", "adam", "error"] = "identity"
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, ge=0.0)

    def build(self) -> AdaFisherDirection:
        """Build the direction provider."""
        return AdaFisherDirection(self)


def min_max(x: Tensor, eps: float = 1e-6) -> Tensor:
    """:math:`(x - \\min x)/(\\max x - \\min x + \\epsilon)` (AdaFisher's normalisation)."""
    lo = x.min()
    return (x - lo) / (x.max() - lo + eps)


def input_diagonal(module: nn.Module, inputs: Sequence[Tensor], *, joint_bias: bool) -> Tensor:
    r"""The diagonal of K-FAC's (KFAC-expand) input factor :math:`A` of one layer,
    :math:`\operatorname{mean}_r \bar h_r^2`, from the inputs of its calls — the rows of
    ``qlrlab.backends.kfac_hooks.input_factor`` (Linear rows, conv patches in the weight's
    column order), squared and averaged instead of multiplied out (:math:`O(rd)`, not
    :math:`O(rd^2)`); ``joint_bias`` appends the bias entry 1."""
    from qlrlab.backends.kfac_hooks import _linear_rows, _patches  # the factor's own rows

    rows = [
        (_patches(module, x) if isinstance(module, nn.Conv2d) else _linear_rows(x, None))
        for x in inputs
    ]
    flat = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]) if len(rows) > 1 else rows[0]
    flat = flat.reshape(-1, flat.shape[-1])
    diag = torch.linalg.vector_norm(flat, dim=0).square_().div_(flat.shape[0])  # no r×d temporary
    return torch.cat([diag, diag.new_ones(1)]) if joint_bias else diag


def output_diagonal(module: nn.Module, grads: Sequence[Tensor]) -> Tensor:
    r"""The diagonal of the (KFAC-expand) output factor of one layer from the gradients at its
    output, :math:`\operatorname{mean}_r s_r^2` over every row (Linear: all leading
    dimensions; Conv2d: examples and output locations) of every call."""
    total: Tensor | None = None
    count = 0
    for g in grads:
        if isinstance(module, nn.Conv2d):
            g = g if g.ndim == 4 else g.unsqueeze(0)
            sq = torch.linalg.vector_norm(g, dim=(0, 2, 3)).square_()
            count += g.shape[0] * g.shape[2] * g.shape[3]
        else:
            flat = g.reshape(-1, g.shape[-1])
            sq = torch.linalg.vector_norm(flat, dim=0).square_()
            count += flat.shape[0]
        total = sq if total is None else total + sq
    assert total is not None
    return total / count


def loss_terms(loss_fn: nn.Module, z: Tensor, y: Tensor) -> float:
    """The number of terms :math:`n` a mean-reduced loss divides by (1 for ``"sum"``):
    cross-entropy with class targets counts the targets that are not ``ignore_index``; with
    probability targets, every position; other losses (MSE, ½·MSE, BCE, ...) every element of
    the output."""
    if getattr(loss_fn, "reduction", "mean") == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if y.is_floating_point():
            return float(max(1, z.numel() // (z.shape[1] if z.ndim >= 2 else z.numel())))
        return float(max(1, int((y != loss_fn.ignore_index).sum())))
    if isinstance(loss_fn, nn.NLLLoss) and not y.is_floating_point():
        return float(max(1, int((y != loss_fn.ignore_index).sum())))
    return float(max(1, z.numel()))


class _Record:
    """Inputs and output gradients of one layer's calls during a gradient pass."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []


class AdaFisherDirection(DirectionProvider):
    """AdaFisher direction provider.

    State (``state_dict``): ``step``; the bias-corrected momentum's ``momentum`` per parameter;
    per Kronecker-factored layer the EMA'd diagonals ``H`` and ``S`` (``None`` before the first
    update); the ``adam`` fallback's ``adam_v`` (``None`` for other parameters).
    """

    spec: AdaFisherSpec

    def __init__(self, spec: AdaFisherSpec | None = None) -> None:
        super().__init__(spec or AdaFisherSpec())
        self.step = 0
        self.momentum: list[Tensor] = []
        self.H: list[Tensor | None] = []
        self.S: list[Tensor | None] = []
        self.adam_v: list[Tensor | None] = []
        self.layers: list[Any] = []
        self.fallback: dict[int, str] = {}
        self._model: nn.Module | None = None
        self._loss_fn: nn.Module | None = None
        self._terms = 1.0
        self._records: dict[int, _Record] | None = None

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Assign parameters to Kronecker-factored layers (K-FAC's hook back-end) or the
        fallback; allocate the momentum."""
        from qlrlab.backends.kfac_hooks import assign_parameters

        assignment = assign_parameters(model, params, bias="joint")
        self.layers = list(assignment.layers)
        self.fallback = dict(assignment.fallback)
        if self.fallback and self.spec.fallback == "error":
            names = {id(p): n for n, p in model.named_parameters()}
            i, why = sorted(self.fallback.items())[0]
            raise ValueError(
                f"adafisher: parameter {names.get(id(params[i]), f'#{i}')!r} gets no Kronecker "
                f"factors ({why}); set fallback: identity (plain momentum) or adam (Adam's "
                "diagonal), or exclude it from the optimised parameters"
            )
        self._model = model
        self._loss_fn = loss_fn
        self.step = 0
        self.momentum = [torch.zeros_like(p) for p in params]
        self.H = [None] * len(self.layers)
        self.S = [None] * len(self.layers)
        adam = self.spec.fallback == "adam"
        self.adam_v = [
            torch.zeros_like(p) if adam and i in self.fallback else None
            for i, p in enumerate(params)
        ]

    def describe(self) -> str:
        """Which parameters get Kronecker-factored diagonals and which the fallback (why)."""
        lines = [f"adafisher {type(lay.module).__name__} at {lay.path!r}" for lay in self.layers]
        lines += [f"{self.spec.fallback} #{i}: {why}" for i, why in sorted(self.fallback.items())]
        return "\n".join(lines)

    # -- statistics ------------------------------------------------------------------------------
    def _due(self) -> bool:
        return self.step % self.spec.factor_period == 0  # the step about to run is step + 1

    @contextlib.contextmanager
    def gradient_pass(self, model: nn.Module) -> Iterator[nn.Module]:
        """Record the K-FAC layers' inputs and output gradients during the gradient pass (only
        on steps that refresh the factors)."""
        if not self._due() or not self.layers:
            self._records = None
            yield model
            return
        records = {id(lay.module): _Record() for lay in self.layers}

        def forward_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not torch.is_grad_enabled() or not isinstance(out, Tensor) or not args:
                return
            rec = records[id(module)]
            rec.inputs.append(args[0].detach())
            if out.requires_grad:
                out.register_hook(lambda g, rec=rec: rec.grads.append(g.detach()))

        def loss_hook(module: nn.Module, args: tuple[Any, ...], value: Any) -> None:
            if len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor):
                self._terms = loss_terms(module, args[0], args[1])

        handles = [lay.module.register_forward_hook(forward_hook) for lay in self.layers]
        if self._loss_fn is not None:
            handles.append(self._loss_fn.register_forward_hook(loss_hook))
        self._terms = 1.0
        inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
        for m in inplace:
            m.inplace = False  # type: ignore[assignment]
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
            for m in inplace:
                m.inplace = True  # type: ignore[assignment]
        self._records = records

    def _fresh_diagonals(self, ctx: StepContext) -> dict[int, tuple[Tensor, Tensor]]:
        assert self._records is not None
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for li, lay in enumerate(self.layers):
            rec = self._records[id(lay.module)]
            if not rec.inputs or not rec.grads:
                continue
            h = input_diagonal(lay.module, rec.inputs, joint_bias=lay.joint)
            s = output_diagonal(lay.module, rec.grads) * (self._terms * self._terms)
            out[li] = (ctx.all_reduce(h), ctx.all_reduce(s))
        self._records = None
        return out

    def _update_factors(self, fresh: dict[int, tuple[Tensor, Tensor]]) -> None:
        s = self.spec
        for li, (h_new, s_new) in fresh.items():
            if s.normalize == "before_ema":
                h_new, s_new = min_max(h_new), min_max(s_new)
            h_old, s_old = self.H[li], self.S[li]
            if h_old is None or s_old is None:
                self.H[li], self.S[li] = h_new, s_new
            else:
                self.H[li] = s.gamma * h_old + (1.0 - s.gamma) * h_new
                self.S[li] = s.gamma * s_old + (1.0 - s.gamma) * s_new

    def preconditioner(self, layer: int) -> Tensor | None:
        """:math:`\\tilde F_D` of one layer as an ``[out, in (+1)]`` matrix (``None`` before
        the first statistics)."""
        h, s_ = self.H[layer], self.S[layer]
        if h is None or s_ is None:
            return None
        if self.spec.normalize == "after_ema":
            h, s_ = min_max(h), min_max(s_)
        return torch.outer(s_, h) + self.spec.damping

    # -- the direction ---------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Refresh the factor diagonals if due, update the momentum, return
        :math:`d = \\tilde F_D^{-1}\\hat m_t\\ [+ \\kappa\\theta]`."""
        s = self.spec
        if self._records is not None:
            self._update_factors(self._fresh_diagonals(ctx))
        self.step += 1
        t = self.step
        bc1 = 1.0 - s.beta**t
        for m, g in zip(self.momentum, grads):
            m.lerp_(g, 1.0 - s.beta)
        d = [m / bc1 for m in self.momentum]
        for li, lay in enumerate(self.layers):
            f = self.preconditioner(li)
            if f is None:
                continue
            w = lay.weight
            if lay.joint and lay.bias is not None:
                d[w] = (d[w].reshape(f.shape[0], -1) / f[:, :-1]).reshape(d[w].shape)
                d[lay.bias] = d[lay.bias] / f[:, -1]
            else:
                d[w] = (d[w].reshape(f.shape[0], -1) / f).reshape(d[w].shape)
        if s.fallback == "adam":
            bc2 = 1.0 - s.adam_beta2**t
            for i, v in enumerate(self.adam_v):
                if v is None:
                    continue
                v.mul_(s.adam_beta2).addcmul_(grads[i], grads[i], value=1.0 - s.adam_beta2)
                d[i] = d[i] / ((v / bc2).sqrt_().add_(s.adam_eps))
        if s.weight_decay:
            for i, p in enumerate(ctx.problem.params):
                d[i].add_(p.detach(), alpha=s.weight_decay)
        return d

    def state_dict(self) -> dict[str, Any]:
        """Step, momentum, the EMA'd factor diagonals and the ``adam`` fallback's moments."""
        return {
            "step": self.step,
            "momentum": self.momentum,
            "H": list(self.H),
            "S": list(self.S),
            "adam_v": list(self.adam_v),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (copies of) the saved state, in the parameters' dtype and on their device."""
        like = self.momentum[0] if self.momentum else torch.zeros(())

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(like.device, like.dtype, copy=True)

        self.step = int(state["step"])
        for dst, src in zip(self.momentum, state["momentum"]):
            dst.copy_(src)
        self.H = [copy(t) for t in state["H"]]
        self.S = [copy(t) for t in state["S"]]
        self.adam_v = [copy(t) for t in state["adam_v"]]
        self._records = None
