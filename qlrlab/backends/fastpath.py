r"""Fast GGN path: tangents and :math:`f(\theta - \alpha d)` from the gradient pass's activations.

For a model that is a *chain* of leaf modules :math:`x_0 \to m_1 \to x_1 \to \dots \to m_L \to z`
(an ``nn.Sequential``, possibly nested, or any ``forward`` that just feeds each leaf's output to
the next leaf; reshapes by views are allowed), forward hooks installed during the gradient pass
(:meth:`GGNOracle.gradient_pass <qlrlab.curvature.ggn.GGNOracle.gradient_pass>`) record each
leaf's input :math:`x_{l-1}` and output :math:`x_l`. The output tangent :math:`u = J d` then
follows layer by layer without recomputing any forward pass:

=====================  ===========================================================================
layer                  tangent :math:`u_l` from :math:`u_{l-1}` and the direction :math:`(dW, db)`
=====================  ===========================================================================
``Linear``             :math:`u_{l-1} W^\top + x_{l-1}\, dW^\top + db`
``ConvNd``             :math:`W * u_{l-1} + dW * x_{l-1} + db` (two convolutions)
``BatchNorm`` (train)  :math:`\gamma\big(\frac{u - \bar u}{s} - \hat x\,\overline{\hat x u}/s\big)
                       + d\gamma\,\hat x + d\beta` (batch statistics, :math:`s=\sqrt{\sigma^2_B+\epsilon}`)
``BatchNorm`` (eval)   :math:`\gamma u / s + d\gamma\,\hat x + d\beta` (running statistics)
``ReLU/Tanh/Sigmoid``  :math:`u \odot \sigma'(x)` from the cached output
``MaxPoolNd``          :math:`u` gathered at the pooling indices
other parameter-free   ``torch.func.jvp`` of that module alone
=====================  ===========================================================================

The first layer's input has no tangent, so it costs a single product. For the extra forward pass
at :math:`\theta - \alpha d`, every layer before the first optimised one keeps its cached output,
and the first optimised layer is *affine in its own parameters* at a fixed input, so its new
output is exactly :math:`x_l - \alpha u_l` with no new matrix product; only later layers are
recomputed. For the usual MLPs and CNNs the first layer dominates the cost.

A ``Linear`` layer with few outputs (at most :data:`CLASS_MAJOR_MAX_OUT`, e.g. a classifier head)
computes its tangent and shifted output *class-major*, :math:`(W u^\top)^\top`, and returns the
transposed view: BLAS is several times faster at producing a ``(10, 3200)`` result than a
``(3200, 10)`` one, and the loss's class reductions then run across the batch
(:mod:`qlrlab.losses`). Values are the same up to round-off; every later operation accepts the view.
Wider layers stay row-major: the transposed copy of a cached output that a class-major hidden
layer would need costs more than BLAS saves on the product. A ReLU
followed by a class-major head runs in blocks of rows on the CPU (see :data:`MASKED_HEAD_BLOCK`),
so that each block of the masked tangent is multiplied while it is still in cache.

The chain is checked while it is recorded (each leaf's input must be the previous leaf's output
or a view of it, the first input must not require grad, the model's output must be the last
leaf's output, no cached tensor may be modified in place afterwards); when any check fails the
oracle falls back to the general ``torch.func`` path for that step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _MaxPoolNd

from qlrlab._compat import global_module_hooks, plain_module_call, version, written_since
from qlrlab._observe import only_observer_hooks

__all__ = [
    "CLASS_MAJOR_MAX_OUT",
    "MASKED_HEAD_BLOCK",
    "ChainRecorder",
    "ChainTangents",
    "Record",
    "fast_path_unsupported",
]

_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
#: a Linear layer with at most this many outputs computes tangents and shifted outputs class-major
CLASS_MAJOR_MAX_OUT = 16
#: on the CPU a ReLU's tangent and the class-major head after it run in blocks of rows holding
#: about this many hidden activations each (256 rows of a 256-wide layer: three 256 KiB operands
#: that stay in cache between the mask and the product)
MASKED_HEAD_BLOCK = 2**16
#: parameter-free leaves whose tangent is the input tangent reshaped to the output's shape
_PASS_THROUGH = (nn.Flatten, nn.Unflatten, nn.Identity, nn.modules.dropout._DropoutNd)


@functools.cache
def _known_param_forwards() -> frozenset[Any]:
    fwds: set[Any] = {
        nn.Linear.forward,
        nn.Conv1d.forward,
        nn.Conv2d.forward,
        nn.Conv3d.forward,
        _BatchNorm.forward,
    }
    with contextlib.suppress(Exception):  # the models package is optional here
        from qlrlab.models.batchnorm import BatchNorm2d

        fwds.add(BatchNorm2d.forward)
    return frozenset(fwds)


def _kind_of_type(cls: type) -> str | None:
    if cls.forward not in _known_param_forwards():
        return None
    if issubclass(cls, nn.Linear):
        return "linear"
    if issubclass(cls, _ConvNd):
        return "conv"
    if issubclass(cls, _BatchNorm):
        return "bn"
    return None


#: module type -> its kind (see :func:`_kind`; the class attributes it reads do not change)
_KIND_BY_TYPE: dict[type, str | None] = {}


def _kind(m: nn.Module) -> str | None:
    """``"linear"``, ``"conv"``, ``"bn"`` for supported parametrised leaves, else ``None``."""
    cls = type(m)
    try:
        kind = _KIND_BY_TYPE[cls]
    except KeyError:
        kind = _KIND_BY_TYPE[cls] = _kind_of_type(cls)
    if kind == "conv" and m.transposed:
        return None
    return kind


def _is_leaf(m: nn.Module) -> bool:
    """``next(m.children(), None) is None`` without making a generator."""
    return not m._modules or all(c is None for c in m._modules.values())


def fast_path_unsupported(model: nn.Module, params: Sequence[Tensor]) -> str | None:
    """Why the fast path cannot handle ``model`` (``None`` when it can, subject to the run-time
    chain check).

    Every parameter must be the ``weight``/``bias`` of a ``Linear``, ``Conv1d/2d/3d`` or
    ``BatchNorm`` leaf; every other leaf must hold neither parameters nor buffers; non-leaf
    modules must not own parameters directly.
    """
    opt_ids = {id(p) for p in params}
    seen: set[int] = set()
    for name, m in model.named_modules():
        own = [p for p in m._parameters.values() if p is not None]
        has_children = next(m.children(), None) is not None
        label = name or type(m).__name__
        if has_children:
            if own:
                return f"module {label!r} owns parameters directly and has submodules"
            continue
        if own or any(True for _ in m.buffers(recurse=False)):
            kind = _kind(m)
            if kind is None:
                return f"layer {label!r} ({type(m).__name__}) has no fast tangent rule"
            if set(m._parameters) - {"weight", "bias"}:
                return f"layer {label!r} has parameters other than weight/bias"
            if kind != "bn" and any(True for _ in m.buffers(recurse=False)):
                return f"layer {label!r} has buffers"
            seen.update(id(p) for p in own)
    missing = opt_ids - seen
    if missing:
        return "some optimised parameters do not belong to a supported leaf module"
    return None


@dataclass
class Record:
    """One leaf call of the gradient pass.

    Attributes:
        module: the leaf module.
        x: its (detached) input (dropped after the gradient pass when not needed).
        y: its (detached) output (likewise).
        view: whether ``x`` is a reshaped view of the previous leaf's output.
        versions: version counters of ``x`` and ``y`` when recorded.
        indices: max-pooling indices saved by autograd in the gradient pass, if any.
        x_shape: shape of ``x``.
        y_shape: shape of ``y``.
        relu_from_x: a ReLU whose derivative mask is taken from its input :math:`x > 0`.
        mask: a ReLU's derivative :math:`y > 0` as booleans (instead of keeping :math:`y`).
        shift: for the first optimised layer, whether the shifted pass uses
            :math:`y - \alpha u` (keeping :math:`y` and :math:`u`) instead of recomputing it.
        kind: ``"linear"``, ``"conv"`` or ``"bn"`` for a supported parametrised leaf, else
            ``None``.
    """

    module: nn.Module
    x: Tensor | None
    y: Tensor | None
    view: bool
    versions: tuple[int | None, int | None]
    indices: Tensor | None = None
    x_shape: tuple[int, ...] = ()
    y_shape: tuple[int, ...] = ()
    relu_from_x: bool = False
    shift: bool = False
    mask: Tensor | None = None
    kind: str | None = None


def _flatten_beyond_2d(x: Tensor) -> Tensor:
    """:class:`qlrlab.models.MLP`'s input handling before its ``nn.Sequential.forward``."""
    return x.flatten(1) if x.ndim > 2 else x


@functools.cache
def _chain_forwards() -> dict[Any, Any]:
    """``forward`` functions that are exactly "optional prologue, then the children in order"."""
    fwds: dict[Any, Any] = {nn.Sequential.forward: None}
    with contextlib.suppress(Exception):  # the models package is optional here
        from qlrlab.models.mlp import MLP

        fwds[MLP.forward] = _flatten_beyond_2d
    return fwds


def _direct_chain(model: nn.Module) -> tuple[list[nn.Module], Any] | None:
    """(children, input prologue) of a plain ``nn.Sequential`` (or a known subclass) of leaf
    modules that no hook or compiled call could tell apart from calling the children one after
    the other (``None`` otherwise)."""
    cls = type(model)
    if not isinstance(model, nn.Sequential) or cls.forward not in _chain_forwards():
        return None
    if not plain_module_call(model):
        return None
    if model._forward_hooks or not only_observer_hooks(model._forward_pre_hooks):
        return None  # (a copied model keeps a copy of an optimiser's observing hook)
    if model._backward_hooks:
        return None
    if model._backward_pre_hooks:
        return None
    if global_module_hooks():
        return None
    kids = list(model._modules.values())
    if not kids or any(k is None or not _is_leaf(k) for k in kids):
        return None
    return kids, _chain_forwards()[cls.forward]  # type: ignore[return-value]


class _ChainRunner:
    """Runs a plain ``nn.Sequential``'s children in order (exactly its ``forward``), recording
    each call as the forward hooks would, without installing any."""

    def __init__(self, rec: ChainRecorder, leaves: list[nn.Module], prologue: Any) -> None:
        self.rec = rec
        self.leaves = leaves
        self.prologue = prologue

    def __call__(self, *args: Any) -> Any:
        rec = self.rec
        if len(args) != 1:
            return rec.model(*args)  # whatever nn.Sequential does with that (an error)
        x = args[0] if self.prologue is None else self.prologue(args[0])
        for m in self.leaves:
            y = m(x)
            rec._leaf_hook(m, (x,), y)
            x = y
        rec._top_calls += 1
        return x


class ChainRecorder:
    """Forward hooks that record a chain of leaf calls during one gradient pass.

    For a plain ``nn.Sequential`` (or :class:`qlrlab.models.MLP`) of leaf modules without hooks,
    :attr:`module` is instead a runner
    that calls the children in order and records as it goes (same calls, no hook overhead); the
    gradient pass must call :attr:`module`.

    Args:
        model: the module that runs the gradient pass.
        params: the optimised parameters (to decide which activations to keep).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor] = ()) -> None:
        self.model = model
        #: what the gradient pass calls inside :meth:`recording`
        self.module: Any = model
        self._opt_ids = {id(p) for p in params}
        self._first_optimised: Record | None = None
        self.records: list[Record] = []
        self.failure: str | None = "the gradient pass did not run"
        self._last: Tensor | None = None
        self._top_calls = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[ChainRecorder]:
        """Install the hooks (or the runner, :attr:`module`) for the duration of the context."""
        handles = []
        direct = _direct_chain(self.model)
        self.failure = None
        try:
            if direct is not None:
                self.module = _ChainRunner(self, *direct)
            else:
                for m in self.model.modules():
                    if next(m.children(), None) is None:
                        handles.append(m.register_forward_hook(self._leaf_hook))
                handles.append(self.model.register_forward_hook(self._top_hook))
            yield self
        finally:
            for h in handles:
                h.remove()
            self.module = self.model
            self._last = None
            if not self.records and self.failure is None:
                self.failure = "no leaf module was called"
            if self._top_calls != 1 and self.failure is None:
                self.failure = f"the model was called {self._top_calls} times"
            if self.failure is not None:
                self.records = []
            else:
                self._check_versions()

    def _check_versions(self) -> None:
        for r in self.records:
            if (r.x is not None and written_since(r.x, r.versions[0])) or (
                r.y is not None and written_since(r.y, r.versions[1])
            ):
                self.failure = "a cached activation was modified in place"
                self.records = []
                return

    def _keep_x(self, r: Record, prev: Record | None) -> bool:
        """Whether the tangent pass reads this leaf's input (decided when it is recorded, so
        that activations autograd does not save are freed as in a plain forward)."""
        m = r.module
        kind = r.kind
        if kind == "bn":
            return True
        if kind is not None:
            # kept even when it is relu of the previous input: autograd saves it for the
            # backward pass anyway, and recomputing it would allocate as much at the tangent
            # pass's busiest point (one elementwise pass saved)
            return id(m.weight) in self._opt_ids
        if isinstance(m, nn.ReLU):
            # relu(x) > 0 iff x > 0: read the mask from x when the previous output is kept anyway,
            # else keep the mask as booleans (a quarter of the float output's memory)
            r.relu_from_x = prev is not None and prev.y is not None and self._needs_y(prev)
            if not r.relu_from_x:
                assert r.y is not None
                # relu(x) >= 0, so y != 0 iff y > 0 (a NaN output makes the loss NaN and the
                # step stops before the tangent pass); bool() is several times faster than > 0
                r.mask = r.y.bool()
            return r.relu_from_x
        if isinstance(m, (nn.Tanh, nn.Sigmoid, *_PASS_THROUGH)):
            return False
        if isinstance(m, _MaxPoolNd):
            return r.indices is None
        return True

    def _needs_y(self, r: Record) -> bool:
        """Whether this leaf's output is read later (the last leaf's always is)."""
        m = r.module
        if r is self._first_optimised and r.shift:
            return True
        if isinstance(m, (nn.Tanh, nn.Sigmoid)):
            return True
        return False

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why

    def _leaf_hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self.failure is not None:
            return
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
            self._fail(f"{type(module).__name__} is not a single-tensor layer")
            return
        x = args[0]
        view = False
        if self._last is None:
            if x.requires_grad:
                self._fail("the first layer's input depends on the parameters")
                return
        elif x is not self._last:
            prev = self._last
            same_storage = (
                x.numel() == prev.numel()
                and x.data_ptr() == prev.data_ptr()
                and x.is_contiguous()
                and prev.is_contiguous()
            )
            if not same_storage:
                self._fail(f"the input of {type(module).__name__} is not the previous output")
                return
            view = True
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            self._fail("dropout is active")
            return
        xd, yd = x.detach(), out.detach()
        idx = None
        if isinstance(module, _MaxPoolNd) and out.grad_fn is not None:
            # autograd keeps the argmax indices for the backward pass; reuse them for free
            idx = getattr(out.grad_fn, "_saved_result1", None)
            if not isinstance(idx, Tensor) or idx.shape != out.shape or idx.is_floating_point():
                idx = None
        kind = _kind(module)
        rec = Record(module, xd, yd, view, (version(xd), version(yd)), idx, xd.shape, yd.shape)
        rec.kind = kind
        if self._first_optimised is None and kind is not None:
            w, b = getattr(module, "weight", None), getattr(module, "bias", None)
            if id(w) in self._opt_ids or id(b) in self._opt_ids:
                self._first_optimised = rec
                # y - alpha*u saves this layer's product in the shifted pass but keeps y and u
                # alive; worth it unless the output is much larger than the input (a first
                # convolution with few input channels), where recomputing is cheap anyway
                rec.shift = id(w) not in self._opt_ids or yd.numel() <= 2 * xd.numel()
        prev = self.records[-1] if self.records else None
        if prev is not None and not self._needs_y(prev):
            prev.y = None
        if not self._keep_x(rec, prev):
            rec.x = None
        self.records.append(rec)
        self._last = out

    def _top_hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self._top_calls += 1
        if _is_leaf(module):
            return  # the model is a single leaf: its own leaf hook did the work
        if out is not self._last:
            self._fail("the model's output is not its last layer's output")

    def chain(self) -> list[Record] | None:
        """The validated records, or ``None`` (see :attr:`failure`).

        The versions are checked once more: nothing between the gradient pass and the
        curvature pass may modify a kept activation in place.
        """
        if self.failure is not None:
            return None
        for r in self.records:
            if (r.x is not None and written_since(r.x, r.versions[0])) or (
                r.y is not None and written_since(r.y, r.versions[1])
            ):
                self.failure = "a cached activation was modified in place"
                return None
        return self.records


def _bn_stats(m: _BatchNorm, x: Tensor) -> tuple[Tensor, Tensor, bool, list[int], list[int]]:
    """(mean, 1/std, batch-stats?, reduction dims, broadcast shape) as the forward used them."""
    dims = [0, *range(2, x.ndim)]
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    batch = m.training or m.running_mean is None
    if batch:
        var, mean = torch.var_mean(x, dims, unbiased=False, keepdim=True)
    else:
        assert m.running_var is not None
        mean = m.running_mean.view(shape)
        var = m.running_var.view(shape)
    return mean, torch.rsqrt(var + m.eps), batch, dims, shape


class ChainTangents:
    """Tangents and shifted outputs of a recorded chain (used by :class:`qlrlab.curvature.ggn.FastBoundGGN`).

    Args:
        chain: validated records of the gradient pass.
        params: the optimised parameters, in order.
    """

    def __init__(self, chain: list[Record], params: Sequence[Tensor]) -> None:
        self.chain = chain
        self._first_is_out = False
        # (vector, its first-layer tangent) of the last two tangent passes, newest first, for
        # the outputs at theta - alpha v (new_output) and theta + sum_i c_i v_i
        # (new_output_combination)
        self._recent: list[tuple[list[Tensor], tuple[int, Tensor] | None]] = []
        # the plan both passes follow: per leaf, (index, record, module, kind, position of its
        # weight's and bias's tangent in v or -1); built once per chain
        index = {id(p): i for i, p in enumerate(params)}
        plan: list[tuple[int, Record, Any, str, int, int]] = []
        for li, r in enumerate(chain):
            m = r.module
            if r.kind is None:
                plan.append((li, r, m, "free", -1, -1))
                continue
            w, b = m.weight, m.bias
            wi = -1 if w is None else index.get(id(w), -1)
            bi = -1 if b is None else index.get(id(b), -1)
            plan.append((li, r, m, r.kind, wi, bi))
        self._plan = plan
        # the first leaf whose weight or bias is optimised (-1: none)
        self._first_opt = next((i for i, p in enumerate(plan) if p[4] >= 0 or p[5] >= 0), -1)

    def first_tangents(self, vs: Sequence[Sequence[Tensor]]) -> list[Tensor] | None:
        """The first optimised layer's tangents of several vectors from **one** product with
        its input, :math:`x\\,[dW_1; dW_2; \\dots]^\\top`, split by columns (a hidden ``Linear``
        layer whose weight every vector moves; ``None`` otherwise). Pass each to
        :meth:`tangent` as ``first_u``."""
        if self._first_opt < 0 or len(vs) < 2:
            return None
        _, r, m, kind, wi, bi = self._plan[self._first_opt]
        x = r.x
        if kind != "linear" or wi < 0 or x is None or _class_major(m, x):
            return None
        out = m.out_features
        prod = F.linear(x, torch.cat([v[wi] for v in vs]))
        us = []
        for i, v in enumerate(vs):
            part = prod[..., i * out : (i + 1) * out]
            us.append(part + v[bi] if bi >= 0 else part.contiguous())
        return us

    def tangent(self, v: Sequence[Tensor], first_u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Outputs :math:`z` and :math:`u = Jv` from the cached activations (``first_u``: the
        first optimised layer's tangent of ``v``, already computed by :meth:`first_tangents`)."""
        u: Tensor | None = None
        owned = False  # whether u (and everything sharing its storage) is ours to overwrite
        first: tuple[int, Tensor] | None = None
        plan = self._plan
        done = -1  # a layer whose tangent was computed together with the one before it
        for li, r, m, kind, wi, bi in plan:
            if li == done:
                continue
            if u is not None and r.view:
                u = u.reshape(r.x_shape)
            if kind == "free":
                if u is None:
                    continue
                if type(m) is nn.ReLU and li + 1 < len(plan) and _fuses_with_head(u, plan[li + 1]):
                    _, rh, mh, _, wh, bh = plan[li + 1]
                    dwh = None if wh < 0 else v[wh]
                    dbh = None if bh < 0 else v[bh]
                    u = _masked_head_class_major(r, u, mh, rh.x, dwh, dbh)
                    owned, done = True, li + 1
                    continue
                u = _free_tangent(m, r, u, owned)
                owned = owned or not isinstance(m, _PASS_THROUGH)
                continue
            dw = None if wi < 0 else v[wi]
            db = None if bi < 0 else v[bi]
            if u is None and dw is None and db is None:
                continue
            fresh = u is None
            if fresh and first_u is not None:
                u = first_u
            else:
                u = self._param_tangent(kind, m, r, r.x, u, dw, db)
            owned = True
            if fresh and first is None:
                first = (li, u)
                if r.shift:
                    owned = False  # kept for new_output: must not be overwritten
        z = self.chain[-1].y
        assert z is not None
        if first is not None and not self.chain[first[0]].shift:
            first = (first[0], torch.empty(0))  # only the index is needed
        self._recent = [(list(v), first), *self._recent[:1]]
        # new_output may overwrite the first layer's tangent unless it is also the returned one
        self._first_is_out = (
            first is not None
            and u is not None
            and first[1].untyped_storage().data_ptr() == u.untyped_storage().data_ptr()
        )
        return z, (torch.zeros_like(z) if u is None else u)

    @staticmethod
    def _param_tangent(
        kind: str,
        m: Any,
        r: Record,
        x: Tensor | None,
        u: Tensor | None,
        dw: Tensor | None,
        db: Tensor | None,
    ) -> Tensor:
        if kind == "bn":
            assert x is not None
            mean, invstd, batch, dims, shape = _bn_stats(m, x)
            xhat = (x - mean) * invstd
            out: Tensor | None = None
            if u is not None:
                if batch:
                    ux = (u - u.mean(dims, keepdim=True)) - xhat * (xhat * u).mean(
                        dims, keepdim=True
                    )
                    ux = ux * invstd
                else:
                    ux = u * invstd
                out = ux * m.weight.view(shape) if m.weight is not None else ux
            if dw is not None:
                t = xhat * dw.view(shape)
                out = t if out is None else out + t
            if db is not None:
                t = db.view(shape)
                out = t.expand(r.y_shape).contiguous() if out is None else out + t
            assert out is not None
            return out
        if kind == "linear" and _class_major(m, x if u is None else u):
            return _class_major_tangent(m, x, u, dw, db)
        lin = F.linear if kind == "linear" else m._conv_forward
        out = None
        if u is not None:
            out = lin(u, m.weight, db)
            if dw is not None:
                assert x is not None
                out.add_(lin(x, dw, None))  # out is fresh: accumulate in place
        elif dw is not None:
            assert x is not None
            out = lin(x, dw, db)
        else:
            assert db is not None
            shape = [1, -1] + [1] * (len(r.y_shape) - 2) if kind == "conv" else [-1]
            out = db.view(shape).expand(r.y_shape).contiguous()
        return out

    def new_output(self, alpha: Tensor | float, v: Sequence[Tensor]) -> Tensor | None:
        """Outputs at :math:`\\theta - \\alpha v` (``None`` when ``v`` is not the last tangent's);
        once per tangent pass (the first layer's cached tangent may hold the new output)."""
        found, first = self._cached_first(v, latest=True)
        if not found:
            return None
        self._recent = []
        if first is None:
            return self.chain[-1].y
        r = self.chain[first[0]]
        xn: Tensor | None = None
        if r.shift:
            assert r.y is not None
            t = first[1]
            if self._first_is_out:
                xn = r.y - alpha * t
            elif isinstance(alpha, Tensor):  # nothing else holds t: y - alpha*t
                xn = torch.addcmul(r.y, t, -alpha, out=t)  # into its storage, one pass
            else:
                xn = torch.add(r.y, t, alpha=-alpha, out=t)
        return self._forward_from(first[0], xn, [(-alpha, v)])

    def new_output_combination(
        self, terms: Sequence[tuple[Tensor | float, Sequence[Tensor]]]
    ) -> Tensor | None:
        """Outputs at :math:`\\theta + \\sum_i c_i v_i` for ``terms`` ``[(c_i, v_i)]``, each
        :math:`v_i` the vector of one of the last two tangent passes (``None`` otherwise): the
        first optimised layer's output is :math:`y + \\sum_i c_i u_i` from its cached tangents
        (it is affine in its own parameters), only the layers after it are recomputed."""
        firsts: list[tuple[Tensor | float, tuple[int, Tensor]]] = []
        for c, v in terms:
            _, hit = self._cached_first(v)
            if hit is None:
                return None
            firsts.append((c, hit))
        if not firsts or len({f[0] for _, f in firsts}) != 1:
            return None
        start = firsts[0][1][0]
        r = self.chain[start]
        xn: Tensor | None = None
        if r.shift:
            assert r.y is not None
            xn = r.y
            for c, (_, t) in firsts:
                xn = xn + c * t
        return self._forward_from(start, xn, terms)

    def _cached_first(
        self, v: Sequence[Tensor], latest: bool = False
    ) -> tuple[bool, tuple[int, Tensor] | None]:
        """Whether ``v`` is the vector of one of the last two tangent passes (``latest``: of the
        last one), and then its first optimised layer's (index, tangent), ``None`` if it moves
        no layer."""
        for key, first in self._recent[:1] if latest else self._recent:
            if len(key) == len(v) and all(a is b for a, b in zip(key, v)):
                return True, first
        return False, None

    def _forward_from(
        self,
        start: int,
        out: Tensor | None,
        terms: Sequence[tuple[Tensor | float, Sequence[Tensor]]],
    ) -> Tensor:
        """The outputs at :math:`\\theta + \\sum_i c_i v_i`, recomputing the layers from
        ``start`` on (from ``start``'s cached input when its new output ``out`` is ``None``, else
        from the layer after it)."""
        xn = out
        for li, r, m, kind, wi, bi in self._plan:
            if li < start or (li == start and out is not None):
                continue
            if xn is None:
                xn = r.x
                assert xn is not None
            elif r.view:
                xn = xn.reshape(r.x_shape)
            if kind == "free":
                xn = _free_forward(m, xn)
                continue
            w, b = m.weight, m.bias
            for c, v in terms:
                if wi >= 0:
                    w = w + c * v[wi]
                if bi >= 0:
                    b = b + c * v[bi]
            xn = _layer_forward(m, kind, xn, w, b)
        return self.chain[-1].y if xn is None else xn


def _layer_forward(m: Any, kind: str, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """A parameterised leaf's forward with weight ``w`` and bias ``b`` (Linear, conv, BatchNorm
    as in the gradient pass)."""
    if kind == "linear":
        return _linear_class_major(x, w, b) if _class_major(m, x) else F.linear(x, w, b)
    if kind == "conv":
        return m._conv_forward(x, w, b)
    batch = m.training or m.running_mean is None
    return F.batch_norm(
        x,
        None if batch else m.running_mean,
        None if batch else m.running_var,
        w,
        b,
        batch,
        0.0,
        m.eps,
    )


def _class_major(m: Any, x: Tensor | None) -> bool:
    """Whether a Linear layer's products run class-major (few outputs, a 2-d batch)."""
    return (
        x is not None
        and x.ndim == 2
        and m.out_features <= CLASS_MAJOR_MAX_OUT
        and x.shape[0] > 4 * m.out_features
    )


def _product_class_major(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """:math:`W x^\top + b` as a contiguous ``(out, batch)`` tensor."""
    return torch.mm(w, x.t()) if b is None else torch.addmm(b.unsqueeze(1), w, x.t())


def _linear_class_major(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear(x, w, b)`` as the transposed view of :math:`W x^\top + b`."""
    return _product_class_major(x, w, b).t()


def _class_major_tangent(
    m: Any, x: Tensor | None, u: Tensor | None, dw: Tensor | None, db: Tensor | None
) -> Tensor:
    r""":math:`u W^\top + x\,dW^\top + db` computed as the transposed view of
    :math:`W u^\top + dW x^\top + db` (one output buffer, accumulated in place)."""
    out: Tensor | None = None
    if u is not None:
        out = _product_class_major(u, m.weight, db)
        db = None
    if dw is not None:
        assert x is not None
        out = _product_class_major(x, dw, db) if out is None else out.addmm_(dw, x.t())
    elif out is None:
        assert db is not None and x is not None
        out = db.unsqueeze(1).expand(db.shape[0], x.shape[0]).contiguous()
    return out.t()


def _block_rows(width: int) -> int:
    """Rows per block of :func:`_masked_head_class_major` for a hidden layer ``width`` wide."""
    return max(32, MASKED_HEAD_BLOCK // max(1, width))


def _fuses_with_head(u: Tensor, head: tuple[int, Record, Any, str, int, int]) -> bool:
    """Whether a ReLU tangent and the class-major Linear head after it run blocked (CPU, a
    row-major 2-d tangent long enough for several blocks, no reshape in between)."""
    _, rh, mh, kind, _, _ = head
    return (
        kind == "linear"
        and not rh.view
        and u.ndim == 2
        and u.device.type == "cpu"
        and u.is_contiguous()
        and _class_major(mh, u)
        and u.shape[0] >= 4 * _block_rows(u.shape[1])
    )


def _masked_head_class_major(
    r: Record, u: Tensor, m: Any, x: Tensor | None, dw: Tensor | None, db: Tensor | None
) -> Tensor:
    r"""The tangent through a ReLU and the class-major head after it, in blocks of rows:
    :math:`(W\,h^\top + dW\,x^\top + db)^\top` with :math:`h = u \odot 1[\text{pre} > 0]`.

    Each block of the masked tangent :math:`h` is written next to the same rows of the head's
    input :math:`x` in a small buffer and multiplied by :math:`[W \;\; dW]` at once, while it
    is still in cache, instead of writing all of :math:`h` to memory and reading it back (on a
    3200×256 hidden layer the one-pass mask costs 0.8–1.0 ms in the step against 0.11 ms in
    isolation). Same values as the unblocked path up to round-off.
    """
    n, hid = u.shape
    rows = _block_rows(hid)
    mask = None if r.mask is None else r.mask.view(torch.uint8)
    src = r.x if r.relu_from_x else r.y
    out = torch.empty((m.out_features, n), dtype=u.dtype, device=u.device)
    if dw is None:
        w = m.weight
        buf = torch.empty((rows, hid), dtype=u.dtype, device=u.device)
    else:
        assert x is not None
        w = torch.cat([m.weight, dw], 1)
        buf = torch.empty((rows, 2 * hid), dtype=u.dtype, device=u.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        b = buf[: e - s]
        h = b[:, :hid]
        if mask is not None:
            torch.mul(u[s:e], mask[s:e], out=h)
        else:
            assert src is not None
            torch.ops.aten.threshold_backward.grad_input(u[s:e], src[s:e], 0, grad_input=h)
        if dw is not None:
            assert x is not None
            b[:, hid:].copy_(x[s:e])
        out[:, s:e] = _product_class_major(b, w, db)
    return out.t()


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _free_forward(m: nn.Module, x: Tensor) -> Tensor:
    """A parameter-free leaf's forward on a tensor the shifted pass owns: ReLU in place, and
    non-overlapping 2-d max-pooling as strided maxima (the same values, several times faster than
    ``max_pool2d`` on CPU)."""
    if type(m) is nn.ReLU:
        return torch.relu_(x)
    if isinstance(m, nn.MaxPool2d) and x.ndim == 4 and not m.return_indices and not m.ceil_mode:
        k = _pair(m.kernel_size)
        st = _pair(m.stride if m.stride is not None else m.kernel_size)
        if k == st and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1):
            ho, wo = x.shape[2] // k[0], x.shape[3] // k[1]
            out: Tensor | None = None
            for i in range(k[0]):
                for j in range(k[1]):
                    s = x[:, :, i : i + k[0] * ho : k[0], j : j + k[1] * wo : k[1]]
                    out = s if out is None else torch.maximum(out, s)
            assert out is not None
            return out
    return m(x)


def _free_tangent(m: nn.Module, r: Record, u: Tensor, owned: bool) -> Tensor:
    """Tangent through a parameter-free leaf (``owned``: ``u`` may be overwritten)."""
    if isinstance(m, nn.ReLU):
        if r.mask is not None:
            # a uint8 view multiplies several times faster than the bool mask itself
            mask = r.mask.view(torch.uint8)
            return u.mul_(mask) if owned else u * mask
        src = r.x if r.relu_from_x else r.y
        assert src is not None
        # u where src > 0, else 0: one fused kernel (ReLU's own backward), no bool mask
        return torch.ops.aten.threshold_backward(u, src, 0)
    if isinstance(m, nn.Tanh):
        assert r.y is not None
        return u * (1 - r.y * r.y)
    if isinstance(m, nn.Sigmoid):
        assert r.y is not None
        return u * (r.y * (1 - r.y))
    if isinstance(m, _PASS_THROUGH):
        return u.reshape(r.y_shape)
    if isinstance(m, _MaxPoolNd) and not m.return_indices and len(r.y_shape) == len(r.x_shape) >= 3:
        idx = r.indices
        pool = _MAXPOOL.get(len(r.x_shape) - 2)
        if idx is None and pool is not None and r.x is not None:
            _, idx = pool(r.x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
        if idx is not None:
            return u.flatten(2).gather(2, idx.flatten(2)).view(r.y_shape)
    assert r.x is not None
    _, t = torch.func.jvp(m, (r.x,), (u,))
    return t
