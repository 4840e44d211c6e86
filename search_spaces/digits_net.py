"""A plain six-convolution network for the 8x8 digits of scikit-learn (``load_digits``)."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from nas_grouping.errors import ConfigError
from nas_grouping.ops.dgconv import DGConv2d

from ._registry import register_space
from ._utils import init_weights

__all__ = ["DigitsConvNet", "digits_convnet"]


class DigitsConvNet(nn.Module):
    """3x3 conv-BN-ReLU layers of ``widths``, a 2x2 max-pool after the first ``pool_after`` of them,
    global average pooling and a linear classifier. The first conv is ``nn.Conv2d``, the rest ``conv_layer``.
    """

    def __init__(
        self,
        widths: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 1,
        pool_after: int = 2,
        conv_layer: Callable[..., nn.Module] = DGConv2d,
    ) -> None:
        super().__init__()
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ConfigError(f"DigitsConvNet: needs at least two positive widths, got {widths}")
        if not 0 < pool_after < len(widths):
            raise ConfigError(f"DigitsConvNet: pool_after must be between 1 and {len(widths) - 1}, got {pool_after}")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            conv = nn.Conv2d if i == 0 else conv_layer
            layers += [
                conv(prev, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if i + 1 == pool_after:
                layers.append(nn.MaxPool2d(2))
            prev = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))


@register_space("digits_convnet", input_size=(1, 8, 8))
def digits_convnet(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    widths: Sequence[int] = (32, 32, 64, 64, 128, 128),
    pool_after: int = 2,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
) -> DigitsConvNet:
    """Six 3x3 convolutions of 32, 32, 64, 64, 128, 128 channels with one max-pool (8x8 -> 4x4)
    after the second, five of them searchable.

    Dense MACs at 1x8x8: 5,033,216.
    """
    return DigitsConvNet(
        widths, num_classes=num_classes, in_channels=in_channels, pool_after=pool_after, conv_layer=conv_layer,
    )
