"""The accuracy-at-equal-budgets benchmark: quick mode end to end, resumable cells, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from nas_grouping import ConfigError
from nas_grouping.bench import quality
from nas_grouping.bench.quality import QualityConfig, run_quality, uniform_groups_for_budget
from nas_grouping.data import DataConfig
from nas_grouping.macs import count_macs

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
    for cell in (json.loads(p.read_text()) for p in cells):
        assert cell["executed_macs"] >= cell["macs"] > 0 and cell["params"] > 0
        assert all(cell[f"speedup_b{b}"] > 0 and cell[f"dense_latency_ms_b{b}"] > 0 for b in (1, 32))
        assert cell["latency_reference"] == f"dense-dense-{cell['seed']}" or cell["method"] == "dense"
    assert table["acc_change_points"].notna().all() and table["speedup_b32"].notna().all()


def test_cells_written_before_the_cost_columns_get_them_from_their_kept_model(tmp_path):
    cfg = QualityConfig(space_kwargs=SMALL, budgets=[0.5], epochs=3, sg_epochs=1, seeds=1, methods=["uniform"],
                        out=str(tmp_path), progress=False, data=DataConfig(batch_size=128))
    run_quality(cfg)
    path = tmp_path / "cells" / "uniform-0.5-0.json"
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("executed_macs", "params", "speedup_b1", "speedup_b32", "latency_ms_b32",
                        "dense_latency_ms_b1", "dense_latency_ms_b32", "latency_reference")}
    path.write_text(json.dumps(old))
    run_quality(cfg)
    cell = json.loads(path.read_text())
    assert cell["costs_added_later"] and cell["speedup_b32"] > 0 and cell["val_acc"] == old["val_acc"]
    assert cell["latency_reference"] == "itself"  # no dense cell ran: never an untrained stand-in


def _fake_searches(monkeypatch, summary: dict) -> list:
    """Search cells that only write ``summary`` (and record their calls); costs and model files skipped."""
    calls = []

    class Fake:
        model = torch.nn.Linear(2, 2)

    def fake_search(self, name, seed, **kw):
        calls.append((name, kw))
        (self.out / "runs" / name).mkdir(parents=True, exist_ok=True)
        (self.out / "runs" / name / "summary.json").write_text(json.dumps(summary))
        fake = Fake()
        fake.summary = summary
        return fake

    monkeypatch.setattr(quality._Bench, "run_search", fake_search)
    monkeypatch.setattr(quality, "cost_fields", lambda model, dense, size: {"macs": 5})
    monkeypatch.setattr(quality._Bench, "keep_model", lambda self, key, model: None)
    return calls


def test_search_cells_with_other_settings_are_kept_apart_and_can_start_from_the_dense_model(tmp_path, monkeypatch):
    calls = _fake_searches(monkeypatch, {"val_acc": 0.5, "epochs": 3, "dense_macs": 10})
    bench = quality._Bench(QualityConfig(space_kwargs=SMALL, out=str(tmp_path), search_settings={
        "budget_ramp": 0.5}))
    row = bench.cell("search_from_dense", 0.5, 0)
    assert row["settings"] == {"budget_ramp": 0.5} and row["epochs_total"] == 6
    (dense_name, dense_kw), (name, kw) = calls
    assert dense_name == "dense-dense-0" and dense_kw == {"dense": True}
    assert name.startswith("search_from_dense-0.5-0-") and kw["init_from"].endswith("dense-dense-0")
    assert kw["budget_ramp"] == 0.5 and kw["budget"] == 0.5


@pytest.mark.parametrize("method", ["channels", "torch_pruning", "torch_pruning_gn"])
def test_pruning_cells_prune_the_dense_model_to_the_budget_and_fine_tune_it(tmp_path, monkeypatch, method):
    if method != "channels":
        pytest.importorskip("torch_pruning", reason="Torch-Pruning lives in the benchmark's own environment")
    from nas_grouping import save_model
    from search_spaces import get_space

    def dense_run(self, name, seed, **kw):  # a trained dense model stands in for the dense cell's run
        folder = self.out / "runs" / name
        torch.manual_seed(seed)
        save_model(get_space("digits_convnet", dense=True, **SMALL), folder / "model")
        (folder / "summary.json").write_text(json.dumps({"val_acc": 0.1, "epochs": 3}))

        class Run:
            model = get_space("digits_convnet", dense=True, **SMALL)
            summary = {"val_acc": 0.1}
        return Run()

    monkeypatch.setattr(quality._Bench, "run_search", dense_run)
    bench = quality._Bench(QualityConfig(space_kwargs=SMALL, out=str(tmp_path), sg_epochs=1,
                                         data=DataConfig(batch_size=128)))
    row = bench.cell(method, 0.5, 0)
    dense = bench.cell("dense", None, 0)
    assert row["status"] == "ok" and row["macs"] <= 0.5 * dense["macs"]
    assert row["finetune_epochs"] == 1 and row["epochs_total"] == 4 and 0 < row["pruning_ratio"] < 1
    # the fine-tuning trains the pruned model, and the accuracy reported is that model's
    from nas_grouping.runtime import setup_runtime
    from nas_grouping.training import epoch_loader, evaluate

    dense_model = get_space("digits_convnet", dense=True, **SMALL)
    model, acc, _ = bench.prune_and_finetune(method, dense_model, 0.5, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again, _, _ = bench.prune_and_finetune(method, dense_model, 0.5, 0)
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())  # seeded: repeatable
    rt = setup_runtime("cpu", "32", False, False)
    assert evaluate(model, epoch_loader(bench.ds.val, rt, batch_size=256, train=False, seed=0, epoch=0), rt)["acc"] \
        == pytest.approx(acc)
    budget_macs = int(0.5 * count_macs(dense_model, (1, 8, 8)))
    if method == "channels":
        from nas_grouping.channels.pruning import ChannelPruning

        pruned_only = ChannelPruning(dense_model, (1, 8, 8)).prune_to_budget(budget_macs)[0]
    else:
        from nas_grouping.bench.speed import torch_pruning_prune

        pruned_only = torch_pruning_prune(dense_model, (1, 8, 8), budget_macs,
                                          importance="l1" if method == "torch_pruning" else "group_norm")[0]
    tuned, untuned = model.state_dict(), pruned_only.state_dict()
    assert tuned.keys() == untuned.keys() and all(tuned[k].shape == untuned[k].shape for k in tuned)
    assert any(not torch.equal(tuned[k], untuned[k]) for k in tuned if k.endswith("weight"))


def test_search_retrain_trains_the_searched_groups_from_scratch(tmp_path, monkeypatch):
    groups = {"a": 2, "b": 4}
    calls = _fake_searches(monkeypatch, {"val_acc": 0.5, "epochs": 4, "dense_macs": 10, "groups": groups})
    bench = quality._Bench(QualityConfig(space_kwargs=SMALL, out=str(tmp_path)))
    row = bench.cell("search_retrain", 0.25, 1)
    (search_name, search_kw), (name, kw) = calls
    assert search_name == "search-0.25-1" and search_kw == {"budget": 0.25}
    assert name == "search_retrain-0.25-1" and kw == {"fixed_groups": groups}
    assert row["groups"] == groups and row["epochs_total"] == 8


def test_a_folder_resumed_with_other_training_settings_is_refused_and_seeds_can_be_split(tmp_path, monkeypatch,
                                                                                         capsys):
    _fake_searches(monkeypatch, {"val_acc": 0.5, "epochs": 3, "dense_macs": 10})
    monkeypatch.setattr(quality._Bench, "costs", lambda self, model, seed: {"macs": 5})
    first = dict(space_kwargs=SMALL, budgets=[0.5], epochs=3, methods=["dense", "uniform"], out=str(tmp_path),
                 progress=False, seeds=1)
    run_quality(QualityConfig(**first))
    table = run_quality(QualityConfig(**{**first, "first_seed": 2, "methods": ["dense"]}))
    assert sorted(p.name for p in (tmp_path / "cells").glob("dense-*.json")) == ["dense-dense-0.json",
                                                                                 "dense-dense-2.json"]
    assert set(table["method"]) == {"dense", "uniform"}  # the table covers every cell of the folder
    assert int(table[table["method"] == "dense"]["seeds"].iloc[0]) == 2
    with pytest.raises(ConfigError, match=r"epochs=3 \(now 4\)"):
        run_quality(QualityConfig(**{**first, "epochs": 4}))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["data"]["holdout"]  # a folder made before the setting existed had its default: still resumable
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run_quality(QualityConfig(**{**first, "first_seed": 2, "methods": ["dense"]}))
    from nas_grouping.cli import main

    assert main(["report", str(tmp_path)]) == 0  # the table again, from the cells, nothing trained
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[:3] == ["method", "budget", "seeds"]
    assert printed[2].split()[:4] == ["dense", "dense", "2", "0.5000"]
    search_run = tmp_path.parent / "a-search"
    search_run.mkdir()
    (search_run / "run.json").write_text(json.dumps({"job": "search"}))
    with pytest.raises(ConfigError, match="holds a search run"):  # never written over another job's run
        run_quality(QualityConfig(**{**first, "out": str(search_run)}))
    with pytest.raises(ConfigError, match="first_seed"):
        QualityConfig(first_seed=-1)


def test_fine_tuning_settings_reach_every_fine_tuning_cell_and_key_it_apart(tmp_path, monkeypatch):
    from nas_grouping import save_model
    from search_spaces import get_space

    def dense_run(self, name, seed, **kw):
        torch.manual_seed(seed)
        save_model(get_space("digits_convnet", dense=True, **SMALL), self.out / "runs" / name / "model")
        (self.out / "runs" / name / "summary.json").write_text(json.dumps({"val_acc": 0.1, "epochs": 3}))

        class Run:
            model = get_space("digits_convnet", dense=True, **SMALL)
            summary = {"val_acc": 0.1}
        return Run()

    import nas_grouping.training as training

    teachers = []

    class Spy(training.Distillation):
        def __init__(self, teacher, **kw):
            super().__init__(teacher, **kw)
            teachers.append(kw)

    monkeypatch.setattr(training, "Distillation", Spy)
    monkeypatch.setattr(quality._Bench, "run_search", dense_run)
    monkeypatch.setattr(quality._Bench, "costs", lambda self, model, seed: {"macs": 5})
    bench = quality._Bench(QualityConfig(space_kwargs=SMALL, out=str(tmp_path), sg_epochs=1,
                                         finetune_settings={"distill": 0.5}, data=DataConfig(batch_size=128)))
    row = bench.cell("channels", 0.5, 0)
    assert teachers == [{"weight": 0.5, "temperature": 4.0}]
    assert row["settings"] == {"finetune": {"distill": 0.5}}
    assert [p.name.startswith("channels-0.5-0-") for p in (tmp_path / "cells").glob("channels-*.json")] == [True]
    assert bench.grouping_settings(0.5, 0).distill == 0.5
    with pytest.raises(ConfigError, match="unknown setting"):
        QualityConfig(finetune_settings={"distil": 0.5})


def test_a_cell_another_process_trains_is_skipped_and_a_dead_process_lock_is_taken_over(tmp_path, monkeypatch, caplog):
    import os
    import socket

    _fake_searches(monkeypatch, {"val_acc": 0.5, "epochs": 3, "dense_macs": 10})
    monkeypatch.setattr(quality._Bench, "costs", lambda self, model, seed: {"macs": 5})
    cfg = QualityConfig(space_kwargs=SMALL, budgets=[0.5], epochs=3, methods=["dense"], out=str(tmp_path),
                        progress=False, seeds=2)
    (tmp_path / "cells").mkdir()
    host = socket.gethostname()
    (tmp_path / "cells" / "dense-dense-0.lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))
    (tmp_path / "cells" / "dense-dense-1.lock").write_text(json.dumps({"pid": 2**22 + 17, "host": host}))
    with caplog.at_level("WARNING"):
        table = run_quality(cfg)
    assert "cell dense-dense-0 is being run by process" in caplog.text  # alive: skipped, its lock kept
    assert (tmp_path / "cells" / "dense-dense-0.lock").is_file()
    assert not (tmp_path / "cells" / "dense-dense-0.json").exists()
    assert (tmp_path / "cells" / "dense-dense-1.json").is_file()  # its process is gone: taken over and trained
    assert not (tmp_path / "cells" / "dense-dense-1.lock").exists() and int(table["seeds"].iloc[0]) == 1
    (tmp_path / "cells" / "dense-dense-1.json").unlink()
    (tmp_path / "cells" / "dense-dense-1.lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))
    assert run_quality(cfg).empty  # every cell busy elsewhere: no table yet, and no error


def test_uniform_cells_can_keep_layers_dense_and_are_kept_apart(tmp_path, monkeypatch):
    calls = _fake_searches(monkeypatch, {"val_acc": 0.5, "epochs": 3, "dense_macs": 10})
    keep = ["features.3", "features.7"]
    with pytest.raises(ConfigError, match="keep_dense: no searchable layer named features.1"):  # before training
        quality._Bench(QualityConfig(space_kwargs=SMALL, out=str(tmp_path), uniform_settings={"keep_dense": [
            "features.1"]}))
    bench = quality._Bench(QualityConfig(space_kwargs=SMALL, out=str(tmp_path), uniform_settings={"keep_dense": keep}))
    row = bench.cell("uniform", 0.5, 0)
    (name, kw), = calls
    assert name.startswith("uniform-0.5-0-") and row["settings"] == {"uniform": {"keep_dense": keep}}
    assert [kw["fixed_groups"][n] for n in keep] == [1, 1] and row["groups"] == kw["fixed_groups"]
    for bad in ({"keep": ["a"]}, {"keep_dense": "features.1"}):
        with pytest.raises(ConfigError, match="uniform_settings"):
            QualityConfig(uniform_settings=bad)


def test_a_cell_whose_run_stayed_on_another_machine_is_trained_again_when_another_cell_starts_from_it(
        tmp_path, monkeypatch, caplog):
    calls = _fake_searches(monkeypatch, {"val_acc": 0.5, "epochs": 3, "dense_macs": 10, "groups": {"a": 2}})
    monkeypatch.setattr(quality._Bench, "costs", lambda self, model, seed: {"macs": 5})
    bench = quality._Bench(QualityConfig(space_kwargs=SMALL, out=str(tmp_path)))
    bench.cell("search", 0.25, 0)
    bench.cell("search", 0.25, 0)
    assert [name for name, _ in calls] == ["search-0.25-0"]  # finished: not rerun, run kept or not
    import shutil

    shutil.rmtree(tmp_path / "runs")  # the cells are committed, the runs are not: a fresh clone
    bench.cell("search", 0.25, 0)
    assert len(calls) == 1
    with caplog.at_level("WARNING"):
        row = bench.cell("search_retrain", 0.25, 0)
    assert "cell search-0.25-0 finished where its run was kept" in caplog.text
    assert [name for name, _ in calls] == ["search-0.25-0", "search-0.25-0", "search_retrain-0.25-0"]
    assert row["groups"] == {"a": 2} and (tmp_path / "cells" / "search-0.25-0.json").is_file()
