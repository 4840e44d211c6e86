"""The layers: the searchable DGConv2d and the exported inference layers."""

from nas_grouping.ops._channels import gather_channels
from nas_grouping.ops.dgconv import DGConv2d
from nas_grouping.ops.group_conv import PermutedGroupConv2d

__all__ = ["DGConv2d", "PermutedGroupConv2d", "gather_channels"]
