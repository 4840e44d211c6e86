"""MobileNetV2 of Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018),
with learned grouping of its pointwise convolutions.

Every 1x1 convolution (expansion, projection and the last 1x1 before pooling)
is the searchable ``conv_layer``, which learns a grouping of the pointwise
layers as ShuffleNet and CondenseNet fix or prune one. The depthwise 3x3
convolutions and the stem stay ``nn.Conv2d``. Channel counts are rounded to
multiples of 8, so every searchable layer has at least 8 groups to choose from.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from nas_grouping.errors import ConfigError
from nas_grouping.ops.dgconv import DGConv2d

from ._registry import register_space
from ._utils import init_weights, make_divisible

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2", "mobilenet_v2_cifar"]

IMAGENET_SETTING: tuple[tuple[int, int, int, int], ...] = (
    # expand ratio t, channels c, blocks n, first stride s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Searchable 1x1 expansion, depthwise 3x3, searchable linear 1x1 projection; residual when shapes match."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        *,
        stride: int,
        expand_ratio: int,
        conv_layer: Callable[..., nn.Module] = DGConv2d,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"InvertedResidual: stride must be 1 or 2, got {stride}")
        hidden = in_planes * expand_ratio
        self.use_residual = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [
                conv_layer(in_planes, hidden, kernel_size=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            conv_layer(hidden, out_planes, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem conv, inverted residual blocks, a 1x1 conv to ``last_channel``, pooling, dropout, linear.

    Args:
        setting: rows (expand ratio, channels, blocks, first stride).
        stem_stride: 2 for ImageNet, 1 for small images.
        width_mult: multiplies every channel count (rounded to multiples of 8);
            the last 1x1 conv is never made narrower than ``last_channel``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 1.0,
        setting: Sequence[Sequence[int]] = IMAGENET_SETTING,
        stem_stride: int = 2,
        stem_channels: int = 32,
        last_channel: int = 1280,
        dropout: float = 0.2,
        conv_layer: Callable[..., nn.Module] = DGConv2d,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ConfigError(f"MobileNetV2: width_mult must be > 0, got {width_mult}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"MobileNetV2: dropout must be in [0, 1), got {dropout}")
        if any(len(row) != 4 for row in setting):
            raise ConfigError(f"MobileNetV2: setting rows must be (t, c, n, s), got {setting}")
        planes = make_divisible(stem_channels * width_mult)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult))
        features: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, planes, kernel_size=3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU6(inplace=True),
        )]
        for t, c, n, s in setting:
            out_planes = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(
                    planes, out_planes, stride=s if i == 0 else 1, expand_ratio=t, conv_layer=conv_layer,
                ))
                planes = out_planes
        features.append(nn.Sequential(
            conv_layer(planes, self.last_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(self.last_channel),
            nn.ReLU6(inplace=True),
        ))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


@register_space("mobilenet_v2", input_size=(3, 224, 224))
def mobilenet_v2(
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    width_mult: float = 1.0,
    dropout: float = 0.2,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
) -> MobileNetV2:
    """MobileNetV2 for ImageNet (stride-2 stem, 32x down), searchable pointwise convolutions.

    Dense MACs at 3x224x224: 300,774,272.
    """
    return MobileNetV2(
        num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, setting=IMAGENET_SETTING,
        stem_stride=2, dropout=dropout, conv_layer=conv_layer,
    )


@register_space("mobilenet_v2_cifar", input_size=(3, 32, 32))
def mobilenet_v2_cifar(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width_mult: float = 0.5,
    dropout: float = 0.0,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
) -> MobileNetV2:
    """MobileNetV2 for 32x32 (and 8x8) images: stride-1 stem and second stage (8x down), half width,
    last 1x1 conv of 640 channels.

    Dense MACs at 3x32x32: 26,324,224.
    """
    return MobileNetV2(
        num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, setting=CIFAR_SETTING,
        stem_stride=1, last_channel=640, dropout=dropout, conv_layer=conv_layer,
    )
