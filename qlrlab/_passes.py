"""Side-effect-free extra forward passes (JVP, Hessian, :math:`f(\\theta_{new})`).

Extra passes run in the model's *current* mode: a training-mode model uses batch statistics in
them exactly as in the gradient pass (switching to ``eval()`` would silently change
:math:`d^\\top G d` and :math:`\\rho`). They must not change BatchNorm running statistics or any
other buffer. :func:`side_effect_free` guarantees both: train-mode BatchNorm layers temporarily
stop tracking running statistics (so they normalise with batch statistics and write nothing),
and every other buffer written in place is restored afterwards.

Attention: forward-mode AD (``torch.func.jvp``: GGN, Fisher) and double backward (Hessian) are
not implemented for the fused ``F.scaled_dot_product_attention`` kernels (flash, memory-efficient,
cuDNN) nor for ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer``'s native inference
fast path. :func:`side_effect_free` therefore also selects the math kernel and turns the native
fast path off, for qlrlab's extra passes only: the user's own forward passes (the gradient pass
included) keep their settings, which are restored on exit. The math kernel computes the same
function (to round-off), so the curvature is that of the model as the user runs it.

Mixed precision: curvature passes run with autocast *off* (:func:`autocast_off`), so that
:math:`d^\top C d` and :math:`Cv` are computed in the parameters' dtype (float32 for the usual
AMP set-up) even when ``opt.step`` is called inside ``torch.autocast``. Passes that only
evaluate the loss (:math:`f(\theta_{new})` for :math:`\rho`, line searches) keep the caller's
autocast (``side_effect_free(model, keep_autocast=True)``), so that they are computed as the
gradient pass computed :math:`f(\theta)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from qlrlab._compat import version, written_since

__all__ = [
    "autocast_off",
    "differentiable_attention",
    "drop_stale_autocast_casts",
    "functional_forward",
    "side_effect_free",
]

_AUTOCAST_DEVICES = ("cpu", "cuda")


_NO_OP = contextlib.nullcontext()


def autocast_off() -> contextlib.AbstractContextManager[None]:
    """Context with ``torch.autocast`` disabled on every device type where it is enabled (a
    shared no-op context when none is, the usual case: one C call)."""
    if not torch._C._is_any_autocast_enabled():
        return _NO_OP
    return _autocast_off([t for t in _AUTOCAST_DEVICES if torch.is_autocast_enabled(t)])


def drop_stale_autocast_casts() -> None:
    """Forget autocast's low-precision copies of the parameters after they changed in place.

    ``torch.autocast`` caches the cast of every leaf tensor that requires grad for the whole
    outermost autocast region; a step called inside the user's region updates the parameters in
    place, and a forward later in that region (the loss at the new parameters, or the user's own
    next forward) would still multiply by the old weights. No-op outside autocast.
    """
    if torch._C._is_any_autocast_enabled():
        torch.clear_autocast_cache()


@contextlib.contextmanager
def _autocast_off(devices: list[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for t in devices:
            stack.enter_context(torch.autocast(t, enabled=False))
        yield

_SDP_FLAGS = (
    (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
)


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Context selecting the math ``scaled_dot_product_attention`` kernel and disabling the
    native multi-head-attention fast path (both support forward AD and double backward); the
    previous settings are restored on exit. Costs about 2 µs (``sdpa_kernel`` costs 27 µs)."""
    saved = [get() for get, _ in _SDP_FLAGS]
    mha = torch.backends.mha.get_fastpath_enabled()
    for _, enable in _SDP_FLAGS:
        enable(False)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        for (_, enable), was in zip(_SDP_FLAGS, saved):
            enable(was)
        torch.backends.mha.set_fastpath_enabled(mha)


@contextlib.contextmanager
def side_effect_free(model: nn.Module, *, keep_autocast: bool = False) -> Iterator[nn.Module]:
    """Context in which forward passes of ``model`` leave all its buffers untouched, attention
    runs on differentiable kernels (see :func:`differentiable_attention`) and autocast is off
    (unless ``keep_autocast``: loss-only passes)."""
    with differentiable_attention(), _buffers_untouched(model):
        if keep_autocast:
            yield model
        else:
            with autocast_off():
                yield model


@contextlib.contextmanager
def _buffers_untouched(model: nn.Module) -> Iterator[None]:
    if next(model.buffers(), None) is None:  # nothing to protect (BatchNorm without running
        yield  # statistics has no buffers and writes nothing)
        return
    bn_changed: list[nn.modules.batchnorm._NormBase] = []
    bn_buffers: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            bn_changed.append(m)
            for b in m.buffers(recurse=False):
                bn_buffers.add(id(b))
            m.track_running_stats = False
    saved: list[tuple[Tensor, int | None, Tensor]] = [
        (b, version(b), b.detach().clone()) for b in model.buffers() if id(b) not in bn_buffers
    ]
    try:
        yield
    finally:
        for m in bn_changed:
            m.track_running_stats = True
        with torch.no_grad():
            for b, recorded, copy in saved:
                if written_since(b, recorded):  # written in place: restore (untouched ones stay as
                    b.copy_(copy)  # they are, so autograd graphs that saved them stay valid)


def functional_forward(
    model: nn.Module, names: list[str], params: list[Tensor] | tuple[Tensor, ...], inputs: object
) -> Tensor:
    """``model(inputs)`` with the named parameters replaced by ``params`` (``torch.func`` style);
    a dict of inputs is passed as keyword arguments, a tuple or list as positional ones."""
    if isinstance(inputs, Mapping):
        return torch.func.functional_call(model, dict(zip(names, params)), (), dict(inputs))
    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return torch.func.functional_call(model, dict(zip(names, params)), tuple(args))
