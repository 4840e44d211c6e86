"""The torch.fx tracing shared by the graph passes (folding gathers, finding coupled channels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from nas_grouping.ops.group_conv import PermutedGroupConv2d

__all__ = ["Tracer", "PER_CHANNEL_MODULES", "PER_CHANNEL_FUNCTIONS", "PER_CHANNEL_METHODS"]

#: layers that act on each channel alone: a channel permutation passes through them
PER_CHANNEL_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU,
                       nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.MaxPool2d,
                       nn.AvgPool2d, nn.AdaptiveAvgPool2d)
PER_CHANNEL_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.gelu, torch.sigmoid, F.sigmoid,
                         torch.tanh, F.leaky_relu, F.elu, F.dropout, F.max_pool2d, F.avg_pool2d,
                         F.adaptive_avg_pool2d}
PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


class Tracer(fx.Tracer):
    """torch.fx tracer that keeps the layers of this package as leaves (their insides are not traced)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from nas_grouping.ops.dgconv import DGConv2d
        from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear

        if isinstance(m, (PermutedGroupConv2d, DGConv2d, DiverseGroupConv2d, DiverseGroupLinear)):
            return True
        return super().is_leaf_module(m, qualname)
