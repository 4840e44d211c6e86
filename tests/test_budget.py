"""MAC budgets, the differentiable model cost, the regularizers and the projection to the budget."""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from nas_grouping import BudgetError, ConfigError, count_macs, dgconv_layers
from nas_grouping.config import config_from_dict
from nas_grouping.budget import (REGULARIZERS, AdditiveRegularizer, MacBudget, ModelCost, MultiplicativeRegularizer,
                                 make_regularizer, register_regularizer)
from nas_grouping.runtime import setup_runtime
from nas_grouping.search.loop import project_to_budget
from search_spaces import get_space

SMALL = {"widths": [8, 8, 16, 16, 16, 16]}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return get_space("digits_convnet", **SMALL)


@pytest.mark.parametrize("text,fraction,macs", [
    ("0.5", 0.5, None), (0.25, 0.25, None), ("12M", None, 12_000_000), ("3.5k", None, 3500), (2e6, None, 2_000_000),
])
def test_budget_parse(text, fraction, macs):
    b = MacBudget.parse(text)
    assert b.fraction == fraction and b.macs == macs


@pytest.mark.parametrize("bad", ["abc", "12Q", "-1"])
def test_budget_parse_rejects(bad):
    with pytest.raises(ConfigError):
        MacBudget.parse(bad)


def test_budget_needs_exactly_one_value():
    with pytest.raises(ConfigError, match="exactly one"):
        MacBudget()
    with pytest.raises(ConfigError, match="exactly one"):
        MacBudget(macs=10, fraction=0.5)
    with pytest.raises(ConfigError, match="fraction"):
        MacBudget(fraction=1.5)
    assert MacBudget(fraction=0.5).resolve(1000) == 500
    assert MacBudget(macs=300).resolve(1000) == 300


def test_model_cost_matches_counter_for_every_gate_pattern_of_a_layer():
    model = small_net()
    cost = ModelCost(model, (1, 8, 8))
    assert cost.dense_macs == count_macs(model, (1, 8, 8))
    layers = dgconv_layers(model)
    name, layer = layers[-1]
    for gates in itertools.product([0, 1], repeat=layer.num_gates):
        layer.set_gates(gates)
        assert cost.current_macs() == count_macs(model, (1, 8, 8))
        assert float(cost.expected_macs().detach()) == pytest.approx(cost.current_macs())
    for _, m in layers:
        m.set_gates([0] * m.num_gates)
    assert cost.minimum_macs == count_macs(model, (1, 8, 8))
    assert cost.minimum_macs < cost.dense_macs


def test_unreachable_budget_is_a_clear_error():
    cost = ModelCost(small_net(), (1, 8, 8))
    cost.check_budget(cost.minimum_macs)  # reachable: no error
    with pytest.raises(BudgetError, match="cannot be met") as info:
        cost.check_budget(cost.minimum_macs - 1)
    assert f"{cost.minimum_macs:,}" in str(info.value)


def test_additive_regularizer_is_zero_under_budget_and_pushes_gates_down_above():
    model = small_net()
    cost = ModelCost(model, (1, 8, 8))
    task = torch.tensor(1.0)
    reg = AdditiveRegularizer(2.0)
    assert float(reg(task, cost.expected_macs(), cost.dense_macs).detach()) == pytest.approx(1.0)
    loss = reg(task, cost.expected_macs(), cost.dense_macs // 2)
    assert float(loss.detach()) == pytest.approx(1.0 + 2.0 * (cost.dense_macs / (cost.dense_macs // 2) - 1))
    loss.backward()
    for _, layer in dgconv_layers(model):
        assert torch.all(layer.gate_latent.grad > 0)  # descent lowers the latents (fewer connections)


def test_multiplicative_regularizer_is_the_papers_form():
    cost = torch.tensor(200.0, requires_grad=True)
    task = torch.tensor(0.7)
    reg = MultiplicativeRegularizer(0.5)
    assert float(reg(task, cost, 100).detach()) == pytest.approx(0.7 * 2**0.5)
    assert float(reg(task, torch.tensor(50.0), 100)) == pytest.approx(0.7)
    reg(task, cost, 100).backward()
    assert cost.grad > 0


def test_make_regularizer_validates():
    assert isinstance(make_regularizer("additive", 1.0), AdditiveRegularizer)
    assert isinstance(make_regularizer("multiplicative", 0.1), MultiplicativeRegularizer)
    with pytest.raises(ConfigError):
        make_regularizer("quadratic", 1.0)
    with pytest.raises(ConfigError):
        make_regularizer("additive", 0.0)


def test_make_regularizer_takes_an_object_as_it_is():
    reg = MultiplicativeRegularizer(0.3)
    assert make_regularizer(reg, 5.0) is reg, "an object is used as it is (the strength is not read)"
    task, cost = torch.tensor(0.7), torch.tensor(250.0)
    assert torch.equal(make_regularizer("multiplicative", 0.3)(task, cost, 100), reg(task, cost, 100))
    custom = lambda task_loss, cost, budget_macs: task_loss + cost / budget_macs  # noqa: E731 - any callable
    assert make_regularizer(custom) is custom
    assert make_regularizer("additive") == AdditiveRegularizer(), "no strength: the class's default"
    with pytest.raises(ConfigError, match="additive.*multiplicative") as info:
        make_regularizer("quadratic", 1.0)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="callable"):
        make_regularizer(3, 1.0)


def test_a_registered_regularizer_is_valid_in_the_config_and_on_the_command_line():
    from nas_grouping.config import SearchConfig, add_config_arguments

    with pytest.raises(ConfigError, match="regularizer must be one of additive, multiplicative, got 'quadratic'"):
        SearchConfig(regularizer="quadratic")

    @register_regularizer("quadratic")
    @dataclass(frozen=True)
    class QuadraticRegularizer:
        strength: float = 1.0

        def __call__(self, task_loss, cost, budget_macs):
            return task_loss + self.strength * torch.relu(cost / budget_macs - 1) ** 2

    try:
        cfg = SearchConfig(regularizer="quadratic", reg_strength=2.0)
        reg = make_regularizer(cfg.regularizer, cfg.reg_strength)
        assert reg == QuadraticRegularizer(2.0)
        assert float(reg(torch.tensor(1.0), torch.tensor(300.0), 100)) == pytest.approx(9.0)
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, SearchConfig)
        assert parser.parse_args(["--regularizer", "quadratic"]).regularizer == "quadratic"
    finally:
        del REGULARIZERS["quadratic"]
    assert list(REGULARIZERS) == ["additive", "multiplicative"]


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_projection_meets_the_budget_and_removes_the_cheapest_gates(fraction):
    model = small_net()
    cost = ModelCost(model, (1, 8, 8))
    budget = int(fraction * cost.dense_macs)
    torch.manual_seed(1)
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    rt = setup_runtime("cpu")
    flips = project_to_budget(model, cost, budget, batches, rt)
    assert cost.current_macs() <= budget
    offs = [f for f in flips if f["action"] == "off"]
    assert offs and all(f["groups_after"] >= 2 for f in offs)
    # every change records the cost after it; removals stop as soon as the model fits
    last_off = max(i for i, f in enumerate(flips) if f["action"] == "off")
    before_last = flips[last_off - 1]["MACs"] if last_off > 0 else cost.dense_macs
    assert before_last > budget >= flips[last_off]["MACs"]
    # gates turned back on fit the budget and are estimated to lower the loss
    ons = flips[last_off + 1:]
    assert all(f["action"] == "on" and f["estimated_loss_change"] < 0 and f["MACs"] <= budget for f in ons)


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.125])
def test_groups_at_budget_is_near_uniform_and_within_a_point_of_the_budget(fraction):
    from nas_grouping.budget import groups_at_budget
    from search_spaces import get_space

    model = get_space("resnet20", num_classes=10, in_channels=3)
    groups = groups_at_budget(model, (3, 32, 32), fraction)
    cost = ModelCost(model, (3, 32, 32))
    share = cost.current_macs() / cost.dense_macs
    assert fraction - 0.01 <= share <= fraction
    low = min(groups.values())
    assert set(groups.values()) <= {low, 2 * low}
    with pytest.raises(BudgetError):
        groups_at_budget(get_space("resnet20", num_classes=10, in_channels=3), (3, 32, 32), 0.01)


def test_fixed_groups_take_a_per_layer_map_from_every_source():
    from nas_grouping.config import SearchConfig
    from nas_grouping.search.loop import build_search_model

    names = [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)]
    cfg = config_from_dict(SearchConfig, {"fixed_groups": json.dumps({n: 2 for n in names})})
    model = build_search_model(cfg, 10, 3)
    assert {layer.learned_groups for _, layer in dgconv_layers(model)} == {2}
    assert SearchConfig(fixed_groups="4").fixed_groups == 4
    with pytest.raises(ConfigError, match="power of two"):
        SearchConfig(fixed_groups={"layer1.0.conv1": 3})
    with pytest.raises(ConfigError, match="missing"):
        build_search_model(SearchConfig(fixed_groups={"layer1.0.conv1": 2}), 10, 3)


def test_fixed_groups_read_the_groups_a_search_recorded(tmp_path):
    from nas_grouping.config import SearchConfig

    groups = {"layer1.0.conv1": 2, "layer1.0.conv2": 8}
    (tmp_path / "summary.json").write_text(json.dumps({"groups": groups, "val_acc": 0.5}))
    assert SearchConfig(fixed_groups=str(tmp_path)).fixed_groups == groups
    assert SearchConfig(fixed_groups=str(tmp_path / "summary.json")).fixed_groups == groups
    with pytest.raises(ConfigError, match="search's run folder or summary.json; got 'no/such/run'"):
        SearchConfig(fixed_groups="no/such/run")
    (tmp_path / "summary.json").write_text(json.dumps({"val_acc": 0.5}))
    with pytest.raises(ConfigError, match="records no per-layer groups"):
        SearchConfig(fixed_groups=str(tmp_path))


def test_groups_at_budget_can_keep_named_layers_dense():
    from nas_grouping.budget import ModelCost, groups_at_budget

    model = get_space("resnet20", num_classes=10, in_channels=3)
    keep = ["layer2.0.conv1", "layer3.0.conv1"]
    groups = groups_at_budget(model, (3, 32, 32), 0.25, keep_dense=keep)
    assert [groups[n] for n in keep] == [1, 1] and max(groups.values()) > 1
    macs = ModelCost(model, (3, 32, 32)).current_macs()
    assert 0.24 * 40_813_184 < macs <= 0.25 * 40_813_184
    with pytest.raises(ConfigError, match="keep_dense: no searchable layer named layer9"):
        groups_at_budget(model, (3, 32, 32), 0.25, keep_dense=["layer9"])
    with pytest.raises(BudgetError):
        groups_at_budget(model, (3, 32, 32), 0.25, keep_dense=list(groups))
