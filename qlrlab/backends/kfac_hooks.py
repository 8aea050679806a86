r"""Kronecker factors of ``nn.Linear`` / ``nn.Conv2d`` layers captured with module hooks.

No tracing and no BackPACK: any model whose K-FAC layers are ``nn.Linear`` or ``nn.Conv2d``
*modules called as modules* works, whatever its ``forward`` does around them (attention,
residuals, ``F.gelu``, weight-shared layers, tied embeddings...). During the optimiser's own
gradient pass (:meth:`KroneckerFactorCapture.capture`):

* a forward hook on every K-FAC layer keeps a reference to the layer's input and output of
  **each call** (no copies, no arithmetic);
* a forward hook on the loss module, when the loss is evaluated, draws the Monte-Carlo targets
  (``fisher="mc"``, from the capture's own :class:`torch.Generator`) or forms the columns of the
  loss-Hessian square root (``fisher="type-2"``), and backpropagates these output cotangents to
  the recorded layer outputs with ``torch.autograd.grad(..., retain_graph=True)`` — only as far
  as the first K-FAC layer's output, never to a weight — before the optimiser's own
  ``loss.backward()`` uses (and frees) the same graph.

:meth:`KroneckerFactorCapture.factors` then forms, per layer, the input factor :math:`A` and the
output-gradient factor :math:`G` (Kronecker order :math:`G\otimes A` for the row-major
``W.reshape(out, -1)``; preconditioned gradient :math:`G^{-1}\nabla W A^{-1}`).

Conventions (the same as curvlinops ``KFACLinearOperator``, tested against it): the loss is
:math:`c\sum_\text{terms}\ell`, with :math:`c = 1/\#\text{terms}` for ``reduction="mean"``
(``MSELoss``/``BCEWithLogitsLoss`` also average over the output dimension; ``HalfMSELoss`` is
½·MSE) and :math:`c = 1` for ``"sum"``; :math:`e` is the raw per-term cotangent (sampled
gradient :math:`\nabla_z\ell(z,\hat y)` for ``mc``, a Hessian-square-root column for
``type-2``), :math:`\tilde g` its backpropagation to a layer output. With :math:`N` examples,
:math:`T` weight-sharing positions per example (sequence positions, conv output locations, and
the calls of a layer that is called several times, concatenated) and :math:`K` Monte-Carlo
samples (Eschenhagen et al., NeurIPS 2023):

* **KFAC-expand**: :math:`A = \frac1{NT}\sum_{n,t} a_{nt}a_{nt}^\top`,
  :math:`G = \frac cK\sum_{k,n,t}\tilde g_{knt}\tilde g_{knt}^\top`;
* **KFAC-reduce**: :math:`A = \frac1N\sum_n \bar a_n\bar a_n^\top` with
  :math:`\bar a_n = \frac1T\sum_t a_{nt}`, :math:`G = \frac cK\sum_{k,n}
  (\textstyle\sum_t\tilde g_{knt})(\sum_t\tilde g_{knt})^\top`.

For ``Conv2d`` :math:`a_{nt}` are the unfolded input patches (Grosse & Martens, 2016). The batch
dimension of a layer's input (for ``reduce``) is the first dimension whose size is the batch
size ``N`` of the model input (dimension 0 when it matches); ``expand`` does not need it.

**Bias.** ``bias="separate"``: the bias has its own block :math:`G` (curvlinops'
``separate_weight_and_bias=True``). ``bias="joint"``: kfac-jax's convention — a column of ones
is appended to the layer inputs (after the reduction for ``reduce``), so the layer has one block
:math:`G\otimes A` for :math:`[W\ b]` (``separate_weight_and_bias=False``).

**Which parameters get factors** (:func:`assign_parameters`; ``describe()`` prints it): the
``weight`` (and ``bias``) of every ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``, numeric
padding, ``padding_mode="zeros"``) whose weight is optimised and held by no other module. The
rest go to the caller's fallback, each with its reason: other layer types (Embedding,
LayerNorm, ...), parameters held by several modules (tied weights), unsupported conv settings,
and — found at the first capture — K-FAC layers whose forward hook never fired although their
weight is used (e.g. ``nn.MultiheadAttention.out_proj``, which the attention calls
functionally). A weight used both by its module and functionally elsewhere is not detected:
its factors then describe only the module calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlrlab._compat import version
from qlrlab.losses import HalfMSELoss

__all__ = [
    "Assignment",
    "FactorLayer",
    "KroneckerFactorCapture",
    "assign_parameters",
    "check_loss",
    "input_factor",
    "output_cotangents",
    "output_factor",
    "symmetric_gram",
]

KFACApprox = Literal["expand", "reduce"]
BiasMode = Literal["separate", "joint"]
FisherType = Literal["mc", "type-2"]

#: Layer types that get Kronecker factors.
KFAC_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclass
class FactorLayer:
    """One Kronecker-factored layer.

    Attributes:
        path: module path in the model.
        module: the layer (``nn.Linear`` or ``nn.Conv2d``).
        weight: index of its weight in the parameter list.
        bias: index of its bias (``None``: no bias or not optimised).
        joint: the bias is folded into the input factor (``bias="joint"``).
    """

    path: str
    module: nn.Module
    weight: int
    bias: int | None = None
    joint: bool = False


@dataclass
class Assignment:
    """Which parameters get Kronecker factors and which go to a fallback (with the reason).

    Attributes:
        layers: the Kronecker-factored layers.
        fallback: parameter index -> reason it is not Kronecker-factored.
        names: parameter names (for :meth:`describe`).
    """

    layers: list[FactorLayer]
    fallback: dict[int, str]
    names: list[str] = field(default_factory=list)

    def demote(self, layer: FactorLayer, reason: str) -> None:
        """Move ``layer``'s parameters to the fallback."""
        self.layers = [lay for lay in self.layers if lay is not layer]
        for i in (layer.weight, layer.bias):
            if i is not None:
                self.fallback[i] = reason

    def describe(self) -> str:
        """One line per layer / fallback parameter."""

        def nm(i: int) -> str:
            return self.names[i] if i < len(self.names) else f"#{i}"

        lines = []
        for lay in self.layers:
            parts = [nm(lay.weight)] + ([nm(lay.bias)] if lay.bias is not None else [])
            kind = type(lay.module).__name__
            bias = " (bias joint: [W b])" if lay.joint else ""
            lines.append(f"kfac     {', '.join(parts)} <- {kind} at {lay.path!r}{bias}")
        for i, why in sorted(self.fallback.items()):
            lines.append(f"fallback {nm(i)}: {why}")
        return "\n".join(lines)


def _conv_unsupported(m: nn.Conv2d) -> str | None:
    if m.groups != 1:
        return f"Conv2d with groups={m.groups} (only groups=1 is Kronecker-factored)"
    if isinstance(m.padding, str):
        return f"Conv2d with padding={m.padding!r} (numeric padding only)"
    if m.padding_mode != "zeros":
        return f"Conv2d with padding_mode={m.padding_mode!r} (zeros only)"
    return None


def assign_parameters(
    model: nn.Module,
    params: Sequence[Tensor],
    *,
    bias: BiasMode = "separate",
    names: Sequence[str] | None = None,
) -> Assignment:
    """Split ``params`` into Kronecker-factored layers and fallback parameters (with reasons).

    Args:
        model: the model.
        params: the optimised parameters (indices refer to this order).
        bias: ``"separate"`` or ``"joint"`` (see the module docstring).
        names: parameter names for :meth:`Assignment.describe` (default: from ``model``).
    """
    index = {id(p): i for i, p in enumerate(params)}
    if names is None:
        pn: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            pn.setdefault(id(p), n)  # the first name of a shared parameter
        names = [pn.get(id(p), f"#{i}") for i, p in enumerate(params)]
    owners: dict[int, dict[int, str]] = {}  # param id -> {module id: path}
    modules: dict[int, tuple[str, nn.Module]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        modules.setdefault(id(m), (path, m))
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(m), path)
    layers: list[FactorLayer] = []
    fallback: dict[int, str] = {}
    for mid, (path, m) in modules.items():
        own = dict(m.named_parameters(recurse=False))
        opt = {n: p for n, p in own.items() if id(p) in index}
        if not opt:
            continue

        def shared(p: Tensor, mid: int = mid) -> str | None:
            others = [q for k, q in owners[id(p)].items() if k != mid]
            return None if not others else ", ".join(repr(o) for o in others)

        reason: str | None = None
        if not isinstance(m, KFAC_MODULES):
            reason = f"{type(m).__name__} at {path!r} is not nn.Linear/nn.Conv2d"
        elif isinstance(m, nn.Conv2d):
            reason = _conv_unsupported(m)
        if reason is None:
            w = own.get("weight")
            if w is None or id(w) not in index:
                reason = f"the weight of {type(m).__name__} at {path!r} is not optimised"
            elif (sh := shared(w)) is not None:
                reason = f"weight of {path!r} is tied to (also held by) {sh}"
        if reason is not None:
            for p in opt.values():
                fallback.setdefault(index[id(p)], reason)
            continue
        b = opt.get("bias")
        bi: int | None = None
        if b is not None:
            if (sh := shared(b)) is not None:
                fallback[index[id(b)]] = f"bias of {path!r} is tied to (also held by) {sh}"
            else:
                bi = index[id(b)]
        for n, p in opt.items():
            if n not in ("weight", "bias"):
                fallback[index[id(p)]] = f"parameter {n!r} of {path!r} is not a weight or bias"
        layers.append(
            FactorLayer(
                path, m, index[id(own["weight"])], bi, joint=bias == "joint" and bi is not None
            )
        )
    return Assignment(layers, fallback, list(names))


# -- factors from recorded tensors -------------------------------------------------------------
def _batch_dim(shape: torch.Size, batch_size: int | None) -> int:
    if batch_size is None or len(shape) == 0 or shape[0] == batch_size:
        return 0
    for d, s in enumerate(shape[:-1]):
        if s == batch_size:
            return d
    return 0


def _linear_rows(x: Tensor, batch_size: int | None) -> Tensor:
    """``[..., D]`` -> ``[N, T, D]`` (batch dimension first)."""
    if x.ndim == 1:
        return x.reshape(1, 1, -1)
    d = _batch_dim(x.shape, batch_size)
    return x.movedim(d, 0).reshape(x.shape[d], -1, x.shape[-1])


def _unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches ``[N, C_in·kh·kw, T]`` (``F.unfold``'s layout)."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    return F.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,  # type: ignore[arg-type]
        stride=module.stride,
    )


def _patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches ``[N, T, C_in·kh·kw]`` (the weight's row-major column order)."""
    return _unfold(module, x).transpose(1, 2)


def _patch_columns(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches feature-major, ``[C_in·kh·kw, N·T]``."""
    cols = _unfold(module, x)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def _rows_of_columns(parts: Sequence[Tensor]) -> Tensor:
    """The rows ``[M, D]`` for a Gram matrix, given as column blocks ``[D, M_i]``: a transposed
    view of one contiguous ``[D, M]`` tensor. Gathering patches or cotangents feature-major
    copies contiguous runs of positions; gathering them row-major would transpose every
    ``[D, T]`` block (on the CNN's second convolution, 21 ms of the step against 4 ms)."""
    cols = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)
    return cols.T


def input_factor(
    module: nn.Module,
    inputs: Sequence[Tensor],
    *,
    approx: KFACApprox = "expand",
    joint_bias: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """The input factor :math:`A` of one layer from the inputs of its calls (module docstring).

    Args:
        module: ``nn.Linear`` or ``nn.Conv2d``.
        inputs: the layer's input tensor of each call.
        approx: ``"expand"`` or ``"reduce"``.
        joint_bias: append a column of ones (kfac-jax's ``[W b]`` block).
        batch_size: the model input's batch size (locates the batch dimension for ``reduce``).
    """
    if approx == "expand" and isinstance(module, nn.Conv2d):
        flat = _rows_of_columns([_patch_columns(module, x) for x in inputs])
        return _factor_from_rows(flat, joint_bias)
    rows = [
        _patches(module, x) if isinstance(module, nn.Conv2d) else _linear_rows(x, batch_size)
        for x in inputs
    ]
    if approx == "expand":
        flats = [r.reshape(-1, r.shape[-1]) for r in rows]
        flat = flats[0] if len(flats) == 1 else torch.cat(flats)
    else:
        if len({r.shape[0] for r in rows}) != 1:
            raise ValueError(
                "kfac_approx: reduce needs every call of a layer to see the same batch size"
            )
        flat = (rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)).mean(1)
    return _factor_from_rows(flat, joint_bias)


def _factor_from_rows(flat: Tensor, joint_bias: bool) -> Tensor:
    """:math:`A` from its rows ``[M, D]`` (averaged over the rows), with kfac-jax's ones column
    when ``joint_bias``."""
    m, n = flat.shape
    if not joint_bias:
        return symmetric_gram(flat).div_(m)
    # [a; 1][a; 1]^T averaged: the ones column never materialised
    out = flat.new_empty(n + 1, n + 1)
    symmetric_gram(flat, out=out[:-1, :-1]).div_(m)
    mean = flat.mean(0)
    out[:-1, -1] = mean
    out[-1, :-1] = mean
    out[-1, -1] = 1.0
    return out


def symmetric_gram(x: Tensor, blocks: int = 4, out: Tensor | None = None) -> Tensor:
    r""":math:`X^\top X` computing only the blocks on and above the diagonal (a symmetric rank-k
    update by ``blocks`` column blocks: :math:`(b+1)/(2b)` of the products of ``x.T @ x``)."""
    n = x.shape[1]
    if out is None:
        out = x.new_empty(n, n)
    if n < 256 or blocks < 2:
        return torch.mm(x.T, x, out=out) if out.is_contiguous() else out.copy_(x.T @ x)
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    for i in range(blocks):
        lo, hi = edges[i], edges[i + 1]
        row = out[lo:hi, lo:]
        torch.mm(x[:, lo:hi].T, x[:, lo:], out=row) if row.is_contiguous() else row.copy_(
            x[:, lo:hi].T @ x[:, lo:]
        )
        out[hi:, lo:hi] = row[:, hi - lo :].T
    return out


def output_factor(
    module: nn.Module,
    grads: Sequence[Tensor],
    *,
    approx: KFACApprox = "expand",
    scale: float = 1.0,
    batch_size: int | None = None,
) -> Tensor:
    """The output-gradient factor :math:`G` of one layer.

    Args:
        module: ``nn.Linear`` or ``nn.Conv2d``.
        grads: per call, the backpropagated cotangents at the layer output, with a leading
            sample dimension ``[K, *output.shape]``.
        approx: ``"expand"`` or ``"reduce"``.
        scale: :math:`c/K` (see the module docstring).
        batch_size: the model input's batch size (for ``reduce``).
    """
    if approx == "expand" and isinstance(module, nn.Conv2d):
        # [C_out, K·N·T] per call (contiguous runs of the T positions, see _rows_of_columns)
        parts = []
        for g in grads:
            g = g if g.ndim == 5 else g.unsqueeze(1)
            parts.append(g.flatten(3).permute(2, 0, 1, 3).reshape(g.shape[2], -1))
        return symmetric_gram(_rows_of_columns(parts)) * scale
    rows = []
    for g in grads:
        k = g.shape[0]
        if isinstance(module, nn.Conv2d):
            g = g if g.ndim == 5 else g.unsqueeze(1)
            r = g.flatten(3).transpose(2, 3)  # [K, N, T, C_out]
        else:
            gs = g[0].shape
            if len(gs) == 1:
                r = g.reshape(k, 1, 1, -1)
            else:
                d = _batch_dim(gs, batch_size)
                r = g.movedim(d + 1, 1).reshape(k, gs[d], -1, gs[-1])
        rows.append(r)
    if approx == "expand":
        flats = [r.reshape(-1, r.shape[-1]) for r in rows]
        flat = flats[0] if len(flats) == 1 else torch.cat(flats)
    else:
        summed = rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)
        flat = summed.sum(2).reshape(-1, rows[0].shape[-1])
    return symmetric_gram(flat) * scale


# -- output cotangents -----------------------------------------------------------------------
def check_loss(loss_fn: nn.Module) -> None:
    """Raise ``ValueError`` (naming the fix) for a loss :func:`output_cotangents` cannot serve."""
    if not isinstance(
        loss_fn, (nn.CrossEntropyLoss, nn.MSELoss, HalfMSELoss, nn.BCEWithLogitsLoss)
    ):
        raise ValueError(
            f"kfac: Kronecker factors need CrossEntropyLoss, MSELoss, BCEWithLogitsLoss or "
            f"HalfMSELoss, not {type(loss_fn).__name__}; use another direction"
        )
    if getattr(loss_fn, "reduction", "mean") not in ("mean", "sum"):
        raise ValueError("kfac: the loss must use reduction 'mean' or 'sum'")
    if (
        getattr(loss_fn, "weight", None) is not None
        or getattr(loss_fn, "pos_weight", None) is not None
    ):
        raise ValueError(
            f"kfac: {type(loss_fn).__name__} with class weights is not supported; drop `weight`"
        )


def output_cotangents(
    loss_fn: nn.Module,
    z: Tensor,
    y: Tensor,
    *,
    fisher: FisherType = "mc",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """Cotangents :math:`e` ``[K, *z.shape]`` at the loss input and the factor scale :math:`c/K`.

    ``mc``: :math:`K` = ``mc_samples`` sampled gradients :math:`\\nabla_z\\ell(z, \\hat y)`,
    :math:`\\hat y \\sim p(y|z)` drawn with ``generator`` (in the order BackPACK draws them, so a
    generator seeded like the global RNG reproduces BackPACK's samples); ``type-2``: the columns
    of the loss-Hessian square root (:math:`K` = number of outputs per term).

    Raises:
        ValueError: unsupported loss (type or options), naming the fix.
    """
    z = z.detach()
    red = getattr(loss_fn, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise ValueError("kfac: the loss must use reduction 'mean' or 'sum'")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or y.is_floating_point():
            raise ValueError(
                "kfac: CrossEntropyLoss with class weights or probability targets is not "
                "supported; use integer targets without `weight`"
            )
        cdim = 1 if z.ndim >= 2 else 0
        p = z.softmax(cdim)
        pl = p.movedim(cdim, -1)
        v = pl.shape[-1]
        p2 = pl.reshape(-1, v)
        valid = (y != loss_fn.ignore_index).to(z.dtype)
        n_terms = float(valid.sum()) if red == "mean" else 1.0
        vmask = valid.reshape(-1, 1)
        cols = []
        if fisher == "mc":
            for _ in range(mc_samples):
                idx = torch.multinomial(p2, 1, True, generator=generator).squeeze(-1)
                e = p2 - F.one_hot(idx, v).to(z.dtype)
                cols.append(e * vmask)
            k = mc_samples
        else:
            sq = p2.sqrt()
            for j in range(v):
                e = -p2 * sq[:, j : j + 1]
                e[:, j] += sq[:, j]
                cols.append(e * vmask)
            k = 1
        out = torch.stack([c.reshape(pl.shape).movedim(-1, cdim) for c in cols])
        return out, 1.0 / (max(n_terms, 1.0) * k)
    if isinstance(loss_fn, (nn.MSELoss, HalfMSELoss)):
        half = 0.5 if isinstance(loss_fn, HalfMSELoss) else 1.0
        c = (1.0 / z.numel() if red == "mean" else 1.0) * half
        if fisher == "mc":
            std = torch.full_like(z, math.sqrt(0.5))
            es = [2.0 * (z - torch.normal(z, std, generator=generator)) for _ in range(mc_samples)]
            return torch.stack(es), c / mc_samples
        zl = z.reshape(-1, z.shape[-1]) if z.ndim else z.reshape(1, 1)
        eye = torch.eye(zl.shape[-1], dtype=z.dtype, device=z.device) * math.sqrt(2.0)
        es = [eye[j].expand_as(zl).reshape(z.shape) for j in range(zl.shape[-1])]
        return torch.stack(es), c
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("kfac: BCEWithLogitsLoss with weight/pos_weight is not supported")
        s = z.sigmoid()
        c = 1.0 / z.numel() if red == "mean" else 1.0
        if fisher == "mc":
            es = [s - torch.bernoulli(s, generator=generator) for _ in range(mc_samples)]
            return torch.stack(es), c / mc_samples
        sl = s.reshape(-1, s.shape[-1]) if s.ndim else s.reshape(1, 1)
        r = (sl * (1 - sl)).sqrt()
        es = []
        for j in range(sl.shape[-1]):
            e = torch.zeros_like(sl)
            e[:, j] = r[:, j]
            es.append(e.reshape(z.shape))
        return torch.stack(es), c
    raise ValueError(
        f"kfac: Kronecker factors need CrossEntropyLoss, MSELoss, BCEWithLogitsLoss or "
        f"HalfMSELoss, not {type(loss_fn).__name__}; use another direction"
    )


# -- capture ---------------------------------------------------------------------------------
@dataclass
class _Call:
    x: Tensor
    out: Tensor
    version: int
    grad: Tensor | None = None


class KroneckerFactorCapture:
    """Capture Kronecker factors during a forward/backward pass with module hooks.

    Usage::

        cap = KroneckerFactorCapture(model, loss_fn, params, fisher="mc", approx="expand")
        with cap.capture(batch_size=x.shape[0]):
            loss_fn(model(x), y).backward()   # the hooks do the rest
        factors = cap.factors()              # {layer index: (A, G)}

    Args:
        model: the model (hooks are installed only inside :meth:`capture`).
        loss_fn: the loss module (its forward hook runs the cotangent backward).
        params: the optimised parameters.
        fisher: ``"mc"`` or ``"type-2"``.
        mc_samples: Monte-Carlo samples (``mc`` only).
        approx: ``"expand"`` or ``"reduce"``.
        bias: ``"separate"`` or ``"joint"``.
        generator: the sampling generator (default: a fresh one seeded with 0).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Sequence[Tensor],
        *,
        fisher: FisherType = "mc",
        mc_samples: int = 1,
        approx: KFACApprox = "expand",
        bias: BiasMode = "separate",
        generator: torch.Generator | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.params = list(params)
        self.fisher: FisherType = fisher
        self.mc_samples = mc_samples
        self.approx: KFACApprox = approx
        self.assignment = assign_parameters(model, self.params, bias=bias, names=names)
        if generator is None:
            dev = self.params[0].device if self.params else torch.device("cpu")
            generator = torch.Generator(device=dev)
            generator.manual_seed(0)
        self.generator = generator
        self._calls: dict[int, list[_Call]] = {}
        self._scale = 1.0
        self._batch_size: int | None = None
        self._captured = 0
        self._path = {id(lay.module): lay.path for lay in self.assignment.layers}

    @property
    def layers(self) -> list[FactorLayer]:
        """The Kronecker-factored layers (after any demotion at the first capture)."""
        return self.assignment.layers

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(out, Tensor) or not args:
            return
        x = args[0]
        if not isinstance(x, Tensor):
            return
        self._calls.setdefault(id(module), []).append(_Call(x.detach(), out, version(out)))  # type: ignore[arg-type]

    def _loss_hook(self, module: nn.Module, args: tuple[Any, ...], value: Any) -> None:
        if len(args) < 2 or not isinstance(args[0], Tensor) or not args[0].requires_grad:
            return
        z, y = args[0], args[1]
        calls = [c for cs in self._calls.values() for c in cs if c.out.requires_grad]
        if not calls:
            return
        for mid, cs in self._calls.items():
            for c in cs:
                if version(c.out) != c.version:
                    raise RuntimeError(
                        f"kfac: the output of layer {self._path.get(mid, '?')!r} was modified in "
                        "place (e.g. F.relu(..., inplace=True)); make that operation "
                        "out-of-place"
                    )
        e, self._scale = output_cotangents(
            self.loss_fn, z, y, fisher=self.fisher, mc_samples=self.mc_samples,
            generator=self.generator,
        )  # fmt: skip
        outs = [c.out for c in calls]
        k = e.shape[0]
        if k == 1:
            grads = torch.autograd.grad(z, outs, e[0], retain_graph=True, allow_unused=True)
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        else:
            try:
                grads = torch.autograd.grad(
                    z, outs, e, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            except RuntimeError:  # an op without a batching rule: one backward per column
                per = [
                    torch.autograd.grad(z, outs, e[j], retain_graph=True, allow_unused=True)
                    for j in range(k)
                ]
                grads = tuple(
                    None if per[0][i] is None else torch.stack([p[i] for p in per])  # type: ignore[misc]
                    for i in range(len(outs))
                )
        for c, g in zip(calls, grads):
            c.grad = None if g is None else g.detach()

    def _batch_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._batch_size is None and args and isinstance(args[0], Tensor) and args[0].ndim:
            self._batch_size = int(args[0].shape[0])

    @contextlib.contextmanager
    def capture(self, batch_size: int | None = None) -> Iterator[KroneckerFactorCapture]:
        """Install the hooks for one forward/backward pass (in-place activations are made
        out-of-place for its duration, as their outputs must keep their version)."""
        self._calls = {}
        self._batch_size = batch_size
        handles = [lay.module.register_forward_hook(self._forward_hook) for lay in self.layers]
        handles.append(self.loss_fn.register_forward_hook(self._loss_hook))
        if batch_size is None and self.approx == "reduce":  # read it from the model's input
            handles.append(self.model.register_forward_pre_hook(self._batch_hook))
        inplace = [m for m in self.model.modules() if getattr(m, "inplace", None) is True]
        for m in inplace:
            m.inplace = False  # type: ignore[assignment]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for m in inplace:
                m.inplace = True  # type: ignore[assignment]

    def factors(self) -> dict[int, tuple[Tensor, Tensor]]:
        """``{index into layers: (A, G)}`` from the last capture (layers not called are absent).

        At the first capture, layers whose hook never fired although their weight received a
        gradient are demoted to the fallback (they are used functionally).
        """
        self._captured += 1
        if self._captured == 1:
            for lay in list(self.layers):
                w = self.params[lay.weight]
                if id(lay.module) not in self._calls and getattr(w, "grad", None) is not None:
                    self.assignment.demote(
                        lay,
                        f"{type(lay.module).__name__} at {lay.path!r} is never called as a module "
                        "(its weight is used functionally, e.g. nn.MultiheadAttention.out_proj)",
                    )
        out: dict[int, tuple[Tensor, Tensor]] = {}
        with torch.no_grad():
            for li, lay in enumerate(self.layers):
                calls = self._calls.get(id(lay.module))
                if not calls:
                    continue
                # in the parameters' dtype: under autocast the captured tensors are bf16/fp16
                weight = getattr(lay.module, "weight", None)
                dt = weight.dtype if isinstance(weight, Tensor) else self.params[0].dtype
                grads = [c.grad.to(dt) for c in calls if c.grad is not None]
                a = input_factor(
                    lay.module, [c.x.to(dt) for c in calls], approx=self.approx,
                    joint_bias=lay.joint, batch_size=self._batch_size,
                )  # fmt: skip
                if grads:
                    g = output_factor(
                        lay.module, grads, approx=self.approx, scale=self._scale,
                        batch_size=self._batch_size,
                    )  # fmt: skip
                else:
                    n = lay.module.weight.shape[0]  # type: ignore[index]
                    g = a.new_zeros(n, n)  # type: ignore[arg-type]
                out[li] = (a, g)
        self._calls = {}
        return out
