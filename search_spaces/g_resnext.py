"""G-ResNeXt: ResNeXt with learned grouping, from Zhang et al., "Differentiable Learning-to-Group
Channels via Groupable Convolutional Neural Networks" (ICCV 2019).

ResNeXt bottlenecks (Xie et al., CVPR 2017): 1x1 reduce, 3x3, 1x1 expand, whose
3x3 convolution is the searchable ``conv_layer`` instead of a convolution with a
fixed 32 groups. The 1x1 convolutions, the stem and the projection shortcuts
stay ``nn.Conv2d``. ``groups`` sets the initial grouping of the 3x3
convolutions: ``g_resnext50(groups=32, conv_layer=nn.Conv2d)`` is ResNeXt-50
(32x4d).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from nas_grouping.errors import ConfigError
from nas_grouping.ops.dgconv import DGConv2d

from ._registry import register_space
from ._utils import init_weights

__all__ = ["GroupableBottleneck", "GResNeXt", "g_resnext50", "g_resnext_cifar"]


class GroupableBottleneck(nn.Module):
    """1x1 reduce to ``width``, searchable 3x3 (carrying the stride), 1x1 expand, plus the shortcut."""

    def __init__(
        self,
        in_planes: int,
        width: int,
        out_planes: int,
        *,
        stride: int = 1,
        groups: int = 1,
        conv_layer: Callable[..., nn.Module] = DGConv2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv_layer(width, width, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class GResNeXt(nn.Module):
    """A stem, stages of groupable bottlenecks (the first of each stage after the first has stride 2),
    global average pooling and a linear classifier.

    Args:
        layers: blocks per stage.
        widths: width of the 3x3 convolution per stage; a block outputs ``expansion`` times it.
        stem: ``"imagenet"`` (7x7 stride-2 conv and 3x3 max-pool, 4x down) or
            ``"cifar"`` (3x3 stride-1 conv).
        stem_width: output channels of the stem convolution.
        groups: initial groups of the 3x3 convolutions.
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 3,
        stem: str = "imagenet",
        stem_width: int = 64,
        expansion: int = 2,
        groups: int = 1,
        conv_layer: Callable[..., nn.Module] = DGConv2d,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ConfigError(f"GResNeXt: layers and widths must have one entry per stage, got {layers} and {widths}")
        if any(n < 1 for n in layers) or any(w < 1 for w in widths) or expansion < 1:
            raise ConfigError(
                f"GResNeXt: layers, widths and expansion must be >= 1, got {layers}, {widths}, {expansion}"
            )
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        elif stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
            )
        else:
            raise ConfigError(f"GResNeXt: stem must be 'imagenet' or 'cifar', got {stem!r}")
        stages = []
        in_planes = stem_width
        for i, (num_blocks, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(GroupableBottleneck(
                    in_planes, width, expansion * width, stride=stride, groups=groups, conv_layer=conv_layer,
                ))
                in_planes = expansion * width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.avgpool(x).flatten(1))


@register_space("g_resnext50", input_size=(3, 224, 224))
def g_resnext50(
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    groups: int = 1,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
) -> GResNeXt:
    """G-ResNeXt-50 for ImageNet: blocks 3, 4, 6, 3; 3x3 widths 128, 256, 512, 1024 (as ResNeXt-50 32x4d).

    Dense MACs at 3x224x224: 11,398,021,120.
    """
    return GResNeXt(
        (3, 4, 6, 3), (128, 256, 512, 1024), num_classes=num_classes, in_channels=in_channels,
        stem="imagenet", stem_width=64, groups=groups, conv_layer=conv_layer,
    )


@register_space("g_resnext_cifar", input_size=(3, 32, 32))
def g_resnext_cifar(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    layers: Sequence[int] = (3, 3, 3),
    widths: Sequence[int] = (32, 64, 128),
    groups: int = 1,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
) -> GResNeXt:
    """A small G-ResNeXt for 32x32 (and 8x8) images: 3x3 stem of 32 channels, three stages
    (strides 1, 2, 2) of ``layers`` blocks with 3x3 widths ``widths``, block outputs twice as wide.

    Dense MACs at 3x32x32: 133,007,872.
    """
    return GResNeXt(
        layers, widths, num_classes=num_classes, in_channels=in_channels,
        stem="cifar", stem_width=32, groups=groups, conv_layer=conv_layer,
    )
