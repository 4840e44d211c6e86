"""An NNI ModelSpace made from any network whose searchable layers are DGConv2d.

The plain search spaces (``search_spaces``) build their networks with
``conv_layer=DGConv2d``; :class:`DGConvModelSpace` takes such a network (or any
model after ``convert_to_dgconv``) and turns every DGConv2d into an NNI choice,
labelled by its module path, so NNI's samples read ``{"layer1.0.conv1": "0111", ...}``
and the frozen network has the same class, layer names and recipe as the plain
one. Optionally each position becomes a ``LayerChoice`` between the DGConv and
fixed convolutions (dense, depthwise, ``groups=g``).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from nas_grouping.convert import dgconv_layers, set_submodule
from nas_grouping.errors import ConfigError
from nas_grouping.integrations.nni.compat import require_nni
from nas_grouping.integrations.nni.ops import SAMPLING_MODES, DifferentiableDGConv2d, MutableDGConv2d, SamplingDGConv2d
from nas_grouping.ops.dgconv import DGConv2d

require_nni()

from nni.nas.nn.pytorch import LayerChoice, ModelSpace  # noqa: E402

__all__ = ["DGConvModelSpace", "CANDIDATES", "fixed_candidate", "searchable_positions"]

#: named candidates of a searchable position; an int g means a fixed nn.Conv2d(groups=g)
CANDIDATES = ("dgconv", "dense", "depthwise")

UNSUPPORTED_STRATEGIES = {
    "ENAS": "NNI 3.0's ENAS fails on pytorch-lightning >= 2.1 ('too many values to unpack' in its training_step); "
            "it ran on pytorch-lightning 2.0.9 with tianshou<1 and gym, which this integration does not test",
    "Proxyless": "Proxyless samples one path with its own backward, which has no DGConv gate form",
}


def _candidate_name(candidate: str | int) -> str:
    return candidate if isinstance(candidate, str) else f"groups{candidate}"


def fixed_candidate(layer: DGConv2d, candidate: str | int) -> nn.Conv2d:
    """The fixed convolution ``candidate`` ("dense", "depthwise" or a group count) at ``layer``'s position.

    Its weight is taken from the DGConv's dense weight (the diagonal blocks for
    a grouped one), so every candidate starts from the same function family.
    """
    where = f"{layer._where()}"
    cin, cout = layer.in_channels, layer.out_channels
    if candidate == "dense":
        groups = 1
    elif candidate == "depthwise":
        if cout % cin:
            raise ConfigError(f"{where}: candidate 'depthwise' needs out_channels to be a multiple of in_channels")
        groups = cin
    elif isinstance(candidate, int) and not isinstance(candidate, bool):
        groups = candidate
        if groups < 1 or cin % groups or cout % groups:
            raise ConfigError(f"{where}: candidate groups={groups} must divide both channel counts ({cin}, {cout})")
    else:
        raise ConfigError(f"unknown candidate {candidate!r}: expected one of {CANDIDATES} or a group count (int)")
    w = layer.weight.detach()
    conv = nn.Conv2d(cin, cout, layer.kernel_size, layer.stride, layer.padding, layer.dilation, groups,
                     layer.bias is not None, layer.padding_mode, device=w.device, dtype=w.dtype)
    ci, co = cin // groups, cout // groups
    with torch.no_grad():
        conv.weight.copy_(torch.cat([w[q * co:(q + 1) * co, q * ci:(q + 1) * ci] for q in range(groups)], dim=0))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias.detach())
    return conv


class DGConvModelSpace(ModelSpace):
    """NNI model space of ``network``: every DGConv2d becomes a choice of its gate pattern.

    Args:
        network: a model whose searchable layers are DGConv2d (a ``search_spaces``
            builder's output, or ``convert_to_dgconv(model)``). It is deep-copied.
        candidates: what each position may become. ``("dgconv",)`` (default): a
            :class:`MutableDGConv2d` labelled by its module path. More than one:
            a ``LayerChoice`` labelled by the module path over the named
            candidates ("dgconv", "dense", "depthwise", or an int g for a fixed
            ``groups=g`` convolution); its DGConv candidate is labelled
            ``"<path>.dgconv"``.
        sampling: how sampling strategies draw DGConv patterns (see ``MutableDGConv2d``).

    Attributes:
        network: the converted network; ``space.freeze(sample).network`` is the
            fixed network, of the same class as ``network``.

    NNI's one-shot strategies find the DGConv super-net modules through
    :meth:`extra_oneshot_hooks`, so plain ``nni.nas.strategy.DARTS()`` works;
    ``nas_grouping.integrations.nni.DARTS`` also keeps weight decay off the gates.
    """

    def __init__(self, network: nn.Module, *, candidates: Sequence[str | int] = ("dgconv",),
                 sampling: str = "groups") -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ConfigError(f"DGConvModelSpace: network must be an nn.Module, got {type(network).__name__}")
        if isinstance(candidates, (str, int)):
            candidates = [candidates]
        candidates = list(candidates)
        if not candidates or len({_candidate_name(c) for c in candidates}) != len(candidates):
            raise ConfigError(f"DGConvModelSpace: candidates must be distinct and not empty, got {candidates!r}")
        for c in candidates:
            if not (c in CANDIDATES or (isinstance(c, int) and not isinstance(c, bool))):
                raise ConfigError(f"DGConvModelSpace: unknown candidate {c!r}; expected {CANDIDATES} or a group count")
        if sampling not in SAMPLING_MODES:
            raise ConfigError(f"DGConvModelSpace: sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if any(isinstance(m, (MutableDGConv2d, LayerChoice)) for m in network.modules()):
            raise ConfigError("DGConvModelSpace: network already holds NNI choices; pass the plain DGConv2d network")
        net = copy.deepcopy(network)
        layers = dgconv_layers(net)
        if not layers:
            raise ConfigError(
                "DGConvModelSpace: the network has no DGConv2d layer to search; build it with a search space "
                "builder (conv_layer=DGConv2d, the default) or convert it with nas_grouping.convert_to_dgconv"
            )
        self.candidates = [_candidate_name(c) for c in candidates]
        self.sampling = sampling
        for name, layer in layers:
            set_submodule(net, name, self._searchable(name, layer, candidates, sampling))
        self.network = net

    @staticmethod
    def _searchable(name: str, layer: DGConv2d, candidates: list[str | int], sampling: str) -> nn.Module:
        if candidates == ["dgconv"]:
            return MutableDGConv2d.from_dgconv(layer, label=name, sampling=sampling)
        options: dict[str, nn.Module] = {}
        for c in candidates:
            if c == "dgconv":
                options["dgconv"] = MutableDGConv2d.from_dgconv(layer, label=f"{name}.dgconv", sampling=sampling)
            else:
                options[_candidate_name(c)] = fixed_candidate(layer, c)
        return LayerChoice(options, label=name)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def searchable_layers(self) -> list[str]:
        """Module paths (inside ``network``) of the searchable positions, in order."""
        return searchable_positions(self.network)

    @classmethod
    def extra_oneshot_hooks(cls, strategy: Any) -> list:
        """NNI calls this from a one-shot strategy: the DGConv mutation hook that fits the strategy."""
        from nni.nas.oneshot.pytorch.strategy import DARTS, ENAS, Proxyless, RandomOneShot

        for kind in (ENAS, Proxyless):
            if isinstance(strategy, kind):
                raise ConfigError(f"DGConv search with NNI's {kind.__name__} is not supported: "
                                  f"{UNSUPPORTED_STRATEGIES[kind.__name__]}. Use DARTS, GumbelDARTS or RandomOneShot.")
        if isinstance(strategy, DARTS):
            return [DifferentiableDGConv2d.mutate]
        if isinstance(strategy, RandomOneShot):
            return [SamplingDGConv2d.mutate]
        raise ConfigError(
            f"DGConv search with NNI's {type(strategy).__name__} is not supported; use DARTS, GumbelDARTS or "
            "RandomOneShot (one-shot), or a multi-trial strategy on the space itself"
        )


def searchable_positions(model: nn.Module) -> list[str]:
    """Module paths of the searchable positions of an NNI space or super-net (relative to ``model``):
    its LayerChoices, and its DGConv choices that are not inside a LayerChoice."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, (LayerChoice, MutableDGConv2d))]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
