r"""Learning the batch of a step from the caller's own forward pass (``step(closure)`` and
``loss.backward(); opt.step()``).

Between two steps, forward pre-hooks on the model and on the loss module record the inputs the
model was called with and the targets the loss module was called with (and a forward hook the
loss value). Only calls made with gradients enabled count: evaluation under ``torch.no_grad()``
(as Lightning and Hugging Face run it) is ignored. Only the first call is kept (and the number
of calls), so an unused observer holds no more than one batch. Calls of the loss module before
the model's forward are not counted (a loss module shared with another model). The hooks are removed while a step runs, so the optimiser's own passes are never
recorded (and the fast path's hook-free runner still applies to ``step(batch)``). A step then
takes the one recorded batch: none, or several forwards of the model since the last step, is
an error that says what to do.

Inputs: ``model(x)`` is recorded as ``x``, ``model(a, b)`` as the tuple ``(a, b)`` (called as
``model(*inputs)``) and ``model(**kw)`` as the dict ``kw`` (called as ``model(**inputs)``);
mixing positional and keyword inputs is refused. Targets: the second positional argument of the
loss module (``loss_fn(outputs, targets)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BatchObserver",
    "ObservationError",
    "ObservedBatch",
    "SelectOutput",
    "call_model",
    "is_observer_hook",
    "optimizer_passes",
]

#: number of optimiser steps running their own passes (nested: one per step on the stack);
#: observers record nothing meanwhile, so one optimiser's passes never count as the user's
#: forward for another optimiser sharing the model or the loss module
_PASSES_RUNNING = [0]


@contextlib.contextmanager
def optimizer_passes() -> Iterator[None]:
    """Context of an optimiser's own passes: no observer records anything inside it."""
    _PASSES_RUNNING[0] += 1
    try:
        yield
    finally:
        _PASSES_RUNNING[0] -= 1


def is_observer_hook(hook: Any) -> bool:
    """Whether ``hook`` is one of the observation hooks (which change no computation)."""
    return isinstance(getattr(hook, "__self__", None), BatchObserver)


def _describe(out: Any) -> str:
    if isinstance(out, Mapping):
        return f"a dict ({type(out).__name__} with keys {list(out)[:6]})"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"a {type(out).__name__}"


def call_model(model: Any, inputs: Any) -> Tensor:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or list, else
    ``model(inputs)``; the output must be a tensor (the loss module's input).

    Raises:
        TypeError: the model returned something else, naming the fix (``output=``).
    """
    if isinstance(inputs, Mapping):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {_describe(out)}, not the tensor the loss takes; tell qlrlab "
            "which output feeds the loss: build_optimizer(spec, model, loss_fn, output='logits') "
            "(a key of a dict or ModelOutput), output=0 (an index of a tuple) or "
            "output=callable(outputs) -> tensor"
        )
    return out


class SelectOutput(nn.Module):
    """``model`` followed by the selection of the output that feeds the loss.

    Args:
        model: the user's model (a submodule: parameter names gain the prefix ``model.``).
        output: a key (``"logits"``: dicts and Hugging Face ``ModelOutput``), an index (tuples)
            or a callable ``outputs -> tensor``.
    """

    def __init__(self, model: nn.Module, output: Any) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The selected output of ``model(*args, **kwargs)``."""
        out = self.model(*args, **kwargs)
        sel = self.output
        if callable(sel):
            return sel(out)
        try:
            return out[sel]
        except (KeyError, IndexError, TypeError) as exc:
            raise TypeError(
                f"output={sel!r}: cannot select it from {_describe(out)} ({exc!r})"
            ) from None


class ObservationError(RuntimeError):
    """No batch, or an ambiguous one, was observed for ``step()`` / ``step(closure)``."""


@dataclass
class ObservedBatch:
    """What one forward of the model and one call of the loss module showed.

    Attributes:
        inputs: the model's inputs (a tensor, a tuple for several positional arguments, or a
            dict of keyword arguments).
        targets: the loss module's second argument.
        loss: the loss value it returned (detached), or ``None`` if it was not called.
    """

    inputs: Any
    targets: Any
    loss: Tensor | None


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, Mapping):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x


class _ObserverHook:
    """The model's forward pre-hook: calls its observer.

    A class of its own so that the fast path can tell qlrlab's observing hooks from a user's: an
    optimiser removes its own while it runs its passes, and a *copied* one (``copy.deepcopy`` or
    pickling of an observed model copies its hooks, and with them a copy of the observer) never
    records inside an optimiser's passes either, so neither changes what a forward computes.
    """

    def __init__(self, observer: BatchObserver) -> None:
        self.observer = observer

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.observer._on_model(module, args, kwargs)


#: set while the optimiser runs a caller's closure: the model is called by the caller's code,
#: so the fast path's recorder must watch it through hooks, not run it itself
_CALLER_FORWARD = [False]


@contextlib.contextmanager
def caller_forward() -> Iterator[None]:
    """Mark the span in which the caller's code (a closure) runs the model's forward."""
    old = _CALLER_FORWARD[0]
    _CALLER_FORWARD[0] = True
    try:
        yield
    finally:
        _CALLER_FORWARD[0] = old


def only_observer_hooks(hooks: Mapping[Any, Any]) -> bool:
    """Whether a module's forward pre-hooks can be left out of a forward the optimiser runs
    itself: none, or only qlrlab observing hooks (they record nothing inside an optimiser's
    passes) while no caller's forward is being observed (:func:`caller_forward`)."""
    if not hooks:
        return True
    return not _CALLER_FORWARD[0] and all(isinstance(h, _ObserverHook) for h in hooks.values())


class BatchObserver:
    """Records the model's inputs and the loss module's targets between steps.

    Args:
        model: the user's model.
        loss_fn: the loss module.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self._handles: list[Any] = []
        # the loss module's hooks stay: they record nothing inside an optimiser's passes and
        # qlrlab's own loss evaluation (losses.loss_value) ignores them
        self._loss_handles = [
            loss_fn.register_forward_pre_hook(self._on_loss),
            loss_fn.register_forward_hook(self._on_loss_value),
        ]
        self.clear()

    def clear(self) -> None:
        """Forget what was recorded."""
        self.model_calls = 0
        self.loss_calls = 0
        self.model_args: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.loss_args: tuple[Any, ...] | None = None
        self.loss_value: Tensor | None = None

    # -- hooks --------------------------------------------------------------------------------
    def attach(self) -> None:
        """Install the model's hook (idempotent)."""
        if self._handles:
            return
        hook = _ObserverHook(self)
        self._handles = [self.model.register_forward_pre_hook(hook, with_kwargs=True)]

    def detach(self) -> None:
        """Remove the model's hook (a model without hooks keeps the fast path's hook-free
        runner for ``step(batch)``)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_model(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and not _PASSES_RUNNING[0]:
            self.model_calls += 1
            if self.model_args is None:
                self.model_args = (_detach(args), _detach(kwargs))

    def _on_loss(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # a loss call before any forward of the model belongs to someone else (a loss module
        # shared with another model or optimiser)
        if self.model_calls and torch.is_grad_enabled() and not _PASSES_RUNNING[0]:
            self.loss_calls += 1
            if self.loss_args is None:
                self.loss_args = _detach(args)

    def _on_loss_value(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if (
            self.model_calls
            and torch.is_grad_enabled()
            and not _PASSES_RUNNING[0]
            and self.loss_value is None
            and isinstance(out, Tensor)
        ):
            self.loss_value = out.detach()

    # -- the batch ----------------------------------------------------------------------------
    def take(self, convention: str) -> ObservedBatch:
        """The one batch recorded since the last step (then forgotten).

        Args:
            convention: how the step was called, for the messages.

        Raises:
            ObservationError: no forward of the model (or no loss call) was recorded, or
                several were.
        """
        calls, losses = self.model_calls, self.loss_calls
        model_args, loss_args, value = self.model_args, self.loss_args, self.loss_value
        self.clear()
        how = (
            "call opt.step((inputs, targets)), or run loss_fn(model(inputs), targets) "
            "with the model and loss module given to the optimizer"
        )
        if not calls:
            raise ObservationError(
                f"{convention}: no batch was observed: the model given to the optimizer was not "
                f"called since the last step; {how} before {convention}"
            )
        if calls > 1 or losses > 1:
            raise ObservationError(
                f"{convention}: the model was called {calls} times (the loss module "
                f"{losses} times) since the last step, so the batch is ambiguous; run "
                "exactly one forward pass per step (for gradient accumulation use "
                "step((inputs, targets)) with gradient: {micro_batches: k} in the spec; run "
                "evaluation under torch.no_grad() after the step, or before zero_grad())"
            )
        if not losses or loss_args is None or model_args is None:
            raise ObservationError(
                f"{convention}: the model was called but the loss module given to the optimizer "
                "was not; compute the loss with that module instance, loss_fn(outputs, targets) "
                "(for models returning a dict or ModelOutput, pass output= to build_optimizer)"
            )
        args, kwargs = model_args
        if args and kwargs:
            raise ObservationError(
                f"{convention}: the model was called with positional and keyword inputs; "
                "call it with either model(*inputs) or model(**inputs)"
            )
        if kwargs:
            inputs: Any = dict(kwargs)
        elif len(args) == 1:
            inputs = args[0]
        else:
            inputs = tuple(args)
        if len(loss_args) < 2:
            raise ObservationError(
                f"{convention}: the loss module was called with {len(loss_args)} argument(s); "
                "qlrlab needs loss_fn(outputs, targets)"
            )
        return ObservedBatch(
            inputs=inputs, targets=loss_args[1], loss=value
        )

