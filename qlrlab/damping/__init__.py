"""Damping schedules: hold :math:`\\lambda` and adapt it from the reduction ratio :math:`\\rho`.

.. math:: \\rho = \\frac{f(\\theta_{new}) - f(\\theta)}{\\Delta M}

where :math:`\\Delta M` is the change predicted by the (damped or undamped) quadratic model, on
the same mini-batch. The optimiser evaluates :math:`f(\\theta_{new})` only when a schedule asks.
"""

from qlrlab.damping.accept_reject import AcceptReject, AcceptRejectSpec
from qlrlab.damping.bounds import check_damping_bounds, clip_damping
from qlrlab.damping.constant import ConstantDamping, ConstantSpec
from qlrlab.damping.kfac import KFACDamping, KFACDampingSpec
from qlrlab.damping.levenberg_marquardt import LevenbergMarquardt, LevenbergMarquardtSpec

__all__ = [
    "AcceptReject",
    "AcceptRejectSpec",
    "ConstantDamping",
    "ConstantSpec",
    "KFACDamping",
    "KFACDampingSpec",
    "LevenbergMarquardt",
    "LevenbergMarquardtSpec",
    "check_damping_bounds",
    "clip_damping",
]
