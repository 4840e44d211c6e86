"""`nas-grouping compress`: model sources, the run folder, resume, clear errors, and the benchmark's pieces."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import torch

from nas_grouping import BudgetError, CompressConfig, ConfigError, ExportError, SelfGrouping, load_model, save_model
from nas_grouping.bench.compress import bench_latency, format_latency, masked_reference, pin_fastest_forms
from nas_grouping.cli import build_parser, main
from nas_grouping.pipeline.compress import compress, measure_latency
from nas_grouping.config import SelfGroupingConfig, config_from_args
from nas_grouping.data import DataConfig
from nas_grouping.macs import count_macs

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTHS = [8, 8, 16, 16, 16, 16]
FAST = ["--epochs", "1", "--clusters", "2", "--kmeans-restarts", "1", "--batch-size", "128", "--progress", "false",
        "--latency-batches", "1", "--latency-repeats", "1"]


def _digits_net():
    from search_spaces import get_space

    torch.manual_seed(0)
    return get_space("digits_convnet", widths=WIDTHS, dense=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved dense digits model (random weights: the tests check mechanics, not accuracy)."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    save_model(_digits_net(), folder)
    return folder


def _config(tmp_path, **kw) -> CompressConfig:
    grouping = dict(budget=0.5, clusters=2, kmeans_restarts=1, epochs=1, progress=False)
    grouping.update(kw.pop("grouping", {}))
    base = dict(grouping=SelfGroupingConfig(**grouping), data=DataConfig(batch_size=128), latency_batches=[1, 4],
                latency_repeats=1, out=str(tmp_path / "run"))
    base.update(kw)
    return CompressConfig(**base)


def test_compress_writes_a_complete_run_folder(saved, tmp_path):
    result = compress(_config(tmp_path, model=str(saved)))
    s, run = result.summary, tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "history.csv", "layers.csv", "summary.json"):
        assert (run / name).is_file(), name
    assert s["budget_met"] and s["macs_after"] <= s["budget_macs"] == s["macs_before"] // 2
    assert s["macs_after"] == count_macs(result.model, (1, 8, 8))
    for key in ("val_acc_before", "val_acc_pruned", "val_acc_after"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["reload_max_abs_diff"] < 1e-5 and s["params_after"] < s["params_before"]
    assert [r["batch"] for r in s["speedup"]] == [1, 4] and all(r["speedup"] > 0 for r in s["speedup"])
    assert s["skipped_layers"] == {"features.0": "first layer (reads the model input; skip_first)"}
    layers = pd.read_csv(run / "layers.csv")
    assert {"layer", "clusters", "group_sizes", "kept_connections", "macs_before", "macs_after", "reason"} \
        <= set(layers.columns)
    assert layers["macs_after"].sum() == s["macs_after"] and layers["macs_before"].sum() == s["macs_before"]
    pruned = layers[layers["pruned"]]
    assert (pruned["kind_after"].isin(["DiverseGroupConv2d", "DiverseGroupLinear"])).all()
    assert (pruned["kept_connections"] < pruned["connections_before"]).all()
    with open(run / "layers.csv", newline="") as f:
        text_rows = list(csv.DictReader(f))
    assert all(r["kept_connections"].isdigit() and r["clusters"].isdigit() for r in text_rows if r["pruned"] == "True")
    history = pd.read_csv(run / "history.csv")
    assert list(history["phase"]) == ["input", "pruned", "global"]
    loaded = load_model(run / "model").eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=1e-5, atol=1e-5)
    assert json.loads((run / "summary.json").read_text())["macs_after"] == s["macs_after"]


def test_cli_compress_resume_and_one_line_errors(saved, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["compress", "--model", str(saved), "--fraction", "0.5", *FAST, "--out", out]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "accuracy: before" in printed and "CPU latency at batch 1" in printed
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["compress", "--resume", "--out", out]) == 0, "a finished run resumes from its own config"
    assert main([*args, "--resume", "--lr", "0.5"]) == 2
    assert "other settings" in capsys.readouterr().err
    rc = main(["compress", "--model", str(saved), "--budget", "0.01", *FAST, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be met" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "checkpoint.pt").exists(), "an impossible budget fails before any work"


def test_arch_plus_state_dict_sources(tmp_path):
    model = _digits_net()
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    cfg = _config(tmp_path, arch="digits_convnet", state_dict=str(tmp_path / "ckpt.pt"),
                  arch_kwargs={"widths": WIDTHS}, latency_batches=[], grouping={"finetune": "none"})
    result = compress(cfg)
    assert result.summary["val_acc_pruned"] == result.summary["val_acc_after"]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.original(x), model.eval()(x))
    assert load_model(tmp_path / "run" / "model") is not None


@pytest.mark.slow
def test_torchvision_architecture_by_name(tmp_path, tv_models):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    cfg = _config(tmp_path, arch="resnet18", state_dict=str(tmp_path / "r18.pt"), latency_batches=[],
                  grouping={"finetune": "none", "clusters": "upto:4"})
    result = compress(cfg)
    assert result.summary["budget_met"] and "conv1" in result.summary["skipped_layers"]


def test_bad_sources_are_clear_errors(saved, tmp_path):
    from search_spaces import get_space

    save_model(get_space("digits_convnet", widths=WIDTHS, num_classes=5, dense=True), tmp_path / "five")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00 definitely not torch")
    cases = [
        (dict(arch="digits_convnet", state_dict=str(garbage), arch_kwargs={"widths": WIDTHS}), ExportError,
         "not a readable state dict"),
        (dict(arch="digits_convnet", state_dict=str(tmp_path / "missing.pt")), ExportError, "does not exist"),
        (dict(arch="digits_convnet", state_dict=str(saved / "weights.pt")), ExportError, "does not fit"),
        (dict(arch="no_such_net", state_dict=str(saved / "weights.pt")), ConfigError, "no_such_net"),
        (dict(model=str(tmp_path)), ExportError, "no saved model"),
        (dict(model=str(tmp_path / "five")), ConfigError, r"outputs shape \(1, 5\) but the data set has 10 classes"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            compress(_config(tmp_path, **kwargs))
    assert not (tmp_path / "run").exists(), "errors come before the run folder is written"


def test_search_run_folder_is_a_source_and_its_data_set_is_checked(saved, tmp_path):
    run = tmp_path / "search"
    save_model(load_model(saved), run / "model")
    (run / "config.json").write_text(json.dumps({"data": {"dataset": "cifar10"}}))
    with pytest.raises(ConfigError, match="trained on 'cifar10'"):
        compress(_config(tmp_path, model=str(run)))
    (run / "config.json").write_text(json.dumps({"data": {"dataset": "digits"}}))
    result = compress(_config(tmp_path, model=str(run), latency_batches=[], grouping={"finetune": "none"}))
    assert result.summary["source"] == str(run)


def test_compress_config_and_flags():
    with pytest.raises(ConfigError, match="exactly one model source"):
        CompressConfig()
    with pytest.raises(ConfigError, match="exactly one model source"):
        CompressConfig(model="a", arch="resnet18", state_dict="w.pt")
    with pytest.raises(ConfigError, match="--state-dict"):
        CompressConfig(arch="resnet18")
    with pytest.raises(ConfigError, match="latency_batches"):
        CompressConfig(model="a", latency_batches="1,x")
    with pytest.raises(ConfigError, match="latency_batches"):
        CompressConfig(model="a", latency_batches="[1, 0]")
    assert CompressConfig(model="a", latency_batches="[1, 32]").latency_batches == [1, 32]  # JSON, as lists elsewhere
    args = build_parser().parse_args([
        "compress", "--model", "m", "--budget", "12M", "--clusters", '{"layer3.*": 8, "*": "upto:16"}',
        "--exclude", "layer4.*,fc", "--finetune", "local+global", "--batch-size", "32", "--latency-batches", "1,32"])
    cfg = config_from_args(CompressConfig, args)
    g = cfg.grouping
    assert g.budget == 12e6 and g.fraction is None and g.clusters == {"layer3.*": 8, "*": "upto:16"}
    assert g.exclude == ["layer4.*", "fc"] and g.finetune == "local+global"
    assert cfg.data.batch_size == 32 and cfg.latency_batches == [1, 32] and cfg.model == "m"


def test_masked_reference_and_latency_rows():
    model = _digits_net().eval()
    small = SelfGrouping(fraction=0.5, clusters=2, kmeans_restarts=1).apply(model, (1, 8, 8))
    masked = masked_reference(model, small)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), small(x), rtol=1e-5, atol=1e-5)
    rows = measure_latency({"a": model, "b": small}, (1, 8, 8), [1, 2], repeats=1, warmup=0)
    assert {(r["batch"], r["model"]) for r in rows} == {(1, "a"), (1, "b"), (2, "a"), (2, "b")}
    assert all(r["ms"] == min(r["nchw_ms"], r["channels_last_ms"]) > 0 for r in rows)


def test_benchmark_smoke():
    threads = torch.get_num_threads()
    rows = bench_latency(network="resnet20", width=1, fractions=(0.5,), batch_sizes=(1,), variants=["equal-4"],
                         pinned=["equal-4"], repeats=1, warmup=0, kmeans_restarts=1, threads=1)
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"dense", "equal-4", "equal-4+forms", "masked"}
    assert by_model["dense"]["mac_reduction"] == 1.0 and by_model["masked"]["mac_reduction"] > 1.5
    assert by_model["equal-4"]["mac_reduction"] == by_model["masked"]["mac_reduction"]
    assert by_model["equal-4"]["threads"] == 1 and torch.get_num_threads() == threads
    assert "speed-up" in format_latency(rows)
    with pytest.raises(ConfigError, match="unknown benchmark variant"):
        bench_latency(variants=["nope"])


def test_pinned_forms_keep_outputs_and_are_saved(tmp_path):
    model = _digits_net().eval()
    small = SelfGrouping(fraction=0.5, clusters=2, kmeans_restarts=1).apply(model, (1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = small(x)
    chosen = pin_fastest_forms(small, (1, 8, 8), 4, repeats=1, warmup=0)
    assert chosen and set(chosen.values()) <= {"grouped", "per_group", "dense"}
    assert all(small.get_submodule(n).form == f for n, f in chosen.items())
    save_model(small, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert all(loaded.get_submodule(n).form == f for n, f in chosen.items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-5)


def test_budget_error_mentions_the_numbers(saved, tmp_path):
    with pytest.raises(BudgetError, match=r"cannot be met.*\d"):
        compress(_config(tmp_path, model=str(saved), grouping={"budget": 0.02}))


def test_channel_pruning_before_self_grouping_keeps_budgets_shares_of_the_input(saved, tmp_path):
    result = compress(_config(tmp_path, model=str(saved), channels=0.5))
    s, run = result.summary, tmp_path / "run"
    c = s["channel_pruning"]
    assert c["share"] == 0.5 and c["sets"] > 0 and c["macs_after_channels"] < s["macs_before"]
    # the MAC budget is half of the input model's MACs, not of the channel-pruned model's
    assert s["budget_macs"] == s["macs_before"] // 2 and s["budget_met"] and s["macs_after"] <= s["budget_macs"]
    assert 0 <= s["val_acc_before"] <= 1 and 0 <= s["val_acc_channels"] <= 1
    assert s["reload_max_abs_diff"] < 1e-5, "the saved model keeps the pruned widths"
    widths = json.loads((run / "model" / "architecture.json").read_text())["widths"]
    assert widths and all(isinstance(v, list) for v in widths.values())
    assert (run / "channels.json").is_file()
    again = compress(_config(tmp_path, model=str(saved), channels=0.5), resume=True).summary
    assert again["channel_pruning"]["macs_after_channels"] == c["macs_after_channels"]


def test_channels_auto_meets_a_measured_latency_budget_by_measurement(saved, tmp_path):
    cfg = _config(tmp_path, model=str(saved), channels="auto",
                  grouping=dict(budget=None, latency_budget="0.9", latency_measured=True, epochs=1,
                                clusters="upto:2"))  # the share is measured: layers may keep a single filter
    s = compress(cfg).summary
    c = s["channel_pruning"]
    assert c["input_ms"] > 0 and c["search"] is not None and 0 <= c["share"] < 1
    assert c["search"]["met"] == (c["search"]["measured_ms"] <= 0.9 * c["input_ms"])
    # the pass's latency budget is 0.9 of the *input* model's measured latency
    assert s["latency_budget_ms"] == pytest.approx(0.9 * c["input_ms"], rel=1e-6)
    saved_record = json.loads((tmp_path / "run" / "channels.json").read_text())
    assert saved_record["share"] == c["share"]


def test_channels_setting_is_checked():
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        CompressConfig(model="m", channels=1.2)
    with pytest.raises(ConfigError, match="auto"):
        CompressConfig(model="m", channels="lots")
    with pytest.raises(ConfigError, match="--latency-measured"):
        CompressConfig(model="m", channels="auto")
    assert CompressConfig(model="m", channels="0.25").channels == 0.25


def test_channels_with_a_measured_budget_in_ms_is_judged_against_the_input_model(saved, tmp_path):
    cfg = _config(tmp_path, model=str(saved), channels=0.25,
                  grouping=dict(budget=None, latency_budget="50ms", latency_measured=True, epochs=1,
                                clusters="upto:2"))
    s = compress(cfg).summary
    assert s["channel_pruning"]["input_ms"] > 0
    assert s["latency_budget_ms"] == pytest.approx(50.0) and s["latency_budget_met_measured"]
    with pytest.raises(ConfigError, match="latency-table"):
        _config(tmp_path, model=str(saved), channels=0.25,
                grouping=dict(latency_budget="0.5", latency_table="t.json"))
