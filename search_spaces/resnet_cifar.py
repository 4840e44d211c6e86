"""The CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Sec. 4.2.

Three stages of basic blocks at widths 16, 32 and 64 (times ``width``), 2n
blocks' worth of 3x3 convolutions each, depth 6n + 2. Both 3x3 convolutions of
every block are the searchable ``conv_layer``; the stem and the 1x1 projection
shortcuts (option B) stay ``nn.Conv2d``.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from nas_grouping.errors import ConfigError
from nas_grouping.ops.dgconv import DGConv2d

from ._registry import register_space
from ._utils import init_weights

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "resnet20", "resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN and ReLU, plus an identity or 1x1 projection shortcut."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        *,
        stride: int = 1,
        conv_layer: Callable[..., nn.Module] = DGConv2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv_layer(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv_layer(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem 3x3 conv, three stages of ``num_blocks`` basic blocks (strides 1, 2, 2), pooling, linear."""

    def __init__(
        self,
        num_blocks: int,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 1,
        conv_layer: Callable[..., nn.Module] = DGConv2d,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ConfigError(f"CifarResNet: num_blocks must be >= 1, got {num_blocks}")
        if width < 1:
            raise ConfigError(f"CifarResNet: width must be an integer >= 1, got {width}")
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride=stride, conv_layer=conv_layer))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def cifar_resnet(
    depth: int,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 1,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
) -> CifarResNet:
    """A CIFAR ResNet of ``depth`` = 6n + 2 layers (n basic blocks per stage), widths 16/32/64 x ``width``."""
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"cifar_resnet: depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    return CifarResNet(
        (depth - 2) // 6, num_classes=num_classes, in_channels=in_channels, width=width, conv_layer=conv_layer
    )


@register_space("resnet20", input_size=(3, 32, 32))
def resnet20(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 1,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage), 18 searchable 3x3 convolutions.

    Dense MACs at 3x32x32: 40,813,184.
    """
    return cifar_resnet(20, num_classes=num_classes, in_channels=in_channels, width=width, conv_layer=conv_layer)


@register_space("resnet56", input_size=(3, 32, 32))
def resnet56(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 1,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage), 54 searchable 3x3 convolutions.

    Dense MACs at 3x32x32: 125,747,840.
    """
    return cifar_resnet(56, num_classes=num_classes, in_channels=in_channels, width=width, conv_layer=conv_layer)
