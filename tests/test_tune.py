"""Optuna tuning under a hard MAC budget: knobs, constraints, pruning, Pareto, storages, workers, results.

Most studies here run a stand-in for ``search`` (same signature, per-epoch reports, a run
folder with a model) whose accuracy is a known function of the knobs, so the tuner's own
logic is tested in seconds; the real search runs in the end-to-end tests (tiny network,
digits, 2-3 epochs).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

import nas_grouping.search.loop as search_mod
from nas_grouping import BudgetError, ConfigError, MissingDependencyError, count_macs, load_model
from nas_grouping.tune._knobs import knob_groups, parse_knobs, project_shares
from nas_grouping.tune._storage import mask_url, resolve_storage
from nas_grouping.cli import main
from nas_grouping.config import CompressConfig, SearchConfig, TuneConfig
from nas_grouping.data import DataConfig
from nas_grouping.export.model import save_model
from nas_grouping.tune.study import tune

SMALL = {"widths": [8, 8, 16, 16, 16, 16]}
DENSE_SMALL = 170_656  # dense MACs of SMALL at 1x8x8 (pool after the 2nd conv)
REPO = Path(__file__).resolve().parents[1]


def job(tmp_path: Path, name: str = "tune", **kw) -> SearchConfig:
    values = dict(space="digits_convnet", space_kwargs=dict(SMALL), epochs=2, warmup_epochs=1, finetune_epochs=1,
                  budget=0.5, progress=False, out=str(tmp_path / name), data=DataConfig(batch_size=128))
    if "measure_latency" in {f for f in SearchConfig.__dataclass_fields__}:
        values["measure_latency"] = False
    values.update(kw)
    return SearchConfig(**values)


def fake_accuracy(cfg: SearchConfig) -> float:
    """A known landscape: best at reg_strength 0.5 and lr 0.05, whatever the gate learning rate."""
    return 0.95 - 0.1 * math.log10(cfg.reg_strength / 0.5) ** 2 - 0.1 * math.log10(cfg.lr / 0.05) ** 2


@pytest.fixture
def fake_search(monkeypatch):
    """Replace the search by a stand-in that reports per epoch and writes a run folder with a model."""
    calls: list[SearchConfig] = []
    state = {"macs": lambda cfg: int(cfg.budget * 0.9), "interrupt_at": None}

    def run(cfg: SearchConfig, *, resume: bool = False, on_epoch=None):
        calls.append(cfg)
        if state["interrupt_at"] is not None and len(calls) == state["interrupt_at"]:
            raise KeyboardInterrupt
        out = Path(cfg.out)
        (out / "model").mkdir(parents=True)
        (out / "model" / "weights.pt").write_text(f"trial model {out.name}")
        acc = fake_accuracy(cfg)
        total = cfg.epochs + cfg.finetune_epochs
        for epoch in range(1, total + 1):
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "val_acc": acc * epoch / total})
        summary = {"val_acc": acc, "macs": state["macs"](cfg), "budget_macs": int(cfg.budget)}
        return SimpleNamespace(summary=summary, model=None, run_dir=out)

    monkeypatch.setattr(search_mod, "search", run)
    return SimpleNamespace(calls=calls, state=state)


def trials_of(result) -> list:
    return result.study.get_trials(deepcopy=False)


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_search_study_end_to_end_writes_results_a_person_can_read(tmp_path, capsys):
    cfg = job(tmp_path)
    result = tune(cfg, TuneConfig(trials=2, startup_trials=1, pruner="none"))
    trials = trials_of(result)
    assert [t.number for t in trials] == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    budget = DENSE_SMALL // 2
    for t in trials:  # the constraint is the graded violation of the exported model
        assert t.constraints["macs"] == pytest.approx(t.user_attrs["macs"] / budget - 1)
        assert t.user_attrs["macs"] <= budget
        assert (tmp_path / "tune" / t.user_attrs["run_dir"] / "summary.json").is_file()
    run = tmp_path / "tune"
    for name in ("study.db", "tune.json", "trials.csv", "summary.json", "history.png", "pareto.png"):
        assert (run / name).is_file(), name
    df = pd.read_csv(run / "trials.csv")
    assert len(df) == 2 and "system_attrs_constraints:macs" in df.columns and "params_reg_strength" in df.columns
    best = result.best
    assert best["val_acc"] == max(t.user_attrs["val_acc"] for t in trials)
    model = load_model(run / "best_model")
    assert count_macs(model, (1, 8, 8)) == best["macs"] <= budget
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    text = capsys.readouterr().out
    assert f"best feasible: trial {best['number']}" in text and "reg_strength" in text and "COMPLETE" in text


@pytest.mark.slow
def test_same_seed_repeats_the_same_study(tmp_path):
    def run(name: str):
        return tune(job(tmp_path, name, epochs=2, finetune_epochs=0), TuneConfig(trials=2, startup_trials=1),
                    quiet=True)  # the second trial is sampled by TPE from the first

    a, b = run("a"), run("b")
    assert [t.params for t in trials_of(a)] == [t.params for t in trials_of(b)]
    assert [t.value for t in trials_of(a)] == [t.value for t in trials_of(b)]


# ---------------------------------------------------------------- hard budget

def test_infeasible_samples_are_recorded_graded_and_not_trained(tmp_path, fake_search):
    # an absolute budget of 20,000 MACs: pooling after the 3rd conv costs at least 25,504 fully grouped
    cfg = job(tmp_path, budget=20_000)
    knobs = {"space_kwargs.pool_after": {"choices": [2, 3]}}
    result = tune(cfg, TuneConfig(trials=2, knobs=knobs, enqueue=[{"space_kwargs.pool_after": 3},
                                                                   {"space_kwargs.pool_after": 2}]), quiet=True)
    t0, t1 = trials_of(result)
    assert t0.params["space_kwargs.pool_after"] == 3 and t0.state == TrialState.PRUNED
    assert t0.constraints["macs"] == pytest.approx(25_504 / 20_000 - 1)
    assert t0.user_attrs["skipped"] and not (tmp_path / "tune" / "trials" / "0000").exists()
    assert len(fake_search.calls) == 1 and fake_search.calls[0].space_kwargs["pool_after"] == 2
    assert t1.state == TrialState.COMPLETE and t1.constraints["macs"] <= 0
    assert result.best["number"] == 1
    assert result.summary["states"] == {"skipped": 1, "complete": 1}


def test_a_model_over_budget_is_never_reported_as_best(tmp_path, fake_search):
    # the stand-in exports a model over budget whenever reg_strength is small, with the best accuracy
    budget = DENSE_SMALL // 2
    fake_search.state["macs"] = lambda cfg: budget + 1000 if cfg.reg_strength < 0.6 else budget - 1000
    enqueue = [{"reg_strength": 0.5, "lr": 0.05, "gate_lr": 0.03}, {"reg_strength": 2.0, "lr": 0.05, "gate_lr": 0.03}]
    result = tune(job(tmp_path), TuneConfig(trials=2, enqueue=enqueue), quiet=True)
    over, ok = trials_of(result)
    assert over.value > ok.value and over.constraints["macs"] == pytest.approx(1000 / budget)
    assert result.best["number"] == ok.number
    assert result.study.best_trial.number == ok.number  # Optuna agrees: infeasible trials are never best
    assert (tmp_path / "tune" / "best_model" / "weights.pt").read_text() == "trial model 0001"
    assert [t["number"] for t in result.pareto_front] == [ok.number]


def test_pruner_stops_bad_trials_early_from_per_epoch_reports(tmp_path, fake_search):
    good = {"reg_strength": 0.5, "lr": 0.05, "gate_lr": 0.03}
    bad = {"reg_strength": 0.05, "lr": 0.01, "gate_lr": 0.03}
    cfg = job(tmp_path, epochs=5, warmup_epochs=1, finetune_epochs=2)
    result = tune(cfg, TuneConfig(trials=4, startup_trials=3, pruner="median", enqueue=[good, good, good, bad]),
                  quiet=True)
    *done, pruned = trials_of(result)
    assert all(t.state == TrialState.COMPLETE and len(t.intermediate_values) == 7 for t in done)
    # not judged before the middle of the search phase (warm-up 1 + half of 4 search epochs): stopped at epoch 3
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["epochs_done"] == 3
    assert pruned.constraints["macs"] <= 0  # pruned, but its sampled budget fits: not marked infeasible


def test_pareto_mode_samples_budgets_that_fit_and_reports_the_front(tmp_path, fake_search):
    fake_search.state["macs"] = lambda cfg: int(cfg.budget)
    cfg = job(tmp_path, budget=0.5)
    result = tune(cfg, TuneConfig(trials=4, objective="pareto", startup_trials=4), quiet=True)
    trials = trials_of(result)
    assert result.study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    for t in trials:
        assert 0 < t.params["budget"] <= 0.5 and t.state == TrialState.COMPLETE
        assert t.values[1] == t.user_attrs["macs"] <= DENSE_SMALL // 2
        assert not t.intermediate_values  # no reports: multi-objective trials cannot be pruned
    front = result.pareto_front
    assert front and [f["macs"] for f in front] == sorted(f["macs"] for f in front)
    accs = [f["val_acc"] for f in front]
    assert accs == sorted(accs)  # more MACs on the front must buy more accuracy
    assert {f["number"] for f in front} == {t.number for t in result.study.best_trials}
    assert (tmp_path / "tune" / "pareto.png").is_file()


def test_known_good_settings_run_first_and_settings_outside_the_space_are_refused(tmp_path, fake_search):
    enqueue = [{"reg_strength": 0.7, "lr": 0.03, "gate_lr": 0.01}]
    result = tune(job(tmp_path), TuneConfig(trials=1, enqueue=enqueue), quiet=True)
    assert trials_of(result)[0].params == enqueue[0] and fake_search.calls[0].reg_strength == 0.7
    with pytest.raises(ConfigError, match="outside the knob's range"):
        tune(job(tmp_path, "b"), TuneConfig(enqueue=[{"reg_strength": 50.0}]), quiet=True)
    with pytest.raises(ConfigError, match="not a knob of this study"):
        tune(job(tmp_path, "c"), TuneConfig(enqueue=[{"momentum": 0.5}]), quiet=True)


# ---------------------------------------------------------------- knobs

def test_knob_spaces_infer_types_and_refuse_empty_or_fixed_ranges():
    knobs = parse_knobs("search", "accuracy", {"warmup_epochs": {"low": 1, "high": 3}, "regularizer": {},
                                               "gate_lr": None, "bilevel": {}})
    assert knobs["warmup_epochs"].kind == "int"
    assert knobs["regularizer"].choices == ("additive", "multiplicative")
    assert knobs["bilevel"].choices == (False, True)
    assert "gate_lr" not in knobs and knobs["reg_strength"].log
    for bad, match in [({"lr": {"low": 0.2, "high": 0.1}}, "empty"),
                       ({"regularizer": {"choices": []}}, "empty"),
                       ({"lr": {"low": 0, "high": 0.1, "log": True}}, "low > 0"),
                       ({"out": {"choices": ["a"]}}, "fixed"),
                       ({"nope": {"low": 1, "high": 2}}, "not a setting"),
                       ({"epochs": {"low": 1.5, "high": 3}}, "integer"),
                       ({"lr": {"low": 0.01, "hig": 1}}, "unknown key")]:
        with pytest.raises(ConfigError, match=match):
            parse_knobs("search", "accuracy", bad)
    compress = parse_knobs("compress", "accuracy", {"share": {"low": 0.3, "high": 1.0, "per": "stage"}})
    assert compress["share"].per == "stage" and compress["grouping.clusters"].kind == "int"
    assert "grouping.lr" in compress
    with pytest.raises(ConfigError, match="fixed"):
        parse_knobs("compress", "accuracy", {"budget": {"low": 0.3, "high": 0.5}})


def test_bad_knob_values_fail_before_any_trial(tmp_path, fake_search):
    with pytest.raises(ConfigError, match="warmup_epochs.*invalid"):
        tune(job(tmp_path), TuneConfig(knobs={"warmup_epochs": {"low": 1, "high": 2}}), quiet=True)
    with pytest.raises(ConfigError, match="empty"):
        tune(job(tmp_path), TuneConfig(knobs={"lr": {"low": 0.5, "high": 0.1}}), quiet=True)
    with pytest.raises(ConfigError, match="above the hard budget"):
        tune(job(tmp_path), TuneConfig(objective="pareto", knobs={"budget": {"low": 0.6, "high": 0.9}}), quiet=True)
    assert not fake_search.calls and not (tmp_path / "tune" / "study.db").exists()


def test_projected_shares_always_fit_the_budget():
    torch.manual_seed(0)
    layers = [("a", 40_000, 100, 0.95), ("b", 90_000, 300, 0.95), ("c", 5_000, 50, 0.6), ("d", 20_000, 64, 0.9)]
    fixed = 10_000
    for budget in (30_000, 60_000, 120_000):
        for _ in range(50):
            w = {n: float(v) for n, v in zip("abcd", torch.rand(4) * 0.9 + 0.1)}
            f = project_shares(layers, fixed, budget, w)
            macs = fixed + sum(math.floor((1 - f[n]) * c + 1e-9) * (m // c) for n, m, c, _ in layers)
            assert macs <= budget and macs > 0.97 * budget  # fits, and wastes little of it
            assert all(0 <= f[n] <= cap + 1e-12 for n, _, _, cap in layers)
    # a layer with a larger share keeps more of its connections
    f = project_shares(layers, fixed, 60_000, {"a": 1.0, "b": 0.2, "c": 0.5, "d": 0.5})
    assert f["a"] < f["b"]
    with pytest.raises(ConfigError, match="cannot meet"):
        project_shares(layers, fixed, 15_000, {n: 1.0 for n in "abcd"})
    assert knob_groups(["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "fc"] * 3, "stage")["fc"] == "fc"
    assert set(knob_groups([f"features.{i}" for i in range(4)], "auto").values()) == {f"features.{i}" for i in range(4)}


# ---------------------------------------------------------------- bad input

def test_a_budget_no_configuration_meets_fails_before_any_trial(tmp_path, fake_search):
    with pytest.raises(BudgetError, match="cannot be met"):
        tune(job(tmp_path, budget=0.01), TuneConfig(trials=2), quiet=True)
    assert not fake_search.calls and not (tmp_path / "tune").exists()


def test_an_unreachable_storage_fails_clearly_without_leaking_the_password(tmp_path, fake_search):
    pytest.importorskip("psycopg2")
    url = "postgresql+psycopg2://user:secret@127.0.0.1:1/nowhere"
    with pytest.raises(ConfigError, match="cannot reach the study storage") as err:
        tune(job(tmp_path), TuneConfig(storage=url), quiet=True)
    assert "secret" not in str(err.value) and "user:***@" in str(err.value)
    assert mask_url(url) == "postgresql+psycopg2://user:***@127.0.0.1:1/nowhere"
    with pytest.raises(ConfigError, match="unknown scheme"):
        resolve_storage("redis://localhost", tmp_path, 1)
    with pytest.raises(ConfigError, match="not for parallel workers"):
        resolve_storage("sqlite", tmp_path, 2)
    with pytest.raises(MissingDependencyError, match="driver"):
        tune(job(tmp_path), TuneConfig(storage="mysql+nosuchdriver://u:p@127.0.0.1:1/x"), quiet=True)
    assert not fake_search.calls


def test_a_study_name_that_exists_with_other_settings_is_refused(tmp_path, fake_search):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    tune(job(tmp_path, "a"), TuneConfig(trials=1, storage=storage, study_name="s"), quiet=True)
    with pytest.raises(ConfigError, match="exists with other settings.*reg_strength"):
        tune(job(tmp_path, "b"), TuneConfig(trials=1, storage=storage, study_name="s",
                                            knobs={"reg_strength": {"low": 0.1, "high": 1.0}}), quiet=True)
    with pytest.raises(ConfigError, match="exists with other settings.*job.lr"):
        tune(job(tmp_path, "c", lr=0.1), TuneConfig(trials=1, storage=storage, study_name="s",
                                                    knobs={"lr": None}), quiet=True)
    # the same settings join the study (as a worker on another machine does)
    joined = tune(job(tmp_path, "d"), TuneConfig(trials=2, storage=storage, study_name="s"), quiet=True)
    assert [t.number for t in trials_of(joined)] == [0, 1]
    with pytest.raises(ConfigError, match="already holds a tuning run"):
        tune(job(tmp_path, "d"), TuneConfig(trials=2, storage=storage, study_name="s"), quiet=True)
    with pytest.raises(ConfigError, match="needs objective=accuracy"):
        TuneConfig(objective="pareto", pruner="median")


# ---------------------------------------------------------------- storages and workers

def test_resume_after_an_interrupted_study_retries_the_lost_trial(tmp_path, fake_search):
    cfg = job(tmp_path)
    fake_search.state["interrupt_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, TuneConfig(trials=3), quiet=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    before = optuna.load_study(study_name="tune", storage=storage).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.FAIL]
    result = tune(cfg, TuneConfig(trials=3), resume=True, quiet=True)
    trials = trials_of(result)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert result.summary["states"] == {"complete": 3, "fail": 1}


@pytest.mark.slow
def test_resume_after_a_killed_process_fails_and_retries_its_running_trial(tmp_path):
    """A hard crash (SIGKILL) leaves a trial RUNNING; resuming fails it and runs its knobs again."""
    out = tmp_path / "tune"
    spec = json.dumps({k: v for k, v in job(tmp_path, epochs=3, warmup_epochs=1).__dict__.items() if k != "data"})
    code = ("import json, torch; torch.set_num_threads(1)\n"
            "from nas_grouping.config import SearchConfig, TuneConfig\nfrom nas_grouping.data import DataConfig\n"
            "from nas_grouping.tune.study import tune\n"
            f"cfg = SearchConfig(**json.loads({spec!r}), data=DataConfig(batch_size=128))\n"
            "tune(cfg, TuneConfig(trials=2), quiet=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.time() + 120
        while not (out / "trials" / "0000" / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "the tuning process ended before trial 0 trained"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    cfg = job(tmp_path, epochs=3, warmup_epochs=1)
    result = tune(cfg, TuneConfig(trials=2), resume=True, quiet=True)
    trials = trials_of(result)
    assert trials[0].state == TrialState.FAIL
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params


@pytest.mark.slow
def test_two_worker_processes_share_a_journal_without_losing_or_duplicating_trials(tmp_path):
    cfg = job(tmp_path, epochs=2, finetune_epochs=0)
    result = tune(cfg, TuneConfig(trials=4, workers=2, startup_trials=1, pruner="none"), quiet=True)
    out = tmp_path / "tune"
    assert (out / "study.journal").is_file() and not (out / "study.db").exists()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    trials = optuna.load_study(study_name="tune", storage=storage).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # no duplicated sample
    assert result.summary["trials"] == 4


# ---------------------------------------------------------------- compress trials

@pytest.fixture
def saved_model(tmp_path):
    from search_spaces import get_space

    torch.manual_seed(0)
    model = get_space("digits_convnet", dense=True, widths=[8, 8, 16, 16, 16, 16])
    return save_model(model, tmp_path / "dense")


@pytest.mark.slow
def test_compress_trials_plan_macs_before_fine_tuning_and_always_fit(tmp_path, saved_model):
    cfg = CompressConfig(model=str(saved_model), out=str(tmp_path / "ctune"), data=DataConfig(batch_size=128),
                         latency_batches=[], grouping={"budget": 0.5, "epochs": 1, "kmeans_restarts": 1,
                                                       "progress": False})
    result = tune(cfg, TuneConfig(trials=2, startup_trials=1), quiet=True)
    trials = trials_of(result)
    budget = result.summary["budget_macs"]
    assert budget == DENSE_SMALL // 2 + 0 or budget == int(0.5 * result.summary["dense_macs"])
    for t in trials:
        assert t.state == TrialState.COMPLETE
        assert any(k.startswith("share:") for k in t.params) and 2 <= t.params["grouping.clusters"] <= 16
        assert t.user_attrs["macs"] <= t.user_attrs["planned_macs"] <= budget
        assert t.constraints["macs"] <= 0 and t.user_attrs["fractions"]
    model = load_model(tmp_path / "ctune" / "best_model")
    assert count_macs(model, (1, 8, 8)) == result.best["macs"] <= budget


def test_compress_study_needs_a_hard_budget(tmp_path, saved_model):
    cfg = CompressConfig(model=str(saved_model), out=str(tmp_path / "ctune"), grouping={"fraction": 0.5})
    with pytest.raises(ConfigError, match="needs a hard MAC budget"):
        tune(cfg, TuneConfig(trials=1), quiet=True)


# ---------------------------------------------------------------- CLI

def test_cli_tune_then_report_prints_the_table_again(tmp_path, fake_search, capsys):
    out = tmp_path / "cli"
    args = ["tune", "search", "--space", "digits_convnet", "--space-kwargs", json.dumps(SMALL), "--epochs", "2",
            "--warmup-epochs", "1", "--finetune-epochs", "1", "--budget", "0.5", "--out", str(out), "--trials", "2",
            "--knobs", '{"gate_lr": null}', "--enqueue", '[{"reg_strength": 0.5, "lr": 0.05}]']
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "best feasible: trial 0" in first
    assert main(["report", str(out)]) == 0
    again = capsys.readouterr().out
    assert "best feasible: trial 0" in again and "reg_strength" in again and "gate_lr" not in again
    # resume adds trials with the saved settings; an empty knob range is one clear line, exit code 2
    assert main(["tune", "search", "--out", str(out), "--trials", "3", "--resume"]) == 0
    assert len(pd.read_csv(out / "trials.csv")) == 3
    capsys.readouterr()
    assert main(args[:-4] + ["--out", str(tmp_path / "x"), "--knobs", '{"lr": {"low": 1, "high": 0.1}}']) == 2
    assert "empty" in capsys.readouterr().err
    # one config file: the job's settings, the tuning settings in its "tune" table
    cfg_file = tmp_path / "tune.json"
    cfg_file.write_text(json.dumps({"space": "digits_convnet", "space_kwargs": SMALL, "epochs": 2, "warmup_epochs": 1,
                                    "out": str(tmp_path / "file"), "tune": {"trials": 1, "knobs": {"lr": None}}}))
    assert main(["tune", "search", "--config", str(cfg_file)]) == 0
    df = pd.read_csv(tmp_path / "file" / "trials.csv")
    assert len(df) == 1 and "params_lr" not in df.columns and "params_gate_lr" in df.columns
