"""Direction providers: turn the gradient into an update direction :math:`d`.

The step is :math:`\\theta \\leftarrow \\theta - \\alpha d`. Add a new provider by subclassing
:class:`qlrlab.interfaces.DirectionProvider` and registering a spec in
:data:`qlrlab.registry.DIRECTIONS`.
"""

from qlrlab.directions.adafisher import AdaFisherDirection, AdaFisherSpec
from qlrlab.directions.adam import AdamDirection, AdamSpec
from qlrlab.directions.diag_ggn import DiagGGNDirection, DiagGGNSpec
from qlrlab.directions.fadam import FAdamDirection, FAdamSpec
from qlrlab.directions.kfac import KFACDirection, KFACSpec
from qlrlab.directions.lbfgs import LBFGSDirection, LBFGSSpec
from qlrlab.directions.newton_cg import NewtonCGDirection, NewtonCGSpec
from qlrlab.directions.sgd import SGDDirection, SGDSpec
from qlrlab.directions.torch_optim import TorchOptimDirection, TorchOptimSpec

__all__ = [
    "AdaFisherDirection",
    "AdaFisherSpec",
    "AdamDirection",
    "AdamSpec",
    "DiagGGNDirection",
    "DiagGGNSpec",
    "FAdamDirection",
    "FAdamSpec",
    "KFACDirection",
    "KFACSpec",
    "LBFGSDirection",
    "LBFGSSpec",
    "NewtonCGDirection",
    "NewtonCGSpec",
    "SGDDirection",
    "SGDSpec",
    "TorchOptimDirection",
    "TorchOptimSpec",
]
