"""The hybrid of channels and groups held to a measured latency budget: the public job and its command."""

from __future__ import annotations

import json

import pytest
import torch

from nas_grouping import ConfigError, load_model, save_model
from nas_grouping.cli import main
from nas_grouping.macs import count_macs
from nas_grouping.pipeline.hybrid import HybridConfig
from search_spaces import get_space

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = {"widths": [8, 8, 16, 16, 16, 16]}


@pytest.fixture
def saved_dense(tmp_path):
    torch.manual_seed(0)
    return save_model(get_space("digits_convnet", dense=True, **SMALL).eval(), tmp_path / "dense")


def test_hybrid_command_writes_a_smaller_model_a_measured_summary_and_refuses_to_overwrite(saved_dense, tmp_path,
                                                                                           capsys):
    out = tmp_path / "run"
    rc = main(["hybrid", "--model", str(saved_dense), "--latency-budget", "0.7", "--repeats", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["choice"] in ("groups alone", "pruned channels", "pruned channels and groups")
    assert summary["macs"] <= 0.7 * summary["dense_macs"] and summary["fine_tuned"] is False
    assert summary["dense_ms"] > 0 and summary["speedup"] == pytest.approx(summary["dense_ms"] / summary["ms"])
    assert f"{summary['macs']:,}" in printed and "fine-tune" in printed
    model = load_model(out / "model")
    assert count_macs(model, (1, 8, 8)) == summary["macs"]
    assert torch.isfinite(model(torch.randn(2, 1, 8, 8))).all()
    assert main(["report", str(out)]) == 0 and summary["choice"] in capsys.readouterr().out
    assert main(["hybrid", "--model", str(saved_dense), "--latency-budget", "0.7", "--out", str(out)]) == 2
    assert "already holds a finished hybrid run" in capsys.readouterr().err


def test_hybrid_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="--latency-budget"):
        HybridConfig(model="m")
    with pytest.raises(ConfigError, match="--model"):
        HybridConfig(latency_budget="0.5")
    with pytest.raises(ConfigError, match="latency budget"):
        HybridConfig(model="m", latency_budget="fast")
    with pytest.raises(ConfigError, match="C,H,W"):
        HybridConfig(model="m", latency_budget="0.5", input_size="3x32")
    assert HybridConfig(model="m", latency_budget=0.5, input_size="3,32,32").input_size == [3, 32, 32]
