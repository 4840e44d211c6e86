"""PermutedGroupConv2d: a real grouped convolution with channel permutations.

A DGConv2d's relationship matrix is block-diagonal only after a channel
permutation. This layer runs ``nn.Conv2d(groups=G)`` on input channels gathered
in group order and puts output channels back in their original order, so it
computes exactly what the masked layer computed, at 1/G of its MACs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["PermutedGroupConv2d", "conv_config", "conv_from_config"]


def conv_config(conv: nn.Conv2d) -> dict[str, Any]:
    """JSON-serialisable constructor arguments of a plain nn.Conv2d."""
    padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size), "stride": list(conv.stride), "padding": padding,
        "dilation": list(conv.dilation), "groups": conv.groups, "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def conv_from_config(config: dict[str, Any]) -> nn.Conv2d:
    c = dict(config)
    for key in ("kernel_size", "stride", "dilation"):
        c[key] = tuple(c[key])
    if not isinstance(c["padding"], str):
        c["padding"] = tuple(c["padding"])
    return nn.Conv2d(**c)


def gather_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]`` that keeps a channels-last tensor channels-last (grouped convs are
    much faster in that layout on CPUs; a plain index_select would silently return NCHW)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)


def _check_perm(perm: Sequence[int] | None, n: int, what: str) -> list[int] | None:
    if perm is None:
        return None
    p = [int(v) for v in perm]
    if sorted(p) != list(range(n)):
        raise ConfigError(f"PermutedGroupConv2d: {what} must be a permutation of range({n}), got {len(p)} entries")
    return None if p == list(range(n)) else p


class PermutedGroupConv2d(nn.Module):
    """y = conv_G(x[:, in_perm])[:, argsort(out_perm)].

    Args:
        conv_kwargs: nn.Conv2d arguments of the inner grouped conv (``groups`` included).
        in_perm: input channel order the grouped conv reads (None = identity).
        out_perm: original index of each grouped-conv output channel (None = identity).
    """

    def __init__(self, conv_kwargs: dict[str, Any], *, in_perm: Sequence[int] | None,
                 out_perm: Sequence[int] | None) -> None:
        super().__init__()
        self.conv = conv_from_config(conv_kwargs)
        self.in_perm = _check_perm(in_perm, self.conv.in_channels, "in_perm")
        self.out_perm = _check_perm(out_perm, self.conv.out_channels, "out_perm")
        if self.in_perm is not None:
            self.register_buffer("in_index", torch.tensor(self.in_perm), persistent=False)
        else:
            self.in_index = None
        if self.out_perm is not None:
            inverse = torch.empty(len(self.out_perm), dtype=torch.long)
            inverse[torch.tensor(self.out_perm)] = torch.arange(len(self.out_perm))
            self.register_buffer("out_index", inverse, persistent=False)
        else:
            self.out_index = None

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def groups(self) -> int:
        return self.conv.groups

    def forward(self, x: Tensor) -> Tensor:
        if self.in_index is not None:
            x = gather_channels(x, self.in_index)
        y = self.conv(x)
        if self.out_index is not None:
            y = gather_channels(y, self.out_index)
        return y

    def to_config(self) -> dict[str, Any]:
        return {"conv": conv_config(self.conv), "in_perm": self.in_perm, "out_perm": self.out_perm}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PermutedGroupConv2d":
        return cls(config["conv"], in_perm=config.get("in_perm"), out_perm=config.get("out_perm"))

    def extra_repr(self) -> str:
        return f"permuted_in={self.in_perm is not None}, permuted_out={self.out_perm is not None}"
