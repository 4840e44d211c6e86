"""The accuracy-at-equal-budgets benchmark: quick mode end to end, resumable cells, clear errors."""

from __future__ import annotations

import json

import pytest

from nas_grouping import ConfigError
from nas_grouping.bench.quality import QualityConfig, run_quality, uniform_groups_for_budget
from nas_grouping.data import DataConfig

SMALL = {"widths": [8, 8, 16, 16, 16, 16]}


def test_uniform_groups_land_just_under_the_budget():
    groups, macs = uniform_groups_for_budget("digits_convnet", SMALL, 0.5, 10, (1, 8, 8))
    _, macs_more = uniform_groups_for_budget("digits_convnet", SMALL, 0.9, 10, (1, 8, 8))
    assert max(groups.values()) >= 2 and macs < macs_more
    assert uniform_groups_for_budget("digits_convnet", SMALL, 0.001, 10, (1, 8, 8)) is None


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="fractions"):
        QualityConfig(budgets=[2.0])
    with pytest.raises(ConfigError, match="unknown method"):
        QualityConfig(methods=["magic"])


@pytest.mark.slow
def test_quick_benchmark_writes_tables_and_resumes_without_rerunning_cells(tmp_path):
    cfg = QualityConfig(space_kwargs=SMALL, budgets=[0.5], epochs=3, sg_epochs=1, quick=True, out=str(tmp_path),
                        progress=False, data=DataConfig(batch_size=128))
    table = run_quality(cfg)
    assert set(table["method"]) == {"dense", "uniform", "search", "self_grouping", "pipeline"}
    assert (table["seeds"] == 2).all()
    for name in ("cells.csv", "table.csv", "summary.json", "quality.png"):
        assert (tmp_path / name).is_file(), name
    budgeted = table[table["method"] != "dense"]
    assert (budgeted["macs_fraction"] <= 0.5 + 1e-9).all()  # every method meets the budget it was given
    cells = sorted((tmp_path / "cells").glob("*.json"))
    assert len(cells) == 10
    stamps = {p.name: p.stat().st_mtime_ns for p in cells}
    removed = tmp_path / "cells" / "search-0.5-1.json"
    before = json.loads(removed.read_text())
    removed.unlink()
    run_quality(cfg)
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    assert {k for k in again if again[k] != stamps.get(k)} == {"search-0.5-1.json"}
    assert json.loads(removed.read_text())["val_acc"] == pytest.approx(before["val_acc"])  # seeded: repeatable
