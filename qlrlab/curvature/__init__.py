"""Curvature oracles: :math:`d^\\top C d` and :math:`Cv` for the current mini-batch.

:math:`C` is the curvature of the *mean* mini-batch loss as the loss module computes it (see
:mod:`qlrlab.losses` for the scaling conventions). Every oracle has a ``backend``: the library's
own implementation (``"own"``; for the GGN ``"auto"``, formerly ``"own"``: the fast path when the
model allows it, else forward-mode JVPs with closed-form output Hessians; double backward for the
Hessian) or ``"curvlinops"`` (the reference implementation, rebuilt every step). Both agree to
round-off (``tests/test_curvature.py``).
"""

from qlrlab.curvature.empirical_fisher import EmpiricalFisherOracle, EmpiricalFisherSpec
from qlrlab.curvature.fisher_mc import FisherMCOracle, FisherMCSpec
from qlrlab.curvature.ggn import BoundGGN, GGNOracle, GGNSpec
from qlrlab.curvature.hessian import BoundHessian, HessianOracle, HessianSpec
from qlrlab.curvature.kfac import BoundKFAC, KFACOracle, KFACOracleSpec

__all__ = [
    "BoundGGN",
    "BoundHessian",
    "BoundKFAC",
    "EmpiricalFisherOracle",
    "EmpiricalFisherSpec",
    "FisherMCOracle",
    "FisherMCSpec",
    "GGNOracle",
    "GGNSpec",
    "HessianOracle",
    "HessianSpec",
    "KFACOracle",
    "KFACOracleSpec",
]
