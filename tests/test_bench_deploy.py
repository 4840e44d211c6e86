"""`nas-grouping bench deploy`: settings, the quick run's CSV, and refusing to overwrite it."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from nas_grouping import ConfigError
from nas_grouping.bench.deploy import COLUMNS, DeployBenchConfig, run_deploy_bench
from nas_grouping.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_settings_parse_and_check():
    cfg = DeployBenchConfig(networks="resnet56", budgets="0.5, 0.25", batches="1,32", variants="groups")
    assert cfg.networks == ["resnet56"] and cfg.budgets == [0.5, 0.25] and cfg.batches == [1, 32]
    assert cfg.variants == ["groups"]
    quick = DeployBenchConfig(quick=True)
    assert quick.networks == ["resnet20"] and quick.budgets == [0.5] and quick.batches == [1, 2]
    with pytest.raises(ConfigError, match=r"^variants: unknown \['prune'\]; choose from groups, channels, "
                                          r"channels\+groups$"):
        DeployBenchConfig(variants="groups,prune")
    with pytest.raises(ConfigError, match="shares"):
        DeployBenchConfig(budgets="1.5")
    with pytest.raises(ConfigError, match="threads"):
        DeployBenchConfig(threads=0)


def test_a_bad_setting_is_one_line_on_the_command_line(capsys):
    assert main(["bench", "deploy", "--networks", "vgg"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "networks: unknown ['vgg']" in err


def test_an_existing_csv_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "rows.csv"
    out.write_text("kept")
    with pytest.raises(ConfigError, match="exists; choose another --out or pass --overwrite"):
        run_deploy_bench(DeployBenchConfig(quick=True, out=str(out)))
    assert out.read_text() == "kept"


@pytest.mark.slow
def test_quick_run_writes_checked_rows(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "runs" / "deploy.csv"
    df = run_deploy_bench(DeployBenchConfig(quick=True, out=str(out)))
    rows = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert tuple(rows.columns) == COLUMNS and len(rows) == len(df) == 2 * 4
    assert sorted(set(rows["variant"])) == ["channels", "channels+groups", "dense", "groups"]
    assert sorted(set(rows["batch"])) == [1, 2] and set(rows["weights"]) == {"random"}
    for column in ("speedup", "torch_speedup", "ort_ms", "mac_cut", "speedup_per_mac_cut"):
        assert all(math.isfinite(v) and v > 0 for v in rows[column]), column
    assert (rows["executed_macs"] >= rows["structural_macs"]).all()
    assert (rows["max_abs_error"] <= 1e-5 * rows["output_scale"]).all()
    dense = rows[rows["variant"] == "dense"]
    assert (dense["speedup"] == 1).all() and (dense["mac_cut"] == 1).all()
    compressed = rows[rows["variant"] != "dense"]
    assert (compressed["mac_cut"] >= 2).all()  # within the budget of 1/2 of the dense MACs
