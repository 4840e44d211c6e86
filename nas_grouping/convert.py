"""Swap the nn.Conv2d layers of any model for DGConv2d, and split its parameters.

The conversion copies weights, so a converted pretrained model computes what it
computed before (gates start on, i.e. dense; grouped convs start at their
groups). The parameter split lets any DARTS-style loop give the gates (the
architecture parameters) their own optimizer, with no weight decay.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from nas_grouping.ops.dgconv import DGConv2d, shared_power_of_two

__all__ = [
    "ConversionStep", "conversion_plan", "convert_to_dgconv", "dgconv_layers",
    "arch_parameters", "weight_parameters",
]


@dataclass(frozen=True)
class ConversionStep:
    """What the conversion does with one nn.Conv2d: convert it, or skip it and why."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    groups: int
    convert: bool
    reason: str


def _decide(name: str, conv: nn.Conv2d, *, first: bool, skip_first: bool, skip_pointwise: bool,
            skip_depthwise: bool, skip_grouped: bool, exclude: Sequence[str]) -> tuple[bool, str]:
    if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
        return False, "excluded by name pattern"
    if type(conv) is not nn.Conv2d:
        return False, f"{type(conv).__name__} has a forward of its own"
    if first and skip_first:
        return False, "first convolution (skip_first)"
    if conv.groups > 1 and conv.groups == conv.in_channels:
        if skip_depthwise:
            return False, "depthwise (skip_depthwise)"
    elif conv.groups > 1 and skip_grouped:
        return False, f"already grouped, groups={conv.groups} (skip_grouped)"
    if conv.kernel_size == (1, 1) and skip_pointwise:
        return False, "1x1 (skip_pointwise)"
    k = shared_power_of_two(conv.in_channels, conv.out_channels)
    if k == 0:
        return False, f"{conv.in_channels} and {conv.out_channels} channels share no power of two"
    g = conv.groups
    if g & (g - 1) or g > 2**k:
        return False, f"groups={g} is not a power of two up to {2**k}"
    return True, "converted" if g == 1 else f"converted, starting at groups={g}"


def conversion_plan(model: nn.Module, *, skip_first: bool = True, skip_pointwise: bool = False,
                    skip_depthwise: bool = True, skip_grouped: bool = True,
                    exclude: Sequence[str] = ()) -> list[ConversionStep]:
    """What ``convert_to_dgconv`` would do with each nn.Conv2d of ``model``, in order."""
    if isinstance(exclude, str):
        exclude = [exclude]
    steps, first = [], True
    for name, m in model.named_modules():
        if isinstance(m, DGConv2d) or not isinstance(m, nn.Conv2d):
            continue
        ok, why = _decide(name, m, first=first, skip_first=skip_first, skip_pointwise=skip_pointwise,
                          skip_depthwise=skip_depthwise, skip_grouped=skip_grouped, exclude=exclude)
        first = False
        steps.append(ConversionStep(name, m.in_channels, m.out_channels, tuple(m.kernel_size), m.groups, ok, why))
    return steps


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_to_dgconv(model: nn.Module, *, skip_first: bool = True, skip_pointwise: bool = False,
                      skip_depthwise: bool = True, skip_grouped: bool = True, exclude: Sequence[str] = (),
                      gate_init: float = 1e-2, inplace: bool = False) -> nn.Module:
    """Return ``model`` with its convertible nn.Conv2d layers replaced by DGConv2d.

    Args:
        skip_first: leave the first convolution (the stem) alone.
        skip_pointwise: leave 1x1 convolutions alone.
        skip_depthwise: leave depthwise convolutions alone (grouping them further is meaningless).
        skip_grouped: leave convolutions that are already grouped (ResNeXt, RegNet) alone. A DGConv2d
            stores its weight dense, so converting one multiplies its stored weights by its groups
            (resnext50_32x4d: 23.0M -> 66.9M), and the gates it starts with off see exactly zero task
            gradient (their weights are masked), so they never reopen: with ``False`` such a layer can
            only group further, never less.
        exclude: fnmatch patterns of module names to leave alone, e.g. ``["layer4.*"]``.
        gate_init: magnitude of the initial gate latents.
        inplace: modify ``model`` instead of a deep copy.

    ``conversion_plan`` with the same options lists each layer and why it was skipped.
    """
    target = model if inplace else copy.deepcopy(model)
    plan = conversion_plan(target, skip_first=skip_first, skip_pointwise=skip_pointwise,
                           skip_depthwise=skip_depthwise, skip_grouped=skip_grouped, exclude=exclude)
    for step in plan:
        if step.convert:
            new = DGConv2d.from_conv(target.get_submodule(step.name), gate_init=gate_init)
            new.layer_name = step.name
            if not step.name:  # the model is a bare conv
                return new
            set_submodule(target, step.name, new)
    return target


def dgconv_layers(model: nn.Module) -> list[tuple[str, DGConv2d]]:
    """The DGConv2d layers of ``model`` with their names (also stored in ``layer_name`` for error messages)."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, DGConv2d):
            if not m.layer_name:
                m.layer_name = name
            layers.append((name, m))
    return layers


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The architecture parameters (gate latents): give them their own optimizer and no weight decay."""
    return [m.gate_latent for _, m in dgconv_layers(model)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not an architecture parameter."""
    arch = {id(p) for p in arch_parameters(model)}
    return [p for p in model.parameters() if id(p) not in arch]
