"""Channel gathers that keep the memory layout (shared by the exported layers)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_channels"]


def gather_channels(x: Tensor, index: Tensor, dim: int = 1) -> Tensor:
    """``x.index_select(dim, index)`` that keeps a channels-last 4-D tensor channels-last.

    Grouped convs are much faster in that layout on CPUs, and a plain index_select
    silently returns NCHW, losing it for every layer after.
    """
    if dim == 1 and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(dim, index)
