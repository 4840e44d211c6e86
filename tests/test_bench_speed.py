"""`nas-grouping bench speed`: settings, the missing Torch-Pruning message, and our two budgeted exports."""

from __future__ import annotations

import sys

import pytest
import torch

from nas_grouping import ConfigError
from nas_grouping.bench.speed import SpeedConfig, run_speed
from nas_grouping.pipeline.hybrid import (HybridCompression, export_fastest, gate_batches, gates_all_on,
                                          project_gates, project_gates_to_latency)
from nas_grouping.latency.measure import LatencyCost, MeasuredLatency, profile_layers
from nas_grouping.macs import count_macs

pytestmark = pytest.mark.usefixtures("single_thread")


def test_settings_parse_and_check():
    cfg = SpeedConfig(networks="resnet56", budgets="0.5, 0.25", batches="1,32")
    assert cfg.networks == ["resnet56"] and cfg.budgets == [0.5, 0.25] and cfg.batches == [1, 32]
    quick = SpeedConfig(quick=True)
    assert quick.networks == ["resnet56"] and quick.batches == [1, 4]
    with pytest.raises(ConfigError, match="unknown"):
        SpeedConfig(networks="vgg")
    with pytest.raises(ConfigError, match="shares"):
        SpeedConfig(budgets="1.5")
    with pytest.raises(ConfigError, match="batches"):
        SpeedConfig(batches="0")


def test_missing_torch_pruning_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ConfigError, match="make bench-speed"):
        run_speed(SpeedConfig(quick=True))


def test_mac_and_latency_budgeted_exports_meet_the_mac_budget():
    from search_spaces import get_space

    torch.manual_seed(0)
    size = (1, 8, 8)
    searchable = get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16]).eval()
    dense_macs = count_macs(get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16], dense=True), size)
    budget = dense_macs // 2
    batches = gate_batches(searchable, size, seed=0)
    macs_only = project_gates(searchable, size, budget, batches)
    assert count_macs(macs_only, size) <= budget
    cost = LatencyCost(searchable, profile_layers(searchable, size, batch=1, repeats=2, warmup=1))
    dense = get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16], dense=True).eval()
    measure = MeasuredLatency(dense, size, batch=1, repeats=2, warmup=1)
    gated, info = project_gates_to_latency(searchable, size, budget, batches, cost, 0.01 * measure.reference_ms,
                                           measure)
    assert count_macs(gated, size) <= budget
    # 1% of the measured dense latency cannot be met: the fastest try is kept, and the note says so
    assert info["budget_ms"] == pytest.approx(0.01 * measure.reference_ms) and "was not met" in info["note"]
    assert info["loop_measured_ms"] > info["budget_ms"] and 1 <= info["loop_tries"] <= 4
    exported, forms = export_fastest(gated, size, batch=1)
    x = torch.randn(4, *size)
    with torch.no_grad():
        assert torch.allclose(exported(x), gated.eval()(x), atol=1e-4)
    assert len(forms["groups"]) == len([m for m in gated.modules() if type(m).__name__ == "DGConv2d"])


class _MacClock(MeasuredLatency):
    """A fake machine for the hybrid's loops: 0.1 ms of overhead plus 1 ms per 100k MACs (the dense model is the
    reference); exports and side-by-side timings stay real."""

    def __init__(self, reference, size) -> None:
        super().__init__(reference, size, batch=1, repeats=2, warmup=1)

    @property
    def reference_ms(self) -> float:
        return self(self.reference)

    def __call__(self, model) -> float:
        return 0.1 + count_macs(model, self.input_size) / 1e5


def test_hybrid_prunes_channels_to_a_measured_budget_and_keeps_grouping_when_it_keeps_more():
    from search_spaces import get_space

    from nas_grouping.convert import convert_to_dgconv

    torch.manual_seed(0)
    size = (1, 8, 8)
    dense = get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16], dense=True).eval()
    dense_macs = count_macs(dense, size)
    clock = _MacClock(dense, size)
    hybrid = HybridCompression(dense, size, round_to=8, repeats=2, seed=0, measure=clock)
    ungrouped = gates_all_on(convert_to_dgconv(dense))
    # grouping alone missed the budget: the channels meet it
    model, info = hybrid.choose(0.5 * clock.reference_ms, dense_macs // 2,
                                groups_alone=(ungrouped, clock.reference_ms))
    assert info["hybrid_choice"] == "pruned channels" and 0 < info["channel_ratio"] < 1
    assert count_macs(model, size) <= dense_macs // 2 and clock(model) <= 0.5 * clock.reference_ms
    assert info["loop_measured_ms"] == pytest.approx(clock(model)) and "note" not in info
    x = torch.randn(3, *size)
    exported, _ = export_fastest(model, size, batch=1)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-4)
    # grouping alone met the budget keeping more MACs than the pruned model: it stays
    kept, info = hybrid.choose(0.5 * clock.reference_ms, dense_macs // 2,
                               groups_alone=(ungrouped, 0.5 * clock.reference_ms))
    assert kept is ungrouped and info["hybrid_choice"] == "groups alone" and info["channel_ratio"] == 0.0
    # nothing meets a budget under the fixed overhead: every candidate is timed side by side, the fastest kept
    model, info = hybrid.choose(0.01 * clock.reference_ms, dense_macs // 2,
                                groups_alone=(ungrouped, clock.reference_ms))
    assert info["hybrid_choice"] in ("groups alone", "pruned channels", "pruned channels and groups")
    assert "side by side" in info["note"] and info["loop_tries"] >= 1
