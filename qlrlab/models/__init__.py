"""Models of the paper's tasks: MLP, ResNet-18, a GPT-2-style decoder and Rosenbrock."""

from qlrlab.models.batchnorm import BatchNorm2d, in_functorch_transform
from qlrlab.models.gpt import GPT, CausalSelfAttention, DecoderBlock
from qlrlab.models.init import (
    TRUNCATED_STD_FACTOR,
    InitScheme,
    fan_in,
    num_parameters,
    paper_init_,
    trunc_normal_fan_in_,
)
from qlrlab.models.mlp import MLP
from qlrlab.models.resnet import BasicBlock, ResNet18
from qlrlab.models.rosenbrock import RosenbrockModel

__all__ = [
    "GPT",
    "MLP",
    "TRUNCATED_STD_FACTOR",
    "BasicBlock",
    "BatchNorm2d",
    "CausalSelfAttention",
    "DecoderBlock",
    "InitScheme",
    "ResNet18",
    "RosenbrockModel",
    "fan_in",
    "in_functorch_transform",
    "num_parameters",
    "paper_init_",
    "trunc_normal_fan_in_",
]
