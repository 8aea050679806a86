"""Direction providers: turn the gradient into an update direction :math:`d`.

The step is :math:`\\theta \\leftarrow \\theta - \\alpha d`. Add a new provider by subclassing
:class:`qlrlab.interfaces.DirectionProvider` and registering a spec in
:data:`qlrlab.registry.DIRECTIONS`.
"""

from qlrlab.directions.adam import AdamDirection, AdamSpec
from qlrlab.directions.diag_ggn import DiagGGNDirection, DiagGGNSpec
from qlrlab.directions.kfac import KFACDirection, KFACSpec
from qlrlab.directions.newton_cg import NewtonCGDirection, NewtonCGSpec
from qlrlab.directions.sgd import SGDDirection, SGDSpec
from qlrlab.directions.torch_optim import TorchOptimDirection, TorchOptimSpec

__all__ = [
    "AdamDirection",
    "AdamSpec",
    "DiagGGNDirection",
    "DiagGGNSpec",
    "KFACDirection",
    "KFACSpec",
    "NewtonCGDirection",
    "NewtonCGSpec",
    "SGDDirection",
    "SGDSpec",
    "TorchOptimDirection",
    "TorchOptimSpec",
]
