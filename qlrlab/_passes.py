"""Side-effect-free extra forward passes (JVP, Hessian, :math:`f(\\theta_{new})`).

Extra passes run in the model's *current* mode: a training-mode model uses batch statistics in
them exactly as in the gradient pass (switching to ``eval()`` would silently change
:math:`d^\\top G d` and :math:`\\rho`). They must not change BatchNorm running statistics or any
other buffer. :func:`side_effect_free` guarantees both: train-mode BatchNorm layers temporarily
stop tracking running statistics (so they normalise with batch statistics and write nothing),
and every other buffer written in place is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from qlrlab._compat import version, written_since

__all__ = ["functional_forward", "side_effect_free"]


@contextlib.contextmanager
def side_effect_free(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which forward passes of ``model`` leave all its buffers untouched."""
    if next(model.buffers(), None) is None:  # nothing to protect (BatchNorm without running
        yield model  # statistics has no buffers and writes nothing)
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
        yield model
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
    """``model(inputs)`` with the named parameters replaced by ``params`` (``torch.func`` style)."""
    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return torch.func.functional_call(model, dict(zip(names, params)), tuple(args))
