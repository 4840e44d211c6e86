"""The accuracy-at-equal-budgets benchmark: quick mode end to end, resumable cells, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_search_cells_with_other_settings_are_kept_apart_and_can_start_from_the_dense_model(tmp_path, monkeypatch):
    from nas_grouping.bench import quality

    calls = []

    class Fake:
        model = torch.nn.Linear(2, 2)
        summary = {"val_acc": 0.5, "epochs": 3, "dense_macs": 10}

    def fake_search(self, name, seed, **kw):
        calls.append((name, kw))
        (self.out / "runs" / name).mkdir(parents=True, exist_ok=True)
        (self.out / "runs" / name / "summary.json").write_text(json.dumps(Fake.summary))
        return Fake()

    monkeypatch.setattr(quality._Bench, "run_search", fake_search)
    monkeypatch.setattr(quality, "count_macs", lambda m, s: 5)
    monkeypatch.setattr(quality, "_latency_ms", lambda m, s: 1.0)
    bench = quality._Bench(QualityConfig(space_kwargs=SMALL, out=str(tmp_path), search_settings={
        "budget_ramp": 0.5}))
    row = bench.cell("search_from_dense", 0.5, 0)
    assert row["settings"] == {"budget_ramp": 0.5} and row["epochs_total"] == 6
    (dense_name, dense_kw), (name, kw) = calls
    assert dense_name == "dense-dense-0" and dense_kw == {"dense": True}
    assert name.startswith("search_from_dense-0.5-0-") and kw["init_from"].endswith("dense-dense-0")
    assert kw["budget_ramp"] == 0.5 and kw["budget"] == 0.5
