"""PermutedGroupConv2d: a real grouped convolution with channel permutations.

A DGConv2d's relationship matrix is block-diagonal only after a channel
permutation. This layer runs ``nn.Conv2d(groups=G)`` on input channels gathered
in group order and puts output channels back in their original order, so it
computes exactly what the masked layer computed, at 1/G of its MACs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas_grouping.errors import ConfigError
from nas_grouping.ops._channels import gather_channels

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


def _check_perm(perm: Sequence[int] | None, n: int, what: str) -> list[int] | None:
    if perm is None:
        return None
    p = [int(v) for v in perm]
    if sorted(p) != list(range(n)):
        raise ConfigError(f"PermutedGroupConv2d: {what} must be a permutation of range({n}), got {len(p)} entries")
    return None if p == list(range(n)) else p


FORMS = ("grouped", "dense")


class PermutedGroupConv2d(nn.Module):
    """y = conv_G(x[:, in_perm])[:, argsort(out_perm)].

    Two exact forms (``form``): "grouped" runs the grouped conv between two channel
    gathers; "dense" runs one dense conv on the block-structured weight laid out in
    the original channel order (no gathers; the faster form where grouping does not
    pay, e.g. narrow layers on a CPU). ``macs`` counts the kept connections either way.

    Args:
        conv_kwargs: nn.Conv2d arguments of the inner grouped conv (``groups`` included).
        in_perm: input channel order the grouped conv reads (None = identity).
        out_perm: original index of each grouped-conv output channel (None = identity).
        form: "grouped" or "dense".
    """

    def __init__(self, conv_kwargs: dict[str, Any], *, in_perm: Sequence[int] | None,
                 out_perm: Sequence[int] | None, form: str = "grouped") -> None:
        super().__init__()
        if form not in FORMS:
            raise ConfigError(f"PermutedGroupConv2d: form must be one of {FORMS}, got {form!r}")
        self.form = form
        self._dense_cache: tuple[tuple, Tensor] | None = None
        self.conv = conv_from_config(conv_kwargs)
        self.register_buffer("in_index", None, persistent=False)
        self.register_buffer("out_index", None, persistent=False)
        self._set_perms(_check_perm(in_perm, self.conv.in_channels, "in_perm"),
                        _check_perm(out_perm, self.conv.out_channels, "out_perm"))

    def _set_perms(self, in_perm: list[int] | None, out_perm: list[int] | None) -> None:
        device = self.conv.weight.device
        self.in_perm, self.out_perm = in_perm, out_perm
        self.in_index = None if in_perm is None else torch.tensor(in_perm, device=device)
        if out_perm is None:
            self.out_index = None
        else:
            inverse = torch.empty(len(out_perm), dtype=torch.long, device=device)
            inverse[torch.tensor(out_perm, device=device)] = torch.arange(len(out_perm), device=device)
            self.out_index = inverse
        self._dense_cache = None

    def set_permutations(self, *, in_index: Tensor | None | str = "keep",
                         out_index: Tensor | None | str = "keep") -> None:
        """Replace the input gather (``x[:, in_index]``) and/or the output gather (``y[:, out_index]``);
        None removes one, an identity index too. Used by ``fold.fold_permutations``."""
        in_perm = self.in_perm if isinstance(in_index, str) else (
            None if in_index is None else _check_perm(in_index.tolist(), self.in_channels, "in_index"))
        out_perm = self.out_perm
        if not isinstance(out_index, str):
            if out_index is None:
                out_perm = None
            else:
                idx = _check_perm(out_index.tolist(), self.out_channels, "out_index")
                out_perm = None if idx is None else torch.argsort(torch.tensor(idx)).tolist()
        self._set_perms(in_perm, out_perm)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def groups(self) -> int:
        return self.conv.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.conv.kernel_size

    def dense_weight(self) -> Tensor:
        """The equivalent dense weight (C_out x C_in x kh x kw) in the original channel order."""
        w = self.conv.weight
        g = self.conv.groups
        co, ci = w.shape[0] // g, w.shape[1]
        dense = w.new_zeros(w.shape[0], ci * g, *w.shape[2:])
        for q in range(g):
            dense[q * co:(q + 1) * co, q * ci:(q + 1) * ci] = w[q * co:(q + 1) * co]
        if self.in_index is not None:
            dense = dense[:, torch.argsort(self.in_index)]
        if self.out_index is not None:
            dense = dense[self.out_index]
        return dense

    def _dense_forward(self, x: Tensor) -> Tensor:
        w = self.conv.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if torch.is_grad_enabled() and w.requires_grad:
            weight = self.dense_weight()
        else:
            if self._dense_cache is None or self._dense_cache[0] != key:
                self._dense_cache = (key, self.dense_weight().detach())
            weight = self._dense_cache[1]
        bias = self.conv.bias
        if bias is not None and self.out_index is not None:
            bias = bias[self.out_index]
        c = self.conv
        if c.padding_mode != "zeros":
            x = F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
            return F.conv2d(x, weight, bias, c.stride, 0, c.dilation)
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation)

    def macs(self, output_size: tuple[int, ...]) -> int:
        """Kept multiply-accumulates per sample (the grouped work), whatever the form."""
        c = self.conv
        positions = 1
        for s in output_size:
            positions *= s
        return c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0] * c.kernel_size[1] * positions

    def executed_macs(self, output_size: tuple[int, ...], form: str | None = None, batch: int = 1) -> int:
        """Multiply-accumulates per sample that ``form`` (default: this layer's) really executes."""
        if (form or self.form) == "grouped":
            return self.macs(output_size)
        return self.macs(output_size) * self.conv.groups

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.conv.parameters())

    def forward(self, x: Tensor) -> Tensor:
        if self.form == "dense":
            return self._dense_forward(x)
        if self.in_index is not None:
            x = gather_channels(x, self.in_index)
        y = self.conv(x)
        if self.out_index is not None:
            y = gather_channels(y, self.out_index)
        return y

    def to_config(self) -> dict[str, Any]:
        return {"conv": conv_config(self.conv), "in_perm": self.in_perm, "out_perm": self.out_perm,
                "form": self.form}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PermutedGroupConv2d":
        return cls(config["conv"], in_perm=config.get("in_perm"), out_perm=config.get("out_perm"),
                   form=config.get("form", "grouped"))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, form: str = "grouped") -> "PermutedGroupConv2d":
        """Wrap a plain grouped conv (no permutation) so that its form can be chosen."""
        new = cls(conv_config(conv), in_perm=None, out_perm=None, form=form)
        new.conv = conv
        return new

    def _apply(self, fn, recurse=True):
        self._dense_cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, form={self.form}, permuted_in={self.in_perm is not None}, "
                f"permuted_out={self.out_perm is not None}")
