r"""Loss modules and their closed-form output-space Hessians.

Curvature convention: :math:`C` is the curvature of the loss *exactly as the module computes it*
(mean reduction by default). For a network output :math:`z = f_\theta(x)` the GGN is
:math:`G = J^\top H_z J` with :math:`H_z = \nabla_z^2 \ell`. This module holds the dispatch table
:data:`OUTPUT_HESSIANS` from loss-module types to closed-form products :math:`H_z u`
(BackPACK style: extend it for your own losses). A loss without an entry, or with settings the
closed form does not cover (class weights, ``pos_weight``...), falls back to
:func:`generic_output_hvp` (double backward through the loss), which is exact but slower.

=========================  =====================================================================
loss (reduction ``mean``)  :math:`H_z u` per element; divided by the normaliser :math:`n`
=========================  =====================================================================
``CrossEntropyLoss``       :math:`p \odot u - p (p^\top u)`, :math:`n` = number of non-ignored targets
``MSELoss``                :math:`2u`, :math:`n` = number of elements
``HalfMSELoss``            :math:`u`, :math:`n` = number of elements (the paper's ½·MSE)
``BCEWithLogitsLoss``      :math:`\sigma(1-\sigma) u`, :math:`n` = number of elements
=========================  =====================================================================

For ``reduction="sum"`` the normaliser is 1. For cross-entropy the GGN equals the Fisher; for ½·MSE
it equals the Fisher of a unit-variance Gaussian likelihood.

Layout: with few classes (:math:`C \le` :data:`CLASS_MAJOR_MAX_CLASSES`) the cross-entropy quadratic
form works on class-major ``(C, N)`` copies of the logits, so every reduction over classes runs
across the batch in vector lanes (on the CPU the row-wise softmax of a ``(3200, 10)`` batch costs
about as much as the whole class-major quadratic form: 190–220 µs against 355–380 µs measured).
The value is the same up to round-off; the fast GGN path hands over a small last layer's tangent
already class-major (as a transposed view). :func:`loss_value` evaluates a plain
``CrossEntropyLoss`` class-major too (the loss at :math:`\theta - \alpha d` in the fast path):
on a ``(3200, 10)`` batch it takes 65 µs where ``F.cross_entropy`` takes 480–520 µs, because
the row-wise log-softmax of a 10-wide row is not vectorised across the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlrlab._compat import global_module_hooks

__all__ = [
    "OUTPUT_HESSIANS",
    "SQUARED_ERROR_LOSSES",
    "ZERO_OUTPUT_HESSIAN",
    "HalfMSELoss",
    "NaNPaddedLoss",
    "UnsupportedLossError",
    "check_output_hessian",
    "generic_output_hvp",
    "loss_value",
    "output_hvp",
    "output_quadratic_form",
    "register_output_hessian",
]


class HalfMSELoss(nn.Module):
    r"""Half mean squared error, :math:`\frac{1}{2 n}\sum_i (\hat y_i - y_i)^2` over all elements.

    This is ``optax.l2_loss`` averaged, as used by the AdamQLR paper for the UCI regression tasks
    (Clarke & Hernández-Lobato, 2024). Its output Hessian is :math:`I/n` (``nn.MSELoss``: :math:`2I/n`).

    Args:
        reduction: ``"mean"`` (default) or ``"sum"``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"HalfMSELoss reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Return the reduced ½·squared error."""
        return 0.5 * F.mse_loss(input, target, reduction=self.reduction)


OutputHVP = Callable[[nn.Module, Tensor, Tensor, Tensor], "Tensor | None"]

#: Dispatch table ``loss type -> fn(loss_fn, z, y, u) -> H_z u`` (or ``None`` = use the generic path).
OUTPUT_HESSIANS: dict[type[nn.Module], OutputHVP] = {}


def register_output_hessian(loss_type: type[nn.Module]) -> Callable[[OutputHVP], OutputHVP]:
    """Decorator adding a closed-form output-Hessian product for ``loss_type``."""

    def deco(fn: OutputHVP) -> OutputHVP:
        OUTPUT_HESSIANS[loss_type] = fn
        return fn

    return deco


def _normaliser(reduction: str, n: int | Tensor) -> float | Tensor | None:
    if reduction == "mean":
        return n
    if reduction == "sum":
        return 1.0
    return None  # "none": not a scalar loss


@register_output_hessian(nn.CrossEntropyLoss)
def _ce_hvp(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor | None:
    assert isinstance(loss_fn, nn.CrossEntropyLoss)
    if loss_fn.weight is not None:
        return None
    class_dim = 1 if z.ndim > 1 else 0
    p = torch.softmax(z, dim=class_dim)
    pu = p * u
    hu = pu - p * pu.sum(dim=class_dim, keepdim=True)
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        mask = y != loss_fn.ignore_index
        count = mask.sum()
        hu = hu * mask.unsqueeze(class_dim).to(hu.dtype)
    else:  # class probabilities
        count = z.numel() // z.shape[class_dim]  # type: ignore[assignment]
    norm = _normaliser(loss_fn.reduction, count)
    if norm is None:
        return None
    return hu / norm


@register_output_hessian(nn.MSELoss)
def _mse_hvp(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor | None:
    norm = _normaliser(loss_fn.reduction, z.numel())  # type: ignore[arg-type]
    return None if norm is None else 2.0 * u / norm


@register_output_hessian(HalfMSELoss)
def _half_mse_hvp(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor | None:
    norm = _normaliser(loss_fn.reduction, z.numel())  # type: ignore[arg-type]
    return None if norm is None else u / norm


@register_output_hessian(nn.BCEWithLogitsLoss)
def _bce_hvp(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor | None:
    assert isinstance(loss_fn, nn.BCEWithLogitsLoss)
    if loss_fn.weight is not None or loss_fn.pos_weight is not None:
        return None
    s = torch.sigmoid(z)
    norm = _normaliser(loss_fn.reduction, z.numel())
    return None if norm is None else s * (1 - s) * u / norm


#: at most this many classes: cross-entropy reductions run class-major (see the module docstring)
CLASS_MAJOR_MAX_CLASSES = 32


def _class_major(z: Tensor) -> bool:
    return z.ndim == 2 and z.shape[1] <= CLASS_MAJOR_MAX_CLASSES and z.shape[0] > z.shape[1]


#: shifted logits below this are raised to it before ``exp`` in the class-major softmax: :math:`e^{-87} \approx 1.6\cdot
#: 10^{-38}` is float32's smallest normal number, and CPU ``exp`` is an order of magnitude slower on
#: inputs that underflow (measured 470 µs against 40 µs on 32k elements from an overconfident
#: classifier). Each such term changes by less than :math:`1.7\cdot10^{-38}` next to a sum
#: :math:`\ge 1`, far below round-off in either float32 or float64.
EXP_FLOOR = -87.0


def _softmax_class_major(zT: Tensor) -> Tensor:
    """Softmax over dim 0 of a fresh contiguous ``(C, N)`` tensor, computed in place."""
    zT.sub_(zT.amax(0)).clamp_min_(EXP_FLOOR).exp_()
    return zT.div_(zT.sum(0))


def _ce_quadratic_form(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor | None:
    r""":math:`u^\top H_z u` for cross-entropy without forming :math:`H_z u`: per position
    :math:`\sum_k p_k (u_k - \bar u)^2` with :math:`\bar u = p^\top u` (equal to
    :math:`u^\top(p\odot u - p\,p^\top u)`, non-negative by construction)."""
    assert isinstance(loss_fn, nn.CrossEntropyLoss)
    if loss_fn.weight is not None:
        return None
    if _class_major(z):
        # a copy even when z is class-major already: the softmax runs in place
        p = _softmax_class_major(z.t().clone(memory_format=torch.contiguous_format))  # (C, N)
        uT = u.t().contiguous()  # no copy when u is a transposed view already
        dev = uT - (p * uT).sum(0)
        per_pos = p.mul_(dev).mul_(dev).sum(0)
    else:
        class_dim = 1 if z.ndim > 1 else 0
        p = torch.softmax(z, dim=class_dim)
        dev = u - (p * u).sum(dim=class_dim, keepdim=True)
        per_pos = (p * dev).mul_(dev).sum(dim=class_dim)
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        mask = y != loss_fn.ignore_index
        count = mask.sum()
        total = (per_pos * mask).sum()
    else:  # class probabilities
        count = z.numel() // z.shape[1 if z.ndim > 1 else 0]  # type: ignore[assignment]
        total = per_pos.sum()
    norm = _normaliser(loss_fn.reduction, count)
    return None if norm is None else total / norm


def _plain_ce(loss_fn: nn.Module) -> bool:
    """A ``CrossEntropyLoss`` whose value :func:`loss_value` may compute itself: the built-in
    ``forward``, no hooks, no class weights, no label smoothing, a scalar reduction."""
    return (
        isinstance(loss_fn, nn.CrossEntropyLoss)
        and type(loss_fn).forward is nn.CrossEntropyLoss.forward
        and type(loss_fn).__call__ is nn.Module.__call__
        and loss_fn.weight is None
        and loss_fn.label_smoothing == 0.0
        and loss_fn.reduction in ("mean", "sum")
        and not _foreign_hooks(loss_fn)
        and not global_module_hooks(backward=False)
    )


def _foreign_hooks(module: nn.Module) -> bool:
    """Forward hooks on ``module`` other than qlrlab's batch observers (which only record)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    if not hooks:
        return False
    from qlrlab._observe import is_observer_hook

    return not all(is_observer_hook(h) for h in hooks)


def loss_value(loss_fn: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    r"""``loss_fn(z, y)``, computed class-major for a plain cross-entropy with few classes.

    For integer targets and :math:`C \le` :data:`CLASS_MAJOR_MAX_CLASSES` classes the value is
    :math:`\frac1n\sum_{i:\,y_i \ne \text{ignore}} \big(m_i + \log\sum_k e^{z_{ik} - m_i}
    - z_{i y_i}\big)` with :math:`m_i = \max_k z_{ik}`, every reduction over classes running
    across the batch on a ``(C, N)`` copy (none when ``z`` is a transposed view already). Any
    other loss, or settings outside that case, calls ``loss_fn`` itself. Out-of-range targets
    raise, as in ``F.cross_entropy``.
    """
    if not (
        _plain_ce(loss_fn)
        and _class_major(z)
        and z.is_floating_point()
        and y.ndim == 1
        and y.shape[0] == z.shape[0]
        and y.dtype == torch.int64
    ):
        return loss_fn(z, y)
    assert isinstance(loss_fn, nn.CrossEntropyLoss)
    zT = z.t().contiguous()  # (C, N); no copy when z is a transposed view already
    m = zT.amax(0)
    lse = (zT - m).clamp_min_(EXP_FLOOR).exp_().sum(0).log_().add_(m)
    keep = y != loss_fn.ignore_index
    target = torch.where(keep, y, 0)
    per_pos = lse.sub_(zT.gather(0, target.unsqueeze(0)).squeeze(0))
    total = torch.where(keep, per_pos, 0.0).sum()
    return total / keep.sum() if loss_fn.reduction == "mean" else total


#: closed-form :math:`H_z u` entries that have a cheaper fused :math:`u^\top H_z u`
_FUSED_QUADRATIC_FORMS: dict[OutputHVP, OutputHVP] = {_ce_hvp: _ce_quadratic_form}


class UnsupportedLossError(ValueError):
    """The loss has no output Hessian a GGN/Fisher quadratic model can use (the message names
    the loss and the alternatives)."""


_ALTERNATIVES = (
    "use curvature: {name: hessian} (the exact Hessian includes the model's own curvature), "
    "a loss with curvature, or register the loss's output Hessian with "
    "qlrlab.losses.register_output_hessian"
)

#: losses whose output Hessian :math:`H_z` is zero almost everywhere (linear or piecewise linear
#: in the model output ``z``), so :math:`d^\top G d = 0` and a GGN/Fisher quadratic model has no
#: curvature (AdamQLR's :math:`\alpha = g^\top d / \lambda\|d\|^2` would then be set by the
#: damping alone): the loss type and a hint. A registered closed form (:data:`OUTPUT_HESSIANS`)
#: takes precedence.
ZERO_OUTPUT_HESSIAN: dict[type[nn.Module], str] = {
    nn.L1Loss: "L1 is piecewise linear (HuberLoss or SmoothL1Loss are its curved relatives)",
    nn.NLLLoss: "NLLLoss is linear in its log-probabilities (give the logits to "
    "CrossEntropyLoss instead of log_softmax + NLLLoss)",
    nn.KLDivLoss: "KLDivLoss is linear in its input log-probabilities (give the logits to "
    "CrossEntropyLoss with probability targets)",
    nn.HingeEmbeddingLoss: "hinge losses are piecewise linear",
    nn.MarginRankingLoss: "margin losses are piecewise linear",
    nn.MultiMarginLoss: "margin losses are piecewise linear (power 1)",
    nn.MultiLabelMarginLoss: "margin losses are piecewise linear",
}


def _zero_hessian_hint(loss_fn: nn.Module) -> str | None:
    for cls in type(loss_fn).__mro__:
        if cls in ZERO_OUTPUT_HESSIAN:
            return ZERO_OUTPUT_HESSIAN[cls]
    return None


def check_output_hessian(loss_fn: nn.Module, owner: str) -> None:
    """Refuse (at construction) a loss whose output Hessian is zero: see
    :data:`ZERO_OUTPUT_HESSIAN`.

    Args:
        loss_fn: the loss module.
        owner: the curvature's spec name, for the message.

    Raises:
        UnsupportedLossError: naming the loss and the alternatives.
    """
    if closed_form_output_hvp(loss_fn) is not None:
        return
    hint = _zero_hessian_hint(loss_fn)
    if hint is not None:
        raise UnsupportedLossError(
            f"curvature: {owner!r} cannot use {type(loss_fn).__name__}: its output Hessian is "
            f"zero ({hint}), so dᵀGd = 0 and the quadratic model has no curvature; "
            f"{_ALTERNATIVES}"
        )


def generic_output_hvp(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """:math:`H_z u` for any scalar loss, by double backward through ``loss_fn``.

    Raises:
        UnsupportedLossError: the loss's gradient does not depend on ``z`` (the loss is linear
            in ``z``: zero output Hessian) or cannot be differentiated twice.
    """
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (gz,) = torch.autograd.grad(loss_fn(zz, y), zz, create_graph=True)
        if not gz.requires_grad:
            raise UnsupportedLossError(
                f"{type(loss_fn).__name__} is linear in the model output: its output Hessian is "
                f"zero, so a GGN/Fisher quadratic model has no curvature; {_ALTERNATIVES}"
            )
        try:
            (hu,) = torch.autograd.grad(gz, zz, u, allow_unused=True)
        except RuntimeError as exc:
            if "not implemented" not in str(exc):
                raise
            raise UnsupportedLossError(
                f"{type(loss_fn).__name__} cannot be differentiated twice ({exc}); {_ALTERNATIVES}"
            ) from None
    return torch.zeros_like(z) if hu is None else hu.detach()


def closed_form_output_hvp(loss_fn: nn.Module) -> OutputHVP | None:
    """The closed-form entry for ``type(loss_fn)`` (walking its MRO), or ``None``."""
    for cls in type(loss_fn).__mro__:
        if cls in OUTPUT_HESSIANS:
            return OUTPUT_HESSIANS[cls]
    return None


def output_hvp(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """:math:`H_z u`, closed form where available, otherwise :func:`generic_output_hvp`."""
    fn = closed_form_output_hvp(loss_fn)
    if fn is not None:
        out = fn(loss_fn, z, y, u)
        if out is not None:
            return out
    return generic_output_hvp(loss_fn, z, y, u)


def output_quadratic_form(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    r""":math:`u^\top H_z u` as a 0-d tensor: fused for cross-entropy (when its registered
    :math:`H_z u` is the built-in one), otherwise ``(u * output_hvp(loss_fn, z, y, u)).sum()``."""
    fused = _FUSED_QUADRATIC_FORMS.get(closed_form_output_hvp(loss_fn))  # type: ignore[arg-type]
    if fused is not None:
        out = fused(loss_fn, z, y, u)
        if out is not None:
            return out
    return (u * output_hvp(loss_fn, z, y, u)).sum()


#: losses whose output Hessian does not depend on the targets (squared errors): the rows the
#: AdamQLR paper's code pads with NaN count in their curvature average (see :class:`NaNPaddedLoss`)
SQUARED_ERROR_LOSSES: tuple[type[nn.Module], ...] = (HalfMSELoss, nn.MSELoss)


class NaNPaddedLoss(nn.Module):
    r"""A loss as the AdamQLR paper's code sees a batch padded with NaN rows (a reproduction aid).

    The original code pads the training set with NaN rows up to a multiple of the batch size
    :math:`B` and averages with ``nanmean``: the loss and its gradient are those of the
    :math:`n` real rows, so :meth:`forward` returns ``loss(z, y)`` of the unpadded batch. Its
    exact-curvature quadratic model differs: for a squared-error loss
    (:data:`SQUARED_ERROR_LOSSES`) the padded rows add zero to an average over all :math:`B`
    rows, so the output Hessian, and with it :math:`d^\top C d`, is scaled by :math:`n / B`
    (measured on UCI Energy at :math:`B = 3200 > 588` rows: the first α about 5× too large,
    divergence within about 200 steps). Other
    losses are unaffected, as in the original (their NaN rows are skipped). Only the GGN's
    closed-form output Hessian (:data:`OUTPUT_HESSIANS`) carries the factor; the Hessian oracle
    differentiates :meth:`forward` and sees the unscaled loss, as the original's ``nanmean``
    did. Runs select it with ``nan_padding: true`` (:class:`qlrlab.engine.RunSpec`).

    Args:
        loss: the mean-reduced loss of the real rows.
        padded_rows: :math:`B`, the number of rows every padded batch has.
    """

    def __init__(self, loss: nn.Module, padded_rows: int) -> None:
        super().__init__()
        if padded_rows < 1:
            raise ValueError(f"NaNPaddedLoss padded_rows must be >= 1, got {padded_rows}")
        self.loss = loss
        self.padded_rows = int(padded_rows)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The wrapped loss of the real rows."""
        return self.loss(input, target)

    def curvature_scale(self, z: Tensor) -> float:
        """:math:`n / B` for a squared-error loss on a batch of :math:`n < B` rows, else 1."""
        rows = z.shape[0] if z.ndim else 1
        if isinstance(self.loss, SQUARED_ERROR_LOSSES) and rows < self.padded_rows:
            return rows / self.padded_rows
        return 1.0


@register_output_hessian(NaNPaddedLoss)
def _nan_padded_hvp(loss_fn: nn.Module, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    assert isinstance(loss_fn, NaNPaddedLoss)
    hu = output_hvp(loss_fn.loss, z, y, u)
    scale = loss_fn.curvature_scale(z)
    return hu if scale == 1.0 else hu * scale
