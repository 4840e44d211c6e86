"""Per-layer latency of a dense and an exported model: rows, MACs, arithmetic, predictions, files, search wiring."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest
import torch
from torch import nn

from nas_grouping import ConfigError, count_macs, dgconv_layers, export_model
from nas_grouping.latency.layers import (LAYOUTS, REST, WHOLE, _capture_inputs, _timed_layers, layer_latency,
                                        summary_from_layers, write_layer_latency)
from nas_grouping.latency.measure import LatencyDeviceWarning
from nas_grouping.ops.group_conv import PermutedGroupConv2d
from search_spaces import get_space

from helpers import halving_table

SMALL = {"widths": [8, 8, 16, 16, 16, 16]}
SIZE = (1, 8, 8)
FAST = {"repeats": 3, "warmup": 1}

pytestmark = pytest.mark.usefixtures("single_thread")


def pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A dense digits net and an exported one with random groups (same layer names)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    searched = get_space("digits_convnet", **SMALL)
    for _, layer in dgconv_layers(searched):
        layer.set_gates([rng.randint(0, 1) for _ in range(layer.num_gates)])
    exported = export_model(searched.eval())
    grouped = [m for m in exported.modules() if isinstance(m, PermutedGroupConv2d)]
    grouped[0].form = "dense"  # both exact forms get timed
    return get_space("digits_convnet", dense=True, **SMALL).eval(), exported


class Tiny(nn.Module):
    """Two convs and a classifier; ``grouped`` swaps the second conv, ``proj`` adds a 1x1 conv;
    ``unused`` never runs."""

    def __init__(self, *, grouped: bool = False, proj: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = PermutedGroupConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=2)) if grouped else \
            nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1) if proj else None
        self.unused = nn.Linear(3, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        if self.proj is not None:
            h = h + self.proj(h)
        return self.fc(h.mean((2, 3)))


def layer_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df["layer"].isin([WHOLE, REST])]


@pytest.fixture(scope="module")
def measured(single_thread):
    dense, exported = pair()
    df = layer_latency(dense, exported, SIZE, batches=(1, 2), **FAST)
    return dense, exported, df


def test_columns_rows_and_names_match_both_models(measured):
    dense, exported, df = measured
    base = ["layer", "dense_kind", "exported_kind", "form", "dense_macs", "exported_macs"]
    assert list(df.columns) == base + [f"{c}_b{b}" for b in (1, 2) for c in ("dense_ms", "exported_ms", "speedup")]
    names = list(_timed_layers(dense))
    assert names == list(_timed_layers(exported)) and len(names) == 7
    assert list(df["layer"]) == names + [WHOLE, REST]
    rows = layer_rows(df).set_index("layer")
    for name in names:
        assert rows.loc[name, "dense_kind"] == type(dense.get_submodule(name)).__name__
        layer = exported.get_submodule(name)
        assert rows.loc[name, "exported_kind"] == type(layer).__name__
        if isinstance(layer, PermutedGroupConv2d):
            assert rows.loc[name, "form"] == layer.form
    assert set(rows["form"].dropna()) == {"grouped", "dense"}  # the inner conv is not a row of its own
    assert not any(n.endswith(".conv") for n in df["layer"])


def test_times_are_positive_and_speedups_are_ratios(measured):
    _, _, df = measured
    for b in (1, 2):
        body = df[df["layer"] != REST]
        for side in ("dense", "exported"):
            col = body[f"{side}_ms_b{b}"]
            assert col.map(math.isfinite).all() and (col > 0).all()
        assert df[f"speedup_b{b}"].to_numpy() == pytest.approx(
            (df[f"dense_ms_b{b}"] / df[f"exported_ms_b{b}"]).to_numpy())


def test_macs_are_count_macs_per_layer_and_in_total(measured):
    dense, exported, df = measured
    rows = layer_rows(df)
    assert int(rows["exported_macs"].sum()) == count_macs(exported, SIZE)
    assert int(rows["dense_macs"].sum()) == count_macs(dense, SIZE)
    whole = df.set_index("layer").loc[WHOLE]
    assert int(whole["exported_macs"]) == count_macs(exported, SIZE) < int(whole["dense_macs"])
    assert int(df.set_index("layer").loc[REST, "exported_macs"]) == 0


def test_rest_is_whole_minus_the_layers(measured):
    _, _, df = measured
    idx = df.set_index("layer")
    for b in (1, 2):
        for side in ("dense", "exported"):
            col = f"{side}_ms_b{b}"
            assert idx.loc[REST, col] == pytest.approx(idx.loc[WHOLE, col] - layer_rows(df)[col].sum())


def test_attrs_record_where_and_how_it_was_measured(measured):
    _, _, df = measured
    a = df.attrs
    assert a["threads"] == torch.get_num_threads() == 1 and a["torch"] == torch.__version__
    assert a["device"].startswith("cpu") and a["batches"] == [1, 2] and a["input_size"] == [1, 8, 8]
    for b in (1, 2):
        assert set(a["layouts"][f"b{b}"]) == {"dense", "exported"}
        assert set(a["layouts"][f"b{b}"].values()) <= set(LAYOUTS)
    summary = summary_from_layers(df)
    whole = df.set_index("layer").loc[WHOLE]
    assert summary["batch_2"]["exported_ms"] == whole["exported_ms_b2"]
    assert summary["batch_1"]["exported_layout"] == a["layouts"]["b1"]["exported"]


def test_layers_in_one_model_only_get_nan_on_the_other_side():
    torch.manual_seed(0)
    df = layer_latency(Tiny(), Tiny(grouped=True, proj=True), (3, 6, 6), batches=(1,), **FAST)
    assert list(df["layer"]) == ["c1", "c2", "fc", "proj", WHOLE, REST]  # "unused" never runs
    idx = df.set_index("layer")
    assert idx.loc["c2", "exported_kind"] == "PermutedGroupConv2d" and idx.loc["c2", "dense_kind"] == "Conv2d"
    assert idx.loc["c2", "form"] == "grouped"
    assert pd.isna(idx.loc["proj", "dense_kind"]) and pd.isna(idx.loc["proj", "dense_ms_b1"])
    assert pd.isna(idx.loc["proj", "dense_macs"]) and pd.isna(idx.loc["proj", "speedup_b1"])
    assert idx.loc["proj", "exported_ms_b1"] > 0 and idx.loc["proj", "exported_macs"] == 8 * 8 * 36
    assert idx.loc[REST, "dense_ms_b1"] == pytest.approx(
        idx.loc[WHOLE, "dense_ms_b1"] - idx.loc[["c1", "c2", "fc"], "dense_ms_b1"].sum())


def test_predicted_columns_and_their_error():
    dense, exported = pair(1)
    name = next(n for n, _ in dgconv_layers(get_space("digits_convnet", **SMALL)))
    df = layer_latency(dense, exported, SIZE, batches=(1, 2), predicted={name: 0.01, WHOLE: 0.5},
                       predicted_batch=2, **FAST)
    assert df.columns[-2:].tolist() == ["predicted_ms_b2", "prediction_error_b2"]
    idx = df.set_index("layer")
    assert idx.loc[name, "predicted_ms_b2"] == 0.01 and idx.loc[WHOLE, "predicted_ms_b2"] == 0.5
    assert idx["predicted_ms_b2"].notna().sum() == 2 and idx["prediction_error_b2"].notna().sum() == 2
    for row in (name, WHOLE):
        measured = idx.loc[row, "exported_ms_b2"]
        assert idx.loc[row, "prediction_error_b2"] == pytest.approx((idx.loc[row, "predicted_ms_b2"] - measured)
                                                                    / measured)
    assert df.attrs["predicted_batch"] == 2
    with pytest.raises(ConfigError, match="predicted_batch 4"):
        layer_latency(dense, exported, SIZE, batches=(1,), predicted={name: 1.0}, predicted_batch=4)
    with pytest.raises(ConfigError, match="no_such_layer"):
        layer_latency(dense, exported, SIZE, batches=(1,), predicted={"no_such_layer": 1.0})


@pytest.mark.parametrize("kwargs, match", [
    ({"batches": ()}, "batches"),
    ({"batches": (1, 0)}, "batches"),
    ({"batches": ("x",)}, "batches"),
    ({"input_size": (0, 8, 8)}, "input_size"),
    ({"input_size": "abc"}, "input_size"),
    ({"input_size": (3, 8, 8)}, "forward pass"),
])
def test_bad_input_is_a_config_error(kwargs, match):
    dense, exported = pair()
    args = {"input_size": SIZE, "batches": (1,), **kwargs}
    with pytest.raises(ConfigError, match=match):
        layer_latency(dense, exported, args.pop("input_size"), **args)


def test_models_without_conv_or_linear_are_refused():
    with pytest.raises(ConfigError, match="no conv or linear|neither model"):
        layer_latency(nn.Sequential(nn.ReLU()), nn.Sequential(nn.Tanh()), (4,), batches=(1,))


def test_inputs_are_captured_before_later_in_place_ops():
    class Clobber(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            out = self.b(h)
            h.zero_()
            return out

    torch.manual_seed(0)
    with torch.inference_mode():
        got = _capture_inputs(Clobber(), ["b"], torch.randn(2, 4))
    assert got["b"].abs().sum() > 0


def test_files_are_written_and_load_back(tmp_path, measured):
    _, _, df = measured
    paths = write_layer_latency(df, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"latency_layers.csv", "latency_layers.json", "latency_layers.png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    back = pd.read_csv(paths["csv"])
    assert list(back.columns) == list(df.columns) and list(back["layer"]) == list(df["layer"])
    assert back["exported_ms_b1"].to_numpy() == pytest.approx(df["exported_ms_b1"].to_numpy())
    data = json.loads(paths["json"].read_text())
    assert data["attrs"]["threads"] == df.attrs["threads"] and data["attrs"]["layouts"] == df.attrs["layouts"]
    assert [r["layer"] for r in data["records"]] == list(df["layer"])
    assert data["records"][0]["form"] is None  # NaN becomes null, not an invalid NaN token
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_search_writes_the_per_layer_latency_with_table_predictions(tmp_path):
    from nas_grouping.config import SearchConfig
    from nas_grouping.data import DataConfig
    from nas_grouping.report import print_run
    from nas_grouping.search.loop import search

    names = [n for n, _ in dgconv_layers(get_space("digits_convnet", **SMALL))]
    table = halving_table(tmp_path / "table.json", SMALL)
    cfg = SearchConfig(space="digits_convnet", space_kwargs=SMALL, epochs=2, warmup_epochs=1, finetune_epochs=0,
                       budget=1.0, latency_budget="0.9", latency_table=str(table), progress=False,
                       measure_latency=True, out=str(tmp_path / "run"), data=DataConfig(batch_size=128))
    with pytest.warns(LatencyDeviceWarning):
        result = search(cfg)
    run = tmp_path / "run"
    for name in ("latency_layers.csv", "latency_layers.json", "latency_layers.png"):
        assert (run / name).is_file(), name
    df = pd.read_csv(run / "latency_layers.csv")
    assert set(names) < set(df["layer"]) and {WHOLE, REST} < set(df["layer"])
    idx = df.set_index("layer")
    groups = result.summary["groups"]
    for n in names:
        assert idx.loc[n, "predicted_ms_b1"] == pytest.approx(1.0 / groups[n])
    assert idx.loc[WHOLE, "predicted_ms_b1"] == pytest.approx(result.summary["latency_predicted_ms"])
    lat = result.summary["latency"]
    assert lat["layers_file"] == "latency_layers.csv"
    assert lat["batch_32"]["exported_ms"] == pytest.approx(idx.loc[WHOLE, "exported_ms_b32"])
    assert result.summary["latency_measured_ms"] == pytest.approx(idx.loc[WHOLE, "exported_ms_b1"])
    assert int(layer_rows(df)["exported_macs"].sum()) == result.summary["macs"]
    text = print_run(run)
    assert "latency_layers.csv" in text and "slowest 5 exported layers at batch 1" in text
