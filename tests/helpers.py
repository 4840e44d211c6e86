"""Helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine terms, so that eval outputs are well scaled and informative."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def halving_table(path: str | Path, space_kwargs: dict) -> Path:
    """A fake search latency table of ``digits_convnet`` where every layer's time halves with each group
    doubling (on this CPU it does not for 8-16 channels), saved at ``path``; returns the path."""
    from nas_grouping import dgconv_layers
    from nas_grouping.latency.measure import LatencyTable
    from search_spaces import get_space

    names = [n for n, _ in dgconv_layers(get_space("digits_convnet", **space_kwargs))]
    rows = [{"layer": n, "groups": 2**k, "form": "grouped", "ms": 1.0 / 2**k} for n in names for k in range(5)]
    return LatencyTable(meta={"model_ms": 1.0 + len(names), "batch": 1, "device": "test"}, rows=rows).save(path)


def interrupt_train_epoch(monkeypatch, module, at: int) -> None:
    """Make ``module.train_epoch`` raise KeyboardInterrupt on its ``at``-th call (a run killed mid-epoch)."""
    real, calls = module.train_epoch, {"n": 0}

    def stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "train_epoch", stop)
