"""The few plain modules a deployed model needs besides nn.Conv2d and nn.Linear.

Each holds fixed tensors only (index buffers, weights) and runs a fixed sequence of
standard ops, so ``torch.export``, ``torch.onnx.export`` and ``torch.jit.trace`` see
a static graph: no caches, no branches on tensor values.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from nas_grouping.ops import gather_channels


class ChannelGather(nn.Module):
    """``x.index_select(dim, index)`` with a fixed index (channels-last layouts kept)."""

    def __init__(self, index: Sequence[int] | Tensor, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())

    def forward(self, x: Tensor) -> Tensor:
        dim = self.dim if self.dim >= 0 else x.dim() + self.dim
        return gather_channels(x, self.index, dim)

    def extra_repr(self) -> str:
        return f"channels={self.index.numel()}, dim={self.dim}"


class Branches(nn.Module):
    """Split the input along ``dim`` into ``sizes`` and run one module on each; concatenate."""

    def __init__(self, branches: Sequence[nn.Module], sizes: Sequence[int], dim: int = 1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.sizes = [int(s) for s in sizes]
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.split(x, self.sizes, dim=self.dim)
        return torch.cat([branch(part) for branch, part in zip(self.branches, parts)], dim=self.dim)


class GroupedLinear(nn.Module):
    """G equal linear maps on G equal slices of the last dimension, as one batched product."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.groups, self.out_per_group, self.in_per_group = weight.shape
        self.in_features, self.out_features = self.groups * self.in_per_group, self.groups * self.out_per_group
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().view(self.groups, 1, -1))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xg = x.reshape(-1, self.groups, self.in_per_group).transpose(0, 1)
        w = self.weight.transpose(1, 2)
        y = torch.bmm(xg, w) if self.bias is None else torch.baddbmm(self.bias, xg, w)
        return y.transpose(0, 1).reshape(*lead, self.groups * self.out_per_group)

    def macs(self, output_size: tuple[int, ...] = ()) -> int:
        """Multiply-accumulates per sample (zero padding of the groups included: it is executed)."""
        n = 1
        for d in output_size:
            n *= int(d)
        return self.weight.numel() * n

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_per_group={self.in_per_group}, out_per_group={self.out_per_group}"
