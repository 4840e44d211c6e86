"""Fastest exact export forms, measured latency tables and their device checks."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from nas_grouping import ConfigError, count_macs, dgconv_layers, export_model, load_model, save_model
from nas_grouping.latency.measure import (LatencyDeviceWarning, LatencyTable, choose_fastest_forms, latency_report,
                                  measure_ms, profile_layers)
from nas_grouping.ops.group_conv import PermutedGroupConv2d
from nas_grouping.export.records import records_of
from search_spaces import get_space

from helpers import halving_table

SMALL = {"widths": [8, 8, 16, 16, 16, 16]}


def searched_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = get_space("digits_convnet", **SMALL)
    for _, layer in dgconv_layers(model):
        layer.set_gates([rng.randint(0, 1) for _ in range(layer.num_gates)])
    return model.eval()


@pytest.mark.parametrize("form", ["grouped", "dense"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_both_forms_are_exact_in_both_layouts(form, layout):
    model = searched_net()
    exported = export_model(model).eval()
    for name in records_of(exported)[0]:
        layer = exported.get_submodule(name)
        if isinstance(layer, PermutedGroupConv2d):
            layer.form = form
    exported.to(memory_format=layout)
    x = torch.randn(3, 1, 8, 8).contiguous(memory_format=layout)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-5)
    assert count_macs(exported, (1, 8, 8)) == count_macs(model, (1, 8, 8))


def test_choose_fastest_forms_keeps_outputs_records_choices_and_round_trips(tmp_path):
    model = searched_net(1)
    exported = export_model(model)
    fast, report = choose_fastest_forms(exported, (1, 8, 8), batch=2, repeats=3, warmup=1)
    assert report["layout"] in ("nchw", "channels_last") and report["threads"] == torch.get_num_threads()
    assert set(report["layers"]) <= set(records_of(exported)[0])
    for name, row in report["layers"].items():
        assert row["form"] == min(("grouped", "dense"), key=lambda f: row[f"{f}_ms"])
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert count_macs(fast, (1, 8, 8)) == count_macs(model, (1, 8, 8))
    save_model(fast, tmp_path / "m")
    arch = json.loads((tmp_path / "m" / "architecture.json").read_text())
    assert arch["layout"] == report["layout"]
    for name, row in report["layers"].items():
        if row["form"] == "dense":
            assert arch["layers"][name]["config"]["form"] == "dense"
    loaded = load_model(tmp_path / "m")
    assert not loaded.training and loaded.nas_grouping_layout == report["layout"]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_profile_table_rows_save_load_and_device_warning(tmp_path):
    model = searched_net()
    table = profile_layers(model, (1, 8, 8), batch=1, repeats=2, warmup=1)
    layers = dgconv_layers(model)
    # groups=1 in two forms; every G > 1 in two patterns x two forms
    assert len(table.rows) == sum(2 + 4 * layer.num_gates for _, layer in layers)
    name, layer = layers[0]
    for g in (2**n for n in range(1, layer.num_gates + 1)):
        rows = {(r["pattern"], r["form"]) for r in table.rows if r["layer"] == name and r["groups"] == g}
        assert rows == {(p, f) for p in ("contiguous", "permuted") for f in ("grouped", "dense")}
        assert table.lookup(name, g, pattern="contiguous") == min(
            r["ms"] for r in table.rows if r["layer"] == name and r["groups"] == g and r["pattern"] == "contiguous")
    # the dense form runs one computation whatever G: timed once per layer
    assert len({r["ms"] for r in table.rows if r["layer"] == name and r["form"] == "dense"}) == 1
    assert table.meta["threads"] == torch.get_num_threads() and table.meta["statistic"] == "median"
    assert table.lookup(name, 1) == min(r["ms"] for r in table.rows if r["layer"] == name and r["groups"] == 1)
    with pytest.raises(ConfigError, match="no row"):
        table.lookup(name, 1024)
    path = table.save(tmp_path / "table.json")
    assert path.with_suffix(".csv").is_file()
    again = LatencyTable.load(path)
    assert again.rows == table.rows
    data = json.loads(path.read_text())
    data["meta"]["device"] = "some other GPU"
    path.write_text(json.dumps(data))
    with pytest.warns(LatencyDeviceWarning, match="measured elsewhere"):
        LatencyTable.load(path)
    with pytest.raises(ConfigError, match="no latency table"):
        LatencyTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_profile_needs_a_searchable_layer():
    with pytest.raises(ConfigError, match="no DGConv2d"):
        profile_layers(nn.Sequential(nn.Conv2d(1, 4, 3)), (1, 8, 8))


def test_measure_and_report_side_by_side():
    model = searched_net()
    t = measure_ms(model, (1, 8, 8), batch=2, layouts=("nchw", "channels_last"), repeats=3)
    assert set(t) == {"nchw", "channels_last"} and all(v > 0 for v in t.values())
    rep = latency_report(get_space("digits_convnet", dense=True, **SMALL), export_model(model), (1, 8, 8),
                         batches=(1, 4), repeats=3)
    assert rep["batch_4"]["speedup"] == pytest.approx(rep["batch_4"]["dense_ms"] / rep["batch_4"]["exported_ms"])


def test_profile_command_writes_a_table(tmp_path, capsys):
    from nas_grouping.cli import main

    out = tmp_path / "t.json"
    assert main(["profile", "--space", "digits_convnet", "--space-kwargs", json.dumps(SMALL), "--repeats", "1",
                 "--out", str(out)]) == 0
    assert "profiled 5 layers" in capsys.readouterr().out
    assert LatencyTable.load(out).meta["batch"] == 1 and out.with_suffix(".csv").is_file()


@pytest.mark.parametrize("form", ["grouped", "per_group", "dense"])
def test_exported_layers_keep_channels_last(form):
    """A channels-last input stays channels-last through every gather (index_select alone would drop it)."""
    from nas_grouping.ops.diverse_group import DiverseGroupConv2d

    torch.manual_seed(0)
    layer = DiverseGroupConv2d(8, 12, 3, padding=1, form=form,
                               groups=[([0, 5, 7, 11], [1, 2, 6]), ([1, 2, 3, 4], [0, 3]), ([6, 8, 9, 10], [4, 5, 7])])
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = layer(x)
        ref = nn.functional.conv2d(x, layer.dense_weight(), layer.bias, padding=1)
    assert torch.allclose(y, ref, atol=1e-5)
    if form != "dense":
        assert y.is_contiguous(memory_format=torch.channels_last)
    conv = PermutedGroupConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=2))
    conv.in_index = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    with torch.no_grad():
        assert conv(x).is_contiguous(memory_format=torch.channels_last)


def test_search_with_a_latency_budget_meets_it_on_the_table_and_reports_the_measurement(tmp_path):
    from nas_grouping.config import SearchConfig
    from nas_grouping.data import DataConfig
    from nas_grouping.search.loop import search

    # a table where grouping pays (on this CPU it does not for 8-16 channels: see the next test's measurement)
    path = halving_table(tmp_path / "table.json", SMALL)
    cfg = SearchConfig(space="digits_convnet", space_kwargs=SMALL, epochs=3, warmup_epochs=1, finetune_epochs=1,
                       budget=1.0, latency_budget="0.6", latency_table=str(path), progress=False,
                       measure_latency=False, out=str(tmp_path / "run"), data=DataConfig(batch_size=128))
    with pytest.warns(LatencyDeviceWarning):
        s = search(cfg).summary
    assert s["latency_budget_met_predicted"] and s["latency_predicted_ms"] <= s["latency_budget_ms"]
    assert s["latency_measured_ms"] > 0
    assert s["latency_prediction_error"] == pytest.approx(
        (s["latency_predicted_ms"] - s["latency_measured_ms"]) / s["latency_measured_ms"])
    # a budget below the fastest configuration fails before training, with the numbers
    from nas_grouping import BudgetError

    with pytest.warns(LatencyDeviceWarning), pytest.raises(BudgetError, match="cannot be met"):
        search(SearchConfig(**{**cfg.__dict__, "latency_budget": "0.0001ms", "out": str(tmp_path / "r2")}))
    assert not (tmp_path / "r2" / "checkpoint.pt").exists()


def test_search_profiles_a_table_when_none_is_given(tmp_path):
    """Measured on this machine. On narrow layers grouping may be slower than dense, so a MAC budget and a
    latency budget at the dense latency can contradict each other (projection says so): budget generously."""
    from nas_grouping.config import SearchConfig
    from nas_grouping.data import DataConfig
    from nas_grouping.search.loop import search

    cfg = SearchConfig(space="digits_convnet", space_kwargs=SMALL, epochs=2, warmup_epochs=1, finetune_epochs=0,
                       budget=0.9, latency_budget="100000ms", progress=False, measure_latency=False,
                       out=str(tmp_path / "run"), data=DataConfig(batch_size=128))
    s = search(cfg).summary
    table = LatencyTable.load(tmp_path / "run" / "latency_table.json")
    assert table.meta["batch"] == 1 and "model_ms" in table.meta
    assert s["latency_predicted_ms"] <= s["latency_budget_ms"]


def test_latency_cost_is_exact_at_binary_gates_and_its_gradient_is_the_saving():
    from nas_grouping.latency.measure import LatencyCost

    model = searched_net()
    layer_names = [n for n, _ in dgconv_layers(model)]
    rows = []
    for i, name in enumerate(layer_names):
        for n in range(5):
            rows.append({"layer": name, "groups": 2**n, "form": "grouped", "ms": 10.0 - n - i})
    table = LatencyTable(meta={"model_ms": 100.0, "batch": 1}, rows=rows)
    cost = LatencyCost(model, table)
    assert cost.base_ms == pytest.approx(100.0 - sum(10.0 - i for i in range(len(layer_names))))
    expected = cost.base_ms + sum(10.0 - (layer.learned_groups.bit_length() - 1) - i
                                  for i, (_, layer) in enumerate(dgconv_layers(model)))
    assert cost.current_ms() == pytest.approx(expected)
    e = cost.expected_ms()
    assert float(e.detach()) == pytest.approx(expected)
    e.backward()
    _, first = dgconv_layers(model)[0]
    assert torch.allclose(first.gate_latent.grad, torch.ones_like(first.gate_latent))  # one step saves 1 ms


def test_fastest_forms_cover_diverse_group_layers_and_linear_macs_count_positions(tmp_path):
    from nas_grouping.ops.diverse_group import FORMS, DiverseGroupConv2d, DiverseGroupLinear
    from nas_grouping.export.model import replace_layer
    from nas_grouping.macs import count_macs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
    model.nas_grouping_recipe = {"kwargs": {}}
    replace_layer(model, "2", DiverseGroupConv2d.from_masked(
        model[2], torch.tensor([[i in (0, 1, 2) for i in range(8)]] * 6 + [[i in (4, 7) for i in range(8)]] * 6),
        [list(range(6)), list(range(6, 12))]))
    replace_layer(model, "5", DiverseGroupLinear.from_masked(
        model[5], torch.tensor([[i < 6 for i in range(12)]] * 5 + [[i >= 6 for i in range(12)]] * 5),
        [list(range(5)), list(range(5, 10))]))
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    fast, report = choose_fastest_forms(model, (1, 8, 8), batch=2, repeats=2, warmup=1)
    assert set(report["layers"]) == {"2", "5"}
    assert all(row["form"] in FORMS for row in report["layers"].values())
    with torch.no_grad():
        assert torch.allclose(fast(x), ref, atol=1e-5)
    # a linear layer applied at several positions counts them all (out.shape[1:-1])
    seq = nn.Sequential(DiverseGroupLinear.from_masked(
        nn.Linear(12, 10), torch.tensor([[i < 6 for i in range(12)]] * 5 + [[i >= 6 for i in range(12)]] * 5),
        [list(range(5)), list(range(5, 10))]))
    assert count_macs(seq, (7, 12)) == 7 * (5 * 6 + 5 * 6)
    assert count_macs(nn.Sequential(nn.Linear(12, 10)), (7, 12)) == 7 * 120


def test_gate_pattern_names_contiguous_groups():
    from nas_grouping.latency.measure import gate_pattern

    assert gate_pattern([1, 1, 1]) == "contiguous"  # dense
    assert gate_pattern([0, 0, 1]) == "contiguous"
    assert gate_pattern([0, 1, 0]) == "permuted"
    assert gate_pattern([1, 1, 0]) == "permuted"


def _pattern_table(model: nn.Module, contiguous_saving: float) -> LatencyTable:
    """Every layer: 8 ms dense, 1 ms less per gate off when permuted, ``contiguous_saving`` ms more when contiguous."""
    rows = []
    for name, layer in dgconv_layers(model):
        rows.append({"layer": name, "groups": 1, "pattern": "contiguous", "form": "grouped", "ms": 8.0})
        for n in range(1, layer.num_gates + 1):
            rows.append({"layer": name, "groups": 2**n, "pattern": "permuted", "form": "grouped", "ms": 8.0 - n})
            rows.append({"layer": name, "groups": 2**n, "pattern": "contiguous", "form": "grouped",
                         "ms": 8.0 - n - contiguous_saving})
    return LatencyTable(meta={"model_ms": 100.0, "batch": 1}, rows=rows)


def test_latency_cost_knows_contiguous_groups_are_faster():
    from nas_grouping.latency.measure import LatencyCost
    from nas_grouping.search.loop import latency_constraint

    model = searched_net()
    name, layer = dgconv_layers(model)[0]
    k = layer.num_gates
    cost = LatencyCost(model, _pattern_table(model, 0.5))
    for gates, ms in (([0] + [1] * (k - 1), 6.5), ([1] * (k - 1) + [0], 7.0), ([1] * k, 8.0)):
        layer.set_gates(gates)
        assert cost.layer_ms(cost.layers[0][2], layer.gate_values()) == pytest.approx(ms)
        rest = sum(cost.layer_ms(v, m.gate_values()) for _, m, v in cost.layers[1:])
        assert cost.current_ms() == pytest.approx(cost.base_ms + ms + rest)
        assert float(cost.expected_ms().detach()) == pytest.approx(cost.current_ms())
    # from dense, the outermost gate's gradient says it saves the most
    layer.set_gates([1] * k)
    cost.expected_ms().backward()
    grad = layer.gate_latent.grad
    assert grad[0] > grad[-1] > 0
    # the projection's constraint sees the same: gate 0 off saves 1.5 ms, the last gate 1 ms
    c = latency_constraint(cost, 50.0)
    assert c.saved(name, layer, 0) == pytest.approx(1.5) and c.saved(name, layer, k - 1) == pytest.approx(1.0)
    # a table without pattern rows (older) answers contiguous lookups with the permuted time
    old = LatencyTable(meta={"model_ms": 100.0, "batch": 1},
                       rows=[r for r in _pattern_table(model, 0.5).rows if r["pattern"] == "permuted" or r["groups"] == 1])
    assert old.lookup(name, 2, pattern="contiguous") == old.lookup(name, 2) == 7.0
    with pytest.raises(ConfigError, match="pattern must be one of"):
        old.lookup(name, 2, pattern="blocked")


def test_projection_with_a_latency_budget_prefers_contiguous_groups():
    """When contiguous groups are faster by the table, the projection turns the outer gates off, and the
    export has plain grouped convs (no channel gathers)."""
    from nas_grouping.budget import ModelCost
    from nas_grouping.latency.measure import LatencyCost
    from nas_grouping.runtime import Runtime
    from nas_grouping.search.loop import latency_constraint, project_to_budget

    model = searched_net()
    for _, layer in dgconv_layers(model):
        layer.set_groups(1)
    cost = LatencyCost(model, _pattern_table(model, 2.0))
    budget_ms = cost.dense_ms - 3 * len(cost.layers)
    x = torch.randn(8, 1, 8, 8)
    project_to_budget(model, ModelCost(model, (1, 8, 8)), count_macs(model, (1, 8, 8)), [(x, torch.arange(8) % 10)],
                      Runtime(torch.device("cpu")), extra=[latency_constraint(cost, budget_ms)])
    assert cost.current_ms() <= budget_ms
    exported = export_model(model)
    assert not any(isinstance(m, PermutedGroupConv2d) for m in exported.modules())


def test_keep_freed_memory_applies_once_and_can_be_opted_out(monkeypatch):
    """glibc keeps freed memory after the call (steady CPU timings); NAS_GROUPING_MALLOC=system opts out."""
    import subprocess
    import sys

    code = ("from nas_grouping.latency.timer import keep_freed_memory, freed_memory_kept, machine_info;"
            "print(freed_memory_kept(), keep_freed_memory(), keep_freed_memory(), machine_info()['freed_memory_kept'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    on_glibc = sys.platform.startswith("linux")
    assert out == ["False", str(on_glibc), str(on_glibc), str(on_glibc)]
    monkeypatch.setenv("NAS_GROUPING_MALLOC", "system")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False", "False"]


def _measured_loop(measure, budget_ms: float, macs_share: float = 1.0, **kw):
    """project_to_measured_latency on the small net with the pattern table; returns (model, cost, report)."""
    from nas_grouping.budget import ModelCost
    from nas_grouping.latency.measure import LatencyCost
    from nas_grouping.runtime import Runtime
    from nas_grouping.search.loop import project_to_measured_latency

    model = searched_net()
    for _, layer in dgconv_layers(model):
        layer.set_groups(1)
    cost = LatencyCost(model, _pattern_table(model, 0.5))
    x = torch.randn(8, 1, 8, 8)
    budget_macs = int(macs_share * count_macs(model, (1, 8, 8)))
    report = project_to_measured_latency(
        model, ModelCost(model, (1, 8, 8)), budget_macs, [(x, torch.arange(8) % 10)], Runtime(torch.device("cpu")),
        cost, budget_ms, lambda m: measure(cost), reference_ms=measure(cost), **kw)
    return model, cost, report


def test_measured_latency_loop_corrects_a_table_that_is_off():
    """The table says 100 ms dense, the machine runs the searched layers 2x faster than the table and the
    rest in 20 ms: the loop meets the *measured* budget, close under it, where the table's own target would
    have pruned much further."""
    def measure(cost):
        return 20.0 + 0.5 * (cost.current_ms() - cost.base_ms)

    model, cost, report = _measured_loop(measure, budget_ms=40.0)
    assert report["met"] and report["measured_ms"] <= 40.0
    assert report["measured_ms"] >= 40.0 * 0.9  # not pruned far beyond the budget
    assert report["measured_ms"] == pytest.approx(measure(cost))  # the model is left at the reported try
    assert 1 <= len(report["tries"]) <= 4
    # trusting the table (budget 40 ms of its 100 ms dense) would have meant a 20 ms table target: all gates off
    assert report["predicted_ms"] > 40.0


def test_measured_latency_loop_out_of_reach_keeps_the_fastest_and_says_so():
    def measure(cost):
        return 50.0 + cost.current_ms()

    model, cost, report = _measured_loop(measure, budget_ms=60.0)
    assert not report["met"]
    assert report["measured_ms"] == min(t["measured_ms"] for t in report["tries"])
    assert report["measured_ms"] == pytest.approx(measure(cost))
    # the table's fastest is reached, and nothing is tried twice once the target cannot move
    assert report["predicted_ms"] == pytest.approx(cost.minimum_ms) and len(report["tries"]) <= 2


def test_measured_latency_loop_respects_the_mac_budget_and_a_loose_latency_budget():
    def measure(cost):
        return cost.current_ms()

    model, cost, report = _measured_loop(measure, budget_ms=1e6, macs_share=0.5)
    assert report["met"] and len(report["tries"]) == 1
    dense = get_space("digits_convnet", dense=True, **SMALL)
    assert count_macs(model, (1, 8, 8)) <= 0.5 * count_macs(dense, (1, 8, 8))


def test_measured_latency_times_the_export_against_the_reference():
    from nas_grouping.latency.measure import MeasuredLatency

    dense = get_space("digits_convnet", dense=True, **SMALL).eval()
    measure = MeasuredLatency(dense, (1, 8, 8), batch=2, repeats=2, warmup=1)
    ref = measure.reference_ms
    assert ref > 0 and measure.reference_ms == ref  # measured once
    ms = measure(searched_net())
    assert ms > 0 and measure.calls == 1
    exported = measure.export(searched_net())
    assert getattr(exported, "nas_grouping_layout", None) in ("nchw", "channels_last")


def test_search_with_a_measured_latency_budget_closes_the_loop(tmp_path):
    """--latency-measured: the budget is a share of the dense model's measured latency, and the final
    projection measures its tries; the report carries every try, and the chosen one is the least pruned
    that met the budget when measured (or the fastest, flagged not met)."""
    from nas_grouping.config import SearchConfig
    from nas_grouping.data import DataConfig
    from nas_grouping.search.loop import search

    cfg = SearchConfig(space="digits_convnet", space_kwargs=SMALL, epochs=2, warmup_epochs=1, finetune_epochs=1,
                       budget=0.9, latency_budget="0.8", latency_measured=True, progress=False,
                       measure_latency=False, out=str(tmp_path / "run"), data=DataConfig(batch_size=128))
    s = search(cfg).summary
    loop = s["latency_measured_loop"]
    assert 1 <= len(loop["tries"]) <= 4 and loop["reference_ms"] > 0
    assert loop["budget_ms"] == pytest.approx(0.8 * loop["reference_ms"])
    assert loop["met"] == (loop["measured_ms"] <= loop["budget_ms"])
    met = [t["measured_ms"] for t in loop["tries"] if t["met"]]
    assert loop["measured_ms"] == (max(met) if met else min(t["measured_ms"] for t in loop["tries"]))
    assert s["budget_met"]  # the MAC budget holds whatever the latency does
    assert s["latency_budget_ms"] == loop["budget_ms"] and s["latency_budget_met_measured"] == loop["met"]
    assert s["latency_table_budget_ms"] == pytest.approx(loop["budget_ms"] * loop["table_dense_ms"] / loop["reference_ms"])
    with pytest.raises(ConfigError, match="give --latency-budget"):
        SearchConfig(latency_measured=True)
    from nas_grouping.report import format_summary

    assert f"after {len(loop['tries'])} measured projection(s)" in format_summary(s)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["latency_loop"]["tries"] == loop["tries"]  # a resumed run reports the same loop


def test_meet_measured_budget_secant_and_conflicts():
    """The search on measurements alone: a machine where time = 0.5 x table + 10 converges under the budget;
    targets another budget forbids are climbed out of, and a try that met the budget is not forgotten after
    a conflict; when every target conflicts, the model without a latency target is measured."""
    from nas_grouping import BudgetError
    from nas_grouping.latency.measure import meet_measured_budget

    def machine(target):
        return {"measured_ms": 0.5 * target + 10, "_reached": target, "stuck": False}

    best, tried = meet_measured_budget(machine, 40.0, table_dense_ms=100.0, reference_ms=60.0, floor=5.0)
    assert best["met"] and 38.0 <= best["measured_ms"] <= 40.0 and len(tried) <= 4
    assert "_reached" in best and not any("_reached" in t for t in tried)

    def forbidden_under_70(target):
        if target < 70:
            raise BudgetError("the MAC budget needs more")
        return machine(target)

    best, tried = meet_measured_budget(forbidden_under_70, 40.0, table_dense_ms=100.0, reference_ms=60.0, floor=5.0,
                                       tries=6)
    assert tried and all(t["table_target_ms"] >= 70 for t in tried)
    assert not best["met"] and best["measured_ms"] == min(t["measured_ms"] for t in tried)

    def curved(target):  # forbidden under 12; time = (target / 100)^2 x 95 ms: bent, so regula falsi alone crawls
        if target is not None and target < 12:
            raise BudgetError("no")
        return {"measured_ms": (target / 100) ** 2 * 95.0, "_reached": target, "stuck": False}

    best, tried = meet_measured_budget(curved, 23.75, table_dense_ms=100.0, reference_ms=95.0, floor=0.0, tries=6)
    assert best["met"] and best["measured_ms"] >= 23.75 * 0.95  # the exact answer: a target of 50

    def always_forbidden(target):
        if target is not None:
            raise BudgetError("no")
        return {"measured_ms": 50.0, "_reached": None, "stuck": False}

    best, tried = meet_measured_budget(always_forbidden, 40.0, table_dense_ms=100.0, reference_ms=60.0, floor=5.0)
    assert best["table_target_ms"] is None and not best["met"] and len(tried) == 1
