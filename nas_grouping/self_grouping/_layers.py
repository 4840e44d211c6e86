"""The layers the self-grouping pass can prune, all seen the same way: a dense equivalent and a mask.

A regular, grouped or permuted group convolution, an exported diverse group layer and a
linear layer each compute ``op(x, W * M)`` for a dense-shaped weight W (C_out x C_in x
kernel) and an existing connection mask M (C_out x C_in): all-ones for a regular layer,
block-diagonal (possibly permuted) for a group convolution, the kept groups for a diverse
group layer. The pass reads importance from W (and its gradient, mapped the same way),
prunes inside M, and builds the diverse group layer of the new mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from nas_grouping.ops.dgconv import DGConv2d
from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear
from nas_grouping.ops.group_conv import PermutedGroupConv2d

__all__ = ["Prunable", "layer_candidates"]

_LAYER_TYPES = (_ConvNd, nn.Linear, PermutedGroupConv2d, DiverseGroupConv2d, DiverseGroupLinear)


def _block_diagonal(weight: Tensor, groups: int, in_channels: int) -> Tensor:
    """The dense (C_out, C_in, *k) equivalent of a grouped weight (C_out, C_in / G, *k)."""
    if groups == 1:
        return weight.clone()
    out_channels, per_in = weight.shape[:2]
    per_out = out_channels // groups
    dense = weight.new_zeros(out_channels, in_channels, *weight.shape[2:])
    for q in range(groups):
        dense[q * per_out:(q + 1) * per_out, q * per_in:(q + 1) * per_in] = weight[q * per_out:(q + 1) * per_out]
    return dense


def _index(perm: list[int] | None, n: int, device: torch.device) -> Tensor:
    return torch.tensor(perm if perm is not None else list(range(n)), dtype=torch.long, device=device)


@dataclass
class Prunable:
    """One prunable layer of a model, by name, with its dense equivalent and existing mask."""

    name: str
    module: nn.Module

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, (nn.Linear, DiverseGroupLinear))

    @property
    def _conv(self) -> nn.Module:
        return self.module.conv if isinstance(self.module, PermutedGroupConv2d) else self.module

    @property
    def in_channels(self) -> int:
        m = self.module
        return m.in_features if self.is_linear else m.in_channels

    @property
    def out_channels(self) -> int:
        m = self.module
        return m.out_features if self.is_linear else m.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return () if self.is_linear else tuple(self._conv.kernel_size)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def _dense(self, pick: Callable[[Tensor], Tensor]) -> Tensor:
        """Dense (C_out, C_in, *kernel) tensor from ``pick(param)`` (the weight or its gradient)."""
        m = self.module
        if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear)):
            ref = m.weights[0] if len(m.weights) else None
            dense = torch.zeros(self.out_channels, self.in_channels, *self.kernel_size,
                                dtype=ref.dtype if ref is not None else torch.float32,
                                device=ref.device if ref is not None else None)
            for w, (f, s) in zip(m.weights, m.groups):
                if s:
                    value = pick(w)
                    rows = torch.tensor(f, dtype=torch.long, device=dense.device)
                    cols = torch.tensor(s, dtype=torch.long, device=dense.device)
                    dense[rows[:, None], cols[None, :]] = value.to(dense.dtype)
            return dense
        if isinstance(m, nn.Linear):
            return pick(m.weight).clone()
        conv = self._conv
        dense = _block_diagonal(pick(conv.weight), conv.groups, conv.in_channels)
        if isinstance(m, PermutedGroupConv2d):
            rows = _index(m.out_perm, conv.out_channels, dense.device)
            cols = _index(m.in_perm, conv.in_channels, dense.device)
            permuted = torch.zeros_like(dense)
            permuted[rows[:, None], cols[None, :]] = dense
            dense = permuted
        return dense

    def dense_weight(self) -> Tensor:
        """The dense equivalent weight W * M (detached)."""
        return self._dense(lambda p: p.detach())

    def dense_grad(self) -> Tensor:
        """The gradient of the loss w.r.t. the dense equivalent weight, at the existing connections."""
        return self._dense(lambda p: p.grad.detach() if p.grad is not None else torch.zeros_like(p))

    def dense_bias(self) -> Tensor | None:
        m = self.module
        if isinstance(m, PermutedGroupConv2d):
            b = m.conv.bias
            if b is None:
                return None
            out = torch.empty_like(b.detach())
            out[_index(m.out_perm, m.conv.out_channels, b.device)] = b.detach()
            return out
        return None if m.bias is None else m.bias.detach()

    def mask(self) -> Tensor:
        """The existing connection mask (C_out x C_in, bool, on the CPU)."""
        m = self.module
        if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear)):
            return m.mask().cpu()
        if isinstance(m, nn.Linear):
            return torch.ones(m.out_features, m.in_features, dtype=torch.bool)
        conv = self._conv
        ones = torch.ones(conv.out_channels, conv.in_channels // conv.groups, 1, dtype=torch.bool)
        mask = _block_diagonal(ones, conv.groups, conv.in_channels)[..., 0]
        if isinstance(m, PermutedGroupConv2d):
            out = torch.zeros_like(mask)
            out[_index(m.out_perm, conv.out_channels, mask.device)[:, None],
                _index(m.in_perm, conv.in_channels, mask.device)[None, :]] = mask
            mask = out
        return mask

    def build(self, mask: Tensor, groups_of_filters: list[list[int]]) -> nn.Module:
        """The diverse group layer computing this layer's dense equivalent with ``mask`` (a subset of M)."""
        weight, bias = self.dense_weight(), self.dense_bias()
        factory = {"device": weight.device, "dtype": weight.dtype}
        if self.is_linear:
            dense = nn.Linear(self.in_channels, self.out_channels, bias is not None, **factory)
        else:
            c = self._conv
            dense = nn.Conv2d(self.in_channels, self.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                              bias=bias is not None, **factory)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if bias is not None:
                dense.bias.copy_(bias)
        cls = DiverseGroupLinear if self.is_linear else DiverseGroupConv2d
        return cls.from_masked(dense, mask, groups_of_filters)


def _skip_reason(module: nn.Module) -> str | None:
    """Why a layer-like module cannot be pruned, or None when it can."""
    if isinstance(module, DGConv2d):
        return "DGConv2d (searchable): export the model first (export_model)"
    if isinstance(module, (PermutedGroupConv2d, DiverseGroupConv2d, DiverseGroupLinear)):
        conv = module.conv if isinstance(module, PermutedGroupConv2d) else None
        if conv is not None and conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} (only zero padding is supported)"
        if conv is not None and conv.groups > 1 and conv.in_channels == conv.groups:
            return "depthwise convolution"
        return None
    if isinstance(module, nn.Linear):
        return None if type(module) is nn.Linear else f"{type(module).__name__} (a Linear subclass whose weight " \
                                                        "its owner may use directly)"
    if isinstance(module, _ConvNd):
        if type(module) is not nn.Conv2d:
            return f"{type(module).__name__} (only plain 2-D convolutions are supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only zero padding is supported)"
        if module.groups > 1 and module.in_channels == module.groups:
            return "depthwise convolution"
        return None
    return "not a convolution or linear layer"


def layer_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """(name, module, skip reason or None) for every conv/linear-like layer, outer ones first.

    The inner convolution of a PermutedGroupConv2d belongs to it and is not listed.
    """
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") or (c == "" and name) for c in claimed):
            continue
        if not isinstance(module, _LAYER_TYPES):
            continue
        if isinstance(module, PermutedGroupConv2d):
            claimed.append(name)
        yield name, module, _skip_reason(module)
