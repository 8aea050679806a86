"""Multilayer perceptron (Haiku ``hk.nets.MLP``): ReLU between layers, none after the last."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

from qlrlab.models.init import InitScheme, paper_init_

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """Fully connected network ``sizes[0] → sizes[1] → ... → sizes[-1]`` with biases.

    The paper's UCI models are ``MLP([8, 50, 1])`` (Energy) and ``MLP([9, 100, 1])`` (Protein);
    Fashion-MNIST uses ``MLP([784, 50, 10])``. Inputs with more than two dimensions are flattened
    from dimension 1.

    Args:
        sizes: layer widths, input first (at least two entries).
        init: ``"paper"`` (truncated normal σ = 1/√fan_in, zero biases) or ``"torch"``.
    """

    def __init__(self, sizes: Sequence[int], init: InitScheme = "paper") -> None:
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            if i > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(fan_in, fan_out))
        super().__init__(*layers)
        self.sizes = tuple(int(s) for s in sizes)
        if init == "paper":
            paper_init_(self)
        elif init != "torch":
            raise ValueError(f"unknown init {init!r}")

    def forward(self, input: Tensor) -> Tensor:
        """Apply the network to ``[N, sizes[0]]`` (or ``[N, ...]``, flattened) inputs."""
        if input.ndim > 2:
            input = input.flatten(1)
        return super().forward(input)
