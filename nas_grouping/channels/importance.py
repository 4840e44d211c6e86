"""How channel pruning scores channels: ``ChannelPruning(model, size, importance=L1Importance())``.

A channel importance scores the channels of one set of coupled channels (a
:class:`~nas_grouping.channels.pruning.ChannelSet`: the layers that produce, read and carry
them); the pruning keeps the highest scores of every set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from nas_grouping.channels.pruning import ChannelSet

__all__ = ["ChannelImportance", "L1Importance"]


class ChannelImportance:
    """Scores of the ``s.channels`` channels of the set ``s`` of ``model``: a 1-d tensor, larger = kept first."""

    def __call__(self, model: nn.Module, s: "ChannelSet") -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class L1Importance(ChannelImportance):
    """Per channel: the L1 norm of its producing filters, each layer scaled to mean 1, summed (the default)."""

    def __call__(self, model: nn.Module, s: "ChannelSet") -> torch.Tensor:
        score = torch.zeros(s.channels)
        for name, role in s.members:
            if role == "out":
                w = model.get_submodule(name).weight.detach().float().cpu()
                norms = w.abs().reshape(w.shape[0], -1).sum(1)
                score += norms / norms.mean().clamp_min(1e-12)
        return score
