"""Named optimiser specs for the paper's methods and baselines.

Each preset is a function returning an :class:`~qlrlab.OptimizerSpec`; :data:`PRESETS` maps names
to them (``qlrlab presets`` lists them) and :func:`get_preset` applies keyword overrides. The
untuned values follow Clarke & Hernández-Lobato (2024), §1.5 and §5.3 of
``notes/adamqlr-paper-and-code.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qlrlab.specs import OptimizerSpec

__all__ = [
    "PRESETS",
    "adam",
    "adamqlr",
    "adamqlr_hessian",
    "adamqlr_undamped",
    "get_preset",
    "preset",
    "sgd",
]

PRESETS: dict[str, Callable[..., OptimizerSpec]] = {}


def preset(fn: Callable[..., OptimizerSpec]) -> Callable[..., OptimizerSpec]:
    """Register ``fn`` in :data:`PRESETS` under its function name."""
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str, **kwargs: Any) -> OptimizerSpec:
    """Call the preset ``name`` with ``kwargs``.

    Raises:
        KeyError: listing the available presets.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**kwargs)


def _lm(initial: float, decrease: float, increase: float, **kw: Any) -> dict[str, Any]:
    return {
        "name": "levenberg_marquardt",
        "initial": initial,
        "decrease": decrease,
        "increase": increase,
        **kw,
    }


@preset
def adamqlr(
    initial_damping: float = 1e-3,
    decrease: float = 0.5,
    increase: float = 2.0,
    clip: float | None = None,
    curvature: str = "ggn",
) -> OptimizerSpec:
    """AdamQLR, the paper's untuned v3 setting: Adam direction, GGN curvature, quadratic-model
    learning rate without clipping, Levenberg–Marquardt damping λ0 = 1e-3, ω = 0.5 / 2, ρ from
    the damped model, NaN ρ keeps λ."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "adam", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
            "curvature": {"name": curvature},
            "step_size": {"name": "quadratic", "clip": clip},
            "damping": _lm(initial_damping, decrease, increase),
        }
    )


@preset
def adamqlr_undamped() -> OptimizerSpec:
    """AdamQLR (Undamped): λ ≡ 0, no ρ update — learning-rate selection only."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "adam"},
            "curvature": {"name": "ggn"},
            "step_size": {"name": "quadratic"},
            "damping": {"name": "constant", "value": 0.0},
        }
    )


@preset
def adamqlr_hessian(
    initial_damping: float = 1e-3, decrease: float = 0.5, increase: float = 2.0
) -> OptimizerSpec:
    """AdamQLR (Hessian): the curvature ablation, exact Hessian in the quadratic model."""
    return adamqlr(initial_damping, decrease, increase, curvature="hessian")


@preset
def adam(lr: float = 1e-3, eps: float = 1e-8) -> OptimizerSpec:
    """Adam with a fixed learning rate (== ``torch.optim.Adam``)."""
    return OptimizerSpec.model_validate(
        {"direction": {"name": "adam", "eps": eps}, "step_size": {"name": "fixed", "lr": lr}}
    )


@preset
def sgd(lr: float = 1e-2, momentum: float = 0.0) -> OptimizerSpec:
    """SGD ("SGD Minimal" with ``momentum=0``) with a fixed learning rate."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "sgd", "momentum": momentum},
            "step_size": {"name": "fixed", "lr": lr},
        }
    )
