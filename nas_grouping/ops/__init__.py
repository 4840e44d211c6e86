"""The layers: the searchable DGConv2d and the exported inference layers."""

from .dgconv import DGConv2d
from .group_conv import PermutedGroupConv2d

__all__ = ["DGConv2d", "PermutedGroupConv2d"]
