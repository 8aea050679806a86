"""Named optimiser specs for the paper's methods and baselines.

Each preset is a function returning an :class:`~qlrlab.OptimizerSpec`; :data:`PRESETS` maps names
to them (``qlrlab presets`` lists them) and :func:`get_preset` applies keyword overrides. The
untuned values follow Clarke & Hernández-Lobato (2024) and the authors' published code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qlrlab.specs import OptimizerSpec

__all__ = [
    "PRESETS",
    "adafisher",
    "adafisher_qlr",
    "adam",
    "adam_tuned_eps",
    "adam_untuned",
    "adamqlr",
    "adamqlr_hessian",
    "adamqlr_undamped",
    "adamqlr_v1",
    "baydin_sgd",
    "fadam",
    "fadam_qlr",
    "get_preset",
    "hessian_free",
    "kfac",
    "kfac_unadaptive",
    "kfac_untuned",
    "lbfgs",
    "lbfgs_qlr",
    "preset",
    "sgd",
    "sgd_full",
    "sgd_minimal",
    "sgdqlr",
]

PRESETS: dict[str, Callable[..., OptimizerSpec]] = {}
"""Preset name → function returning its :class:`~qlrlab.OptimizerSpec` (see :func:`preset`)."""


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


# -- K-FAC and the rest of the paper's baselines (Clarke & Hernández-Lobato, 2024, §4) ----------


@preset
def kfac(
    initial_damping: float = 1.0,
    curvature_ema: float = 0.95,
    inverse_period: int = 1,
    damping_interval: int = 1,
    damping_decay: float = 0.9,
    fisher: str = "mc",
    damping_mode: str = "factored_pi",
    fallback: str = "adam",
    backend: str = "auto",
    bias: str = "joint",
    kfac_approx: str = "expand",
) -> OptimizerSpec:
    """K-FAC as the paper ran kfac-jax 0.0.3: Kronecker factors from one Monte-Carlo sample
    (hook back-end, own generator), kfac-jax's joint ``[W b]`` bias block, curvature EMA 0.95,
    inverses and damping adapted every step, factored Tikhonov damping with the π correction,
    learning rate and momentum from the 2×2 exact (GGN) quadratic model, damping λ0 = 1
    adapted by ×0.9 / ÷0.9 with ρ from the undamped model. Parameters of other layers
    (Embedding, LayerNorm, tied weights) get Adam's diagonal (``fallback: adam``)."""
    return OptimizerSpec.model_validate(
        {
            "direction": {
                "name": "kfac",
                "backend": backend,
                "bias": bias,
                "kfac_approx": kfac_approx,
                "fisher": fisher,
                "curvature_ema": curvature_ema,
                "inverse_period": inverse_period,
                "damping_mode": damping_mode,
                "fallback": fallback,
            },
            "curvature": {"name": "ggn"},
            "step_size": {"name": "kfac_adaptive", "momentum": True},
            "damping": {
                "name": "kfac",
                "initial": initial_damping,
                "decay": damping_decay,
                "interval": damping_interval,
            },
        }
    )


@preset
def kfac_untuned() -> OptimizerSpec:
    """K-FAC (Untuned): :func:`kfac` with λ0 = 1 (the paper also uses batch size 3200, which is
    the training loop's business)."""
    return kfac(initial_damping=1.0)


@preset
def kfac_unadaptive(
    lr: float = 1e-3, momentum: float = 0.9, damping: float = 1.0, curvature_ema: float = 0.95
) -> OptimizerSpec:
    """K-FAC (Unadaptive): the K-FAC direction with fixed learning rate, fixed momentum on the
    update (:math:`\\delta_t = -\\alpha d_t + \\mu\\delta_{t-1}`) and fixed damping (kfac-jax
    with every ``use_adaptive_*`` off; file defaults lr 1e-3, μ 0.9, λ 1)."""
    return OptimizerSpec.model_validate(
        {
            "direction": {
                "name": "kfac",
                "curvature_ema": curvature_ema,
                "bias": "joint",
                "fallback": "adam",
            },
            "step_size": {"name": "momentum", "lr": lr, "momentum": momentum},
            "damping": {"name": "constant", "value": damping},
        }
    )


@preset
def sgd_minimal(lr: float = 1e-2) -> OptimizerSpec:
    """SGD Minimal (GD Minimal on Rosenbrock): plain SGD with a fixed learning rate."""
    return sgd(lr=lr, momentum=0.0)


@preset
def sgd_full(lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 1e-4) -> OptimizerSpec:
    """SGD Full: heavy-ball momentum (not Nesterov) with L2 weight decay added to the gradient
    before the momentum (optax ``add_decayed_weights`` chained before ``trace``)."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "sgd", "momentum": momentum, "weight_decay": weight_decay},
            "step_size": {"name": "fixed", "lr": lr},
        }
    )


@preset
def baydin_sgd(lr: float = 1e-2, beta: float = 1e-4) -> OptimizerSpec:
    """Baydin SGD: hypergradient SGD, :math:`\\alpha_t = \\alpha_{t-1} + \\beta g_t^\\top
    g_{t-1}` (:math:`g_0 = 0`), then :math:`\\theta \\leftarrow \\theta - \\alpha_t g_t`."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "sgd"},
            "step_size": {"name": "hypergradient", "lr": lr, "beta": beta},
        }
    )


@preset
def adam_untuned() -> OptimizerSpec:
    """Adam (Untuned): lr 1e-3, β = (0.9, 0.999), ε = 1e-8."""
    return adam(lr=1e-3, eps=1e-8)


@preset
def adam_tuned_eps(lr: float = 1e-3, eps: float = 1e-8) -> OptimizerSpec:
    """Adam (Tuned ε): Adam whose ε is tuned with the learning rate (tests ε as damping)."""
    return adam(lr=lr, eps=eps)


@preset
def adamqlr_v1(
    initial_damping: float = 1e-3, decrease: float = 0.5, increase: float = 2.0, clip: float = 0.1
) -> OptimizerSpec:
    """AdamQLR (Untuned) of the v1 paper: as :func:`adamqlr` with the learning rate clipped to
    :math:`|\\alpha| \\le 0.1`."""
    return adamqlr(initial_damping, decrease, increase, clip=clip)


@preset
def sgdqlr(
    initial_damping: float = 1e-3,
    decrease: float = 0.5,
    increase: float = 2.0,
    damping: str = "levenberg_marquardt",
) -> OptimizerSpec:
    """SGDQLR (in the original code, not a paper result): the AdamQLR machinery with
    :math:`d = g`; ``damping="accept_reject"`` gives the legacy ``decreasing_loss`` variant."""
    damp = (
        _lm(initial_damping, decrease, increase)
        if damping == "levenberg_marquardt"
        else {
            "name": "accept_reject",
            "initial": initial_damping,
            "decrease": decrease,
            "increase": increase,
        }
    )
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "sgd"},
            "curvature": {"name": "ggn"},
            "step_size": {"name": "quadratic"},
            "damping": damp,
        }
    )


@preset
def hessian_free(
    initial_damping: float = 1.0, max_iter: int = 50, curvature: str = "ggn"
) -> OptimizerSpec:
    """Hessian-free optimisation (Martens, 2010; not in the paper's table): CG on the damped GGN,
    warm-started, unit step, Levenberg–Marquardt damping ×2/3 or ×3/2."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "newton_cg", "max_iter": max_iter},
            "curvature": {"name": curvature},
            "step_size": {"name": "fixed", "lr": 1.0},
            "damping": _lm(initial_damping, 2.0 / 3.0, 1.5),
        }
    )


# -- the other curvature-based directions, alone and under the QLR heuristics (issue 18) --------


def _qlr(
    direction: dict[str, Any], initial_damping: float, decrease: float, increase: float
) -> OptimizerSpec:
    """``direction`` with AdamQLR's heuristics: GGN quadratic-model α, Levenberg–Marquardt λ."""
    return OptimizerSpec.model_validate(
        {
            "direction": direction,
            "curvature": {"name": "ggn"},
            "step_size": {"name": "quadratic"},
            "damping": _lm(initial_damping, decrease, increase),
        }
    )


@preset
def lbfgs(history: int = 10, pairs: str = "same_batch") -> OptimizerSpec:
    """L-BFGS (Liu & Nocedal, 1989) with its own step rule, a line search capped at the unit
    step: Armijo backtracking on the mini-batch (first trial 1, then min(1, 2α_{t-1}); ×½,
    c = 10⁻⁴), memory ``history``."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "lbfgs", "history": history, "pairs": pairs},
            "step_size": {"name": "backtracking", "initial": 1.0, "max_lr": 1.0, "grow": 2.0},
        }
    )


@preset
def lbfgs_qlr(
    history: int = 10,
    pairs: str = "same_batch",
    initial_damping: float = 1e-3,
    decrease: float = 0.5,
    increase: float = 2.0,
) -> OptimizerSpec:
    """The L-BFGS direction under AdamQLR's heuristics (GGN quadratic-model α, Levenberg–Marquardt
    λ0 = 10⁻³, ×½ / ×2)."""
    return _qlr(
        {"name": "lbfgs", "history": history, "pairs": pairs}, initial_damping, decrease, increase
    )


@preset
def fadam(lr: float = 1e-3, weight_decay: float = 0.0) -> OptimizerSpec:
    """FAdam (Hwang, 2024) with its own step rule, a fixed learning rate η (β = 0.9 / 0.999,
    ε = 10⁻⁸, c = 1, p = ½)."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "fadam", "weight_decay": weight_decay},
            "step_size": {"name": "fixed", "lr": lr},
        }
    )


@preset
def fadam_qlr(
    initial_damping: float = 1e-3, decrease: float = 0.5, increase: float = 2.0
) -> OptimizerSpec:
    """The FAdam direction under AdamQLR's heuristics."""
    return _qlr({"name": "fadam"}, initial_damping, decrease, increase)


@preset
def adafisher(lr: float = 1e-3, damping: float = 1e-3, gamma: float = 0.8) -> OptimizerSpec:
    """AdaFisher (Gomes et al., 2024) with its own step rule, a fixed learning rate η (β = 0.9,
    EMA γ = 0.8, Tikhonov λ = 10⁻³ inside the direction)."""
    return OptimizerSpec.model_validate(
        {
            "direction": {"name": "adafisher", "damping": damping, "gamma": gamma},
            "step_size": {"name": "fixed", "lr": lr},
        }
    )


@preset
def adafisher_qlr(
    initial_damping: float = 1e-3, decrease: float = 0.5, increase: float = 2.0
) -> OptimizerSpec:
    """The AdaFisher direction (its own Tikhonov λ = 10⁻³ kept) under AdamQLR's heuristics."""
    return _qlr({"name": "adafisher"}, initial_damping, decrease, increase)
