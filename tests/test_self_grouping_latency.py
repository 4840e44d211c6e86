"""Latency budgets of the self-grouping pass: the profiled table, the per-layer fit, and compress with one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas_grouping import BudgetError, CompressConfig, ConfigError, SelfGrouping, save_model
from nas_grouping.self_grouping.latency import PASS_NAME, fit_latency, profile_self_grouping
from nas_grouping.pipeline.compress import compress
from nas_grouping.config import SelfGroupingConfig
from nas_grouping.data import DataConfig
from nas_grouping.latency.measure import LatencyDeviceWarning, LatencyTable
from nas_grouping.macs import count_macs

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = (3, 8, 8)


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.a = nn.Conv2d(width, width, 3, padding=1)
        self.b = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = F.relu(self.a(F.relu(self.stem(x))))
        return self.fc(F.relu(self.b(x)).mean((2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def _cfg(**kw) -> SelfGroupingConfig:
    return SelfGroupingConfig(**{"clusters": 2, "kmeans_restarts": 1, "progress": False, **kw})


def _table(curves: dict[str, list[tuple[float, float]]], model_ms: float, batch: int = 1) -> LatencyTable:
    rows = [{"layer": name, "fraction": f, "form": "grouped", "ms": ms} for name, c in curves.items() for f, ms in c]
    return LatencyTable(meta={"pass": PASS_NAME, "batch": batch, "input_size": list(SIZE), "model_ms": model_ms,
                              "layout": "nchw", "device": "test"}, rows=rows)


def test_profile_has_every_prunable_layer_at_every_fraction_up_to_its_cap(tmp_path):
    model = _net()
    cfg = _cfg()
    table = profile_self_grouping(model, SIZE, cfg, fractions=(0.5, 0.75), repeats=2, warmup=1)
    assert table.meta["pass"] == PASS_NAME and table.meta["batch"] == 1 and table.meta["input_size"] == list(SIZE)
    assert table.meta["model_ms"] > 0 and table.meta["layout"] in ("nchw", "channels_last")
    assert {r["layer"] for r in table.rows} == {"a", "b", "fc"}  # stem: skip_first
    assert table.curve("a", "fraction")[0][0] == 0.0
    assert [f for f, _ in table.curve("a", "fraction")] == [0.0, 0.5, 0.75, cfg.max_fraction]
    assert [f for f, _ in table.curve("fc", "fraction")] == [0.0, 0.5, cfg.linear_max_fraction]
    assert {r["form"] for r in table.rows if r["fraction"] == 0} == {"input"}
    assert {r["form"] for r in table.rows if r["layer"] == "a" and r["fraction"] == 0.5} == {
        "grouped", "per_group", "dense"}
    assert all(r["ms"] > 0 for r in table.rows)
    loaded = LatencyTable.load(table.save(tmp_path / "t.json"))
    assert loaded.curve("b", "fraction") == table.curve("b", "fraction")
    with pytest.raises(ConfigError, match="fractions"):
        profile_self_grouping(model, SIZE, cfg, fractions=(0.0, 0.5))


def test_fit_raises_the_layer_that_buys_most_latency_per_mac_and_leaves_slow_ones_alone():
    model = _net()
    plan = SelfGrouping(_cfg(fraction=0.0)).plan(model, SIZE)
    macs = {lp.name: lp.macs for lp in plan.prunable}
    # a: grouping never faster; b: fast at 0.5; fc: a little faster
    curves = {"a": [(0, 1.0), (0.5, 1.2), (0.95, 1.1)], "b": [(0, 2.0), (0.5, 1.0), (0.95, 0.9)],
              "fc": [(0, 0.5), (0.5, 0.45), (0.6, 0.44)]}
    table = _table(curves, model_ms=4.0)  # base = 4 - 3.5 = 0.5
    fitted = fit_latency(plan, table, "3.2ms")
    by = {lp.name: lp for lp in fitted.layers}
    assert not by["a"].prune and "latency budget holds" in by["a"].reason
    assert by["b"].prune and by["b"].fraction == 0.5 and by["b"].predicted_ms == pytest.approx(1.0)
    assert not by["fc"].prune
    assert fitted.latency["predicted_ms"] == pytest.approx(0.5 + 1.0 + 1.0 + 0.5)
    assert fitted.latency["base_ms"] == pytest.approx(0.5) and fitted.latency["budget_ms"] == 3.2
    assert fitted.macs_after == plan.macs - (macs["b"] - by["b"].macs_after)
    # a share of the input model's measured latency
    assert fit_latency(plan, table, 0.8).latency["budget_ms"] == pytest.approx(3.2)
    # tighter: b moves on to 0.95, then fc; a still never
    tight = {lp.name: lp for lp in fit_latency(plan, table, "2.9ms").layers}
    assert tight["b"].fraction == 0.95 and not tight["a"].prune
    with pytest.raises(BudgetError, match="predicted at 2.840 ms"):
        fit_latency(plan, table, "2.5ms")


def test_fit_keeps_a_mac_budget_met_and_checks_the_table():
    model = _net()
    cfg = _cfg(budget=0.6)
    plan = SelfGrouping(cfg).plan(model, SIZE)
    curves = {"a": [(0, 1.0), (0.5, 0.6), (0.95, 0.3)], "b": [(0, 1.0), (0.5, 0.6), (0.95, 0.3)],
              "fc": [(0, 0.5), (0.6, 0.5)]}
    fitted = fit_latency(plan, _table(curves, model_ms=3.0), "1.7ms")
    assert fitted.macs_after <= plan.budget_macs
    before = {lp.name: lp.fraction for lp in plan.prunable}
    assert all(lp.fraction >= before[lp.name] for lp in fitted.prunable)
    with pytest.raises(ConfigError, match="another model"):
        fit_latency(plan, _table({"a": curves["a"]}, model_ms=3.0), "1.7ms")
    other = _table(curves, 3.0)
    other.meta["pass"] = "search"
    with pytest.raises(ConfigError, match="not made for the self-grouping pass"):
        fit_latency(plan, other, "1.7ms")


def test_plan_with_a_latency_budget_uses_the_given_table_and_checks_batch_and_size(tmp_path):
    model = _net()
    curves = {"a": [(0, 1.0), (0.5, 0.5)], "b": [(0, 1.0), (0.5, 0.5)], "fc": [(0, 0.1), (0.6, 0.1)]}
    table = _table(curves, model_ms=2.5)
    sg = SelfGrouping(_cfg(latency_budget="2.0ms"))
    plan = sg.plan(model, SIZE, latency_table=table)
    assert plan.latency["predicted_ms"] <= 2.0 and len(plan.prunable) == 1
    assert "predicted" in plan.describe()
    small = sg.apply(model, SIZE, plan=plan)
    assert count_macs(small, SIZE) <= plan.macs_after < plan.macs
    path = table.save(tmp_path / "t.json")
    with pytest.warns(LatencyDeviceWarning, match="measured elsewhere"):
        again = SelfGrouping(_cfg(latency_budget="2.0ms", latency_table=str(path))).plan(model, SIZE)
    assert again.latency == plan.latency
    with pytest.raises(ConfigError, match="batch"):
        SelfGrouping(_cfg(latency_budget="2.0ms", latency_batch=4)).plan(model, SIZE, latency_table=table)
    with pytest.raises(ConfigError, match="input"):
        SelfGrouping(_cfg(latency_budget="2.0ms")).plan(model, (3, 16, 16), latency_table=table)


def test_config_checks_the_latency_budget():
    assert _cfg(latency_budget="2ms").target_fraction == 0.0
    assert _cfg(latency_budget=0.5, fraction=0.25).target_fraction == 0.25
    with pytest.raises(ConfigError, match="latency budget"):
        _cfg(latency_budget="fast")
    with pytest.raises(ConfigError, match="latency budget"):
        _cfg(latency_budget=1.5)
    with pytest.raises(ConfigError, match="per-layer"):
        _cfg(latency_budget=0.5, fraction={"a": 0.5})
    with pytest.raises(ConfigError, match="latency_batch"):
        _cfg(latency_batch=0)


@pytest.mark.slow
def test_compress_with_a_latency_budget_reports_prediction_and_measurement_and_resumes(tmp_path):
    from search_spaces import get_space

    torch.manual_seed(0)
    folder = tmp_path / "saved"
    save_model(get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16], dense=True), folder)
    cfg = CompressConfig(model=str(folder), grouping=_cfg(latency_budget="1000ms", fraction=0.25, epochs=1),
                         data=DataConfig(batch_size=128), latency_batches=[1], latency_repeats=2,
                         out=str(tmp_path / "run"))
    result = compress(cfg)
    s, run = result.summary, tmp_path / "run"
    assert (run / "latency_table.json").is_file()
    assert s["latency_budget_ms"] == 1000 and s["latency_measured_ms"] > 0 and s["latency_budget_met_measured"]
    assert s["latency_prediction_error"] == pytest.approx(
        (s["latency_predicted_ms"] - s["latency_measured_ms"]) / s["latency_measured_ms"])
    assert s["export_choice"]["layout"] in ("nchw", "channels_last") and s["export_choice"]["forms"]
    saved_arch = json.loads((run / "model" / "architecture.json").read_text())
    assert saved_arch.get("layout") == s["export_choice"]["layout"]
    table = (run / "latency_table.json").read_text()
    compress(cfg, resume=True)
    assert (run / "latency_table.json").read_text() == table  # the plan is made again from the run's own table


def test_profile_command_for_the_pass_and_its_errors(tmp_path, capsys):
    from nas_grouping.cli import main

    from search_spaces import get_space

    folder = tmp_path / "saved"
    torch.manual_seed(0)
    save_model(get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16], dense=True), folder)
    out = tmp_path / "sg.json"
    assert main(["profile", "--pass", "self-grouping", "--model", str(folder), "--input-size", "1", "8", "8",
                 "--clusters", "2", "--repeats", "1", "--fractions", "0.5", "--out", str(out)]) == 0
    table = LatencyTable.load(out)
    assert table.meta["pass"] == PASS_NAME and table.meta["settings"]["clusters"] == 2
    assert table.meta["input_size"] == [1, 8, 8] and len({r["layer"] for r in table.rows}) >= 5
    assert all({f for f, _ in table.curve(layer, "fraction")} <= {0.0, 0.5, 0.6, 0.95}
               for layer in {r["layer"] for r in table.rows})
    assert "for the self-grouping" in capsys.readouterr().out
    assert main(["profile", "--pass", "self-grouping", "--model", str(folder), "--out", str(out)]) == 2
    assert "--input-size" in capsys.readouterr().err
    assert main(["profile", "--pass", "self-grouping", "--model", str(tmp_path / "none"), "--input-size", "3", "8",
                 "8", "--out", str(out)]) == 2
    assert "no saved model" in capsys.readouterr().err
    assert main(["profile", "--pass", "self-grouping", "--space", "digits_convnet", "--fractions", "0.5,2",
                 "--out", str(out)]) == 2
    assert "fractions" in capsys.readouterr().err
    assert main(["profile", "--pass", "self-grouping", "--space", "digits_convnet", "--fractions", "half",
                 "--out", str(out)]) == 2
    assert "--fractions" in capsys.readouterr().err


def test_measured_latency_budget_builds_measures_and_corrects_the_table(monkeypatch):
    """latency_measured: each try of the table's fractions is built and measured; here a fake machine runs
    0.5 ms + 2 ms x (MACs share), so a budget of 0.8 x 2.5 ms needs about 3/4 of the MACs, whatever the table says."""
    import nas_grouping.latency.measure as latency_module

    model = _net()
    dense_macs = count_macs(model, SIZE)

    class Machine:
        def __init__(self, reference, size, *, batch=1, **kw):
            self.reference_ms = 2.5

        def __call__(self, m):
            return 0.5 + 2.0 * count_macs(m, SIZE) / dense_macs

    monkeypatch.setattr(latency_module, "MeasuredLatency", Machine)
    curves = {"a": [(0, 1.0), (0.25, 0.8), (0.5, 0.5), (0.75, 0.3)], "b": [(0, 1.0), (0.25, 0.8), (0.5, 0.5),
                                                                          (0.75, 0.3)], "fc": [(0, 0.1), (0.6, 0.1)]}
    sg = SelfGrouping(_cfg(latency_budget="0.8", latency_measured=True))
    plan = sg.plan(model, SIZE, latency_table=_table(curves, model_ms=2.5))
    lat = plan.latency
    assert lat["measured_budget_ms"] == pytest.approx(2.0) and 1 <= len(lat["measured_tries"]) <= 4
    assert lat["measured_met"] and lat["measured_ms"] <= 2.0
    small = sg.apply(model, SIZE, plan=plan)
    assert 0.5 + 2.0 * count_macs(small, SIZE) / dense_macs == pytest.approx(lat["measured_ms"])
    assert "NOT met" not in plan.describe() and "measured at batch 1" in plan.describe()


def test_measured_latency_budget_on_this_machine_reports_what_it_measured():
    model = _net()
    plan = SelfGrouping(_cfg(latency_budget="0.9", latency_measured=True)).plan(model, SIZE)
    lat = plan.latency
    assert lat["reference_ms"] > 0 and lat["measured_budget_ms"] == pytest.approx(0.9 * lat["reference_ms"])
    assert lat["measured_met"] == (lat["measured_ms"] <= lat["measured_budget_ms"])
    assert lat["measured_ms"] in [t["measured_ms"] for t in lat["measured_tries"]]
    with pytest.raises(ConfigError, match="give --latency-budget"):
        _cfg(latency_measured=True)


def test_compress_with_a_measured_latency_budget_reports_the_loop(tmp_path):
    from search_spaces import get_space

    torch.manual_seed(0)
    folder = tmp_path / "saved"
    save_model(get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16], dense=True), folder)
    cfg = CompressConfig(model=str(folder), grouping=_cfg(latency_budget="0.95", latency_measured=True, epochs=1),
                         data=DataConfig(batch_size=128), latency_batches=[1], latency_repeats=2,
                         out=str(tmp_path / "run"))
    s = compress(cfg).summary
    loop = s["latency_measured_loop"]
    assert s["latency_budget_ms"] == pytest.approx(0.95 * loop["reference_ms"]) and loop["measured_tries"]
    # met or not by the ratio to the input model timed beside the compressed one (the per-layer report's clock)
    import pandas as pd

    whole = pd.read_csv(tmp_path / "run" / "latency_layers.csv").set_index("layer").loc["(whole model)"]
    assert s["latency_budget_met_measured"] == bool(whole["exported_ms_b1"] / whole["dense_ms_b1"] <= 0.95)
    assert (tmp_path / "run" / "latency_measured.json").is_file()
    again = compress(cfg, resume=True).summary  # the saved fit is reused: the same plan, nothing measured again
    assert again["latency_measured_loop"] == loop
