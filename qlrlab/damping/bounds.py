r"""The floor and ceiling of a damping :math:`\lambda`, shared by every schedule that has them.

A schedule keeps :math:`\lambda \in [\lambda_{min}, \lambda_{max}]` (``min_damping``,
``max_damping``; no ceiling when ``max_damping`` is ``None``): its spec checks the bounds with
:func:`check_damping_bounds`, and every new value goes through :func:`clip_damping`.
"""

from __future__ import annotations

__all__ = ["check_damping_bounds", "clip_damping"]


def check_damping_bounds(min_damping: float, max_damping: float | None) -> None:
    """Raise ``ValueError`` (naming both fields and the fix) when the ceiling is below the floor."""
    if max_damping is not None and max_damping < min_damping:
        raise ValueError(
            f"max_damping ({max_damping}) must be at least min_damping "
            f"({min_damping}); raise max_damping or set it to null"
        )


def clip_damping(lam: float, min_damping: float, max_damping: float | None) -> float:
    r""":math:`\min(\max(\lambda, \lambda_{min}), \lambda_{max})` (no ceiling for ``None``)."""
    lam = max(lam, min_damping)
    if max_damping is not None:
        lam = min(lam, max_damping)
    return lam
