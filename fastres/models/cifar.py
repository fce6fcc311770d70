"""The CIFAR-10 ResNets of He et al. 2015, §4.2, on the fused blocks.

depth = 6n + 2: a 3x3 conv with 16 filters (→ BN → ReLU), three stages of n basic
blocks with 16 / 32 / 64 filters on 32x32 / 16x16 / 8x8 maps (subsampling by
stride-2 convs), global average pooling, a ``num_classes``-way fc.

Shortcut options (§3.3): ``"A"`` identity, zero-padded extra channels and stride-2
subsampling when dimensions grow (no parameters; the paper's choice for CIFAR);
``"B"`` projection (1x1 conv + BN) only when dimensions grow; ``"C"`` projection in
every block; ``None`` the plain net (same layers, no shortcut).

Module names follow torchvision (``conv1, bn1, layer1..3, fc``; projections under
``downsample.0/1``). Parameter counts (option A): 20 → 0.27M, 32 → 0.46M,
44 → 0.66M, 56 → 0.85M, 110 → 1.7M, 1202 → 19.4M (Table 6).
"""
from typing import Callable, Optional

import torch
from torch import nn

from ..nn.blocks import BasicBlock, make_norm
from .resnet import ResNet, _init_weights, load_weights, normalize_shortcut

Tensor = torch.Tensor

__all__ = ["CifarResNet", "cifar_resnet"]


class CifarResNet(ResNet):
    """He et al.'s CIFAR ResNet: ``CifarResNet(depth, shortcut="A", num_classes=10)``."""

    def __init__(self, depth: int = 20, shortcut: Optional[str] = "A", num_classes: int = 10,
                 zero_init_residual: bool = False, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 in_channels: int = 3) -> None:
        nn.Module.__init__(self)
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"cifar_resnet: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), "
                             f"got {depth!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.shortcut = normalize_shortcut(shortcut)
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 16
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(self._norm_layer, 16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(BasicBlock, 16, n)
        self.layer2 = self._make_layer(BasicBlock, 32, n, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self, zero_init_residual)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, shortcut={self.shortcut!r}"

    def _stem(self, x: Tensor) -> Tensor:  # no max-pool on CIFAR
        return self._stem_conv(x)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def cifar_resnet(depth: int = 20, shortcut: Optional[str] = "A", num_classes: int = 10, *, weights=None,
                 **kwargs) -> CifarResNet:
    """``fastres.cifar_resnet(depth, shortcut="A", num_classes=10)`` — He et al. §4.2.

    ``depth`` = 6n+2 (20, 32, 44, 56, 110, 1202); ``shortcut`` ``"A"``, ``"B"``,
    ``"C"`` or ``None`` (plain). ``weights``: a state_dict or a path, loaded strictly.
    """
    model = CifarResNet(depth, shortcut, num_classes, **kwargs)
    return load_weights(model, weights)
