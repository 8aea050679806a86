"""ResNet-18 (He et al., 2016) as the paper ran it: Haiku ``hk.nets.ResNet18`` on 32×32 inputs.

Structure (v1 basic blocks, as torchvision's ``resnet18``):

* stem ``"imagenet"`` (default, the paper's): 7×7 stride-2 conv (64 channels, no bias) → BN →
  ReLU → 3×3 stride-2 max-pool; on 32×32 inputs the spatial size goes 32 → 16 → 8, then the
  stages take it to 8 → 4 → 2 → 1. Stem ``"cifar"``: 3×3 stride-1 conv → BN → ReLU, no pool
  (the common CIFAR variant; 32 → 32 → 16 → 8 → 4).
* four stages of two basic blocks with (64, 128, 256, 512) channels and strides (1, 2, 2, 2);
  1×1 projection shortcuts (conv + BN) in stages 2–4;
* global average pool and a linear logits layer, **zero-initialised** under the paper's init.

Convolutions have no bias; every BatchNorm is :class:`qlrlab.models.batchnorm.BatchNorm2d`
(Haiku decay 0.9, eps 1e-5, zero-debiased EMAs, safe under ``torch.func``). The parameter count
is 11,181,642 for 10 classes with the ImageNet stem (11,173,962 with the CIFAR stem).

Padding differs slightly from Haiku's ``"SAME"`` on even sizes (PyTorch pads symmetrically,
Haiku puts the extra row/column at the end); the output sizes are identical.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from qlrlab.models.batchnorm import BatchNorm2d
from qlrlab.models.init import InitScheme, paper_init_

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a residual connection (ResNet v1).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the projection shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False),
                BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (see the module docstring).

    Args:
        num_classes: number of logits.
        in_channels: image channels.
        stem: ``"imagenet"`` (the paper's 7×7/2 conv + max-pool) or ``"cifar"`` (3×3/1 conv).
        init: ``"paper"`` (truncated normal σ = 1/√fan_in, zero logits layer) or ``"torch"``
            (PyTorch's module defaults).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        stem: Literal["imagenet", "cifar"] = "imagenet",
        init: InitScheme = "paper",
    ) -> None:
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        elif stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), BatchNorm2d(64), nn.ReLU()
            )
        else:
            raise ValueError(f"unknown stem {stem!r}; use 'imagenet' or 'cifar'")
        widths = (64, 128, 256, 512)
        stages: list[nn.Module] = []
        c_in = 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, w, stride), BasicBlock(w, w, 1)))
            c_in = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logits = nn.Linear(512, num_classes)
        self.stem_type = stem
        if init == "paper":
            paper_init_(self, zero_init=[self.logits])
        elif init != "torch":
            raise ValueError(f"unknown init {init!r}")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of ``[N, C, H, W]`` images."""
        x = self.layers(self.stem(x))
        return self.logits(self.pool(x).flatten(1))
