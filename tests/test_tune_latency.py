"""Measured latency in Optuna tuning: a hard latency budget beside the MAC budget, and objective pareto-latency.

Every finished trial's saved model is timed on this machine (fastest exact forms and layout);
the dense reference is timed once per study and kept in the study. The studies here are tiny
(digits, a few epochs, 1-3 trials); the pareto-latency study uses a stand-in search that saves
real models of different widths, so the measured latencies differ for real.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

import nas_grouping.tune._trials as trials_mod
import nas_grouping.search.loop as search_mod
import nas_grouping.tune.study as tune_mod
from nas_grouping import ConfigError
from nas_grouping.tune._report import format_tuning_run
from nas_grouping.cli import main
from nas_grouping.config import CompressConfig, SearchConfig, TuneConfig
from nas_grouping.data import DataConfig
from nas_grouping.export.model import save_model
from nas_grouping.macs import count_macs
from nas_grouping.tune.study import LATENCY_ATTR, tune

SMALL = {"widths": [8, 8, 16, 16, 16, 16]}
HUGE = "100000ms"  # always met
TINY = "0.000001ms"  # never met


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models: one thread times them steadily and fast on a shared machine."""


def job(tmp_path: Path, name: str = "tune", **kw) -> SearchConfig:
    values = dict(space="digits_convnet", space_kwargs=dict(SMALL), epochs=2, warmup_epochs=1, finetune_epochs=0,
                  budget=0.5, progress=False, measure_latency=False, out=str(tmp_path / name),
                  data=DataConfig(batch_size=128))
    values.update(kw)
    return SearchConfig(**values)


def trials_of(result) -> list:
    return result.study.get_trials(deepcopy=False)


@pytest.fixture
def saved_model(tmp_path):
    from search_spaces import get_space

    torch.manual_seed(0)
    return save_model(get_space("digits_convnet", dense=True, **SMALL), tmp_path / "dense")


def compress_job(tmp_path: Path, model: Path, name: str = "ctune") -> CompressConfig:
    return CompressConfig(model=str(model), out=str(tmp_path / name), data=DataConfig(batch_size=128),
                          latency_batches=[], grouping={"budget": 0.5, "epochs": 1, "kmeans_restarts": 1,
                                                        "progress": False})


@pytest.fixture
def wide_search(monkeypatch):
    """A stand-in search that saves a real dense model whose width (and so latency and accuracy) grows with lr."""
    from search_spaces import get_space

    def run(cfg: SearchConfig, *, resume: bool = False, on_epoch=None):
        width = 8 * 2 ** round(math.log2(cfg.lr / 0.01))  # lr 0.01 / 0.04 / 0.16 -> width 8 / 32 / 128
        out = Path(cfg.out)
        torch.manual_seed(0)
        save_model(get_space("digits_convnet", dense=True, widths=[width] * 6), out / "model")
        acc = 0.5 + 0.05 * math.log2(width)
        return SimpleNamespace(summary={"val_acc": acc, "macs": 80_000}, model=None, run_dir=out)  # budget 85,328

    monkeypatch.setattr(search_mod, "search", run)


def check_timed(t, budget_ms: float | None, reference_ms: float) -> None:
    """The recorded latency facts of one trained trial agree with each other."""
    u = t.user_attrs
    assert u["latency_ms"] > 0 and u["latency_batch"] == 1 and u["latency_layout"] in ("nchw", "channels_last")
    assert u["latency_fraction"] == pytest.approx(u["latency_ms"] / reference_ms)
    if budget_ms is None:
        assert "measured_latency" not in t.constraints
    else:  # the graded violation is the second constraint, after macs
        assert list(t.constraints) == ["macs", "measured_latency"]
        assert t.constraints["measured_latency"] == pytest.approx(u["latency_ms"] / budget_ms - 1)
        assert u["feasible"] == (u["latency_ms"] <= budget_ms and t.constraints["macs"] <= 0)


# ---------------------------------------------------------------- config

def test_latency_settings_are_validated():
    for bad in ("fast", "2.5", "1.5", "0", "0ms", "-1ms", "ms", 2.5, True, [1]):
        with pytest.raises(ConfigError, match="trial_latency_budget"):
            TuneConfig(trial_latency_budget=bad)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="trial_latency_batch"):
            TuneConfig(trial_latency_batch=bad)
    for pruner in ("median", "percentile", "hyperband"):
        with pytest.raises(ConfigError, match="needs objective=accuracy.*pareto-latency"):
            TuneConfig(objective="pareto-latency", pruner=pruner)
    for good in ("2.5ms", "0.5", 0.5, 1, " 3MS "):
        assert TuneConfig(trial_latency_budget=good).trial_latency_budget == good
    assert TuneConfig(objective="pareto-latency", pruner="none", trial_latency_batch=8).trial_latency_batch == 8
    with pytest.raises(ConfigError, match="objective must be one of accuracy, pareto, pareto-latency"):
        TuneConfig(objective="latency")


def test_cli_has_the_tuning_latency_flags_beside_the_jobs_own(capsys):
    # the job's --latency-budget (a predicted budget of the search itself) and the study's flags must not clash
    for kind in ("search", "compress"):
        with pytest.raises(SystemExit) as exit_:
            main(["tune", kind, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "--trial-latency-budget" in text and "--trial-latency-batch" in text and "pareto-latency" in text


# ---------------------------------------------------------------- budgets met, and never met

def test_compress_study_under_a_latency_budget_always_met(tmp_path, saved_model):
    result = tune(compress_job(tmp_path, saved_model), TuneConfig(trials=2, startup_trials=1,
                                                                  trial_latency_budget=HUGE), quiet=True)
    trials = trials_of(result)
    ref = result.study.user_attrs[LATENCY_ATTR]
    assert ref["ms"] > 0 and ref["model"] == "input model" and ref["batch"] == 1
    s = result.summary
    assert s["latency_budget_ms"] == 100000.0 and s["latency_reference_ms"] == ref["ms"] and s["feasible"] == 2
    for t in trials:
        assert t.state == TrialState.COMPLETE and t.user_attrs["feasible"] is True
        check_timed(t, 100000.0, ref["ms"])
    best = s["best"]
    assert best["latency_ms"] == trials[best["number"]].user_attrs["latency_ms"] > 0
    df = pd.read_csv(tmp_path / "ctune" / "trials.csv")
    assert list(df["user_attrs_latency_ms"]) == pytest.approx([t.user_attrs["latency_ms"] for t in trials])
    assert "system_attrs_constraints:measured_latency" in df.columns
    assert (tmp_path / "ctune" / "latency.png").is_file() and s["plots"]["latency"] == "latency.png"
    text = format_tuning_run(tmp_path / "ctune")
    assert "hard latency budget 100000.000 ms" in text and "latency ms" in text
    assert f"{best['latency_ms']:.3f} ms" in text


def test_search_study_under_a_latency_budget_always_met(tmp_path):
    result = tune(job(tmp_path), TuneConfig(trials=1, trial_latency_budget=HUGE, pruner="none"), quiet=True)
    (t,) = trials_of(result)
    ref = result.study.user_attrs[LATENCY_ATTR]
    assert ref["model"] == "dense digits_convnet" and ref["ms"] > 0
    assert t.state == TrialState.COMPLETE and t.user_attrs["feasible"] is True
    check_timed(t, 100000.0, ref["ms"])
    assert result.best["number"] == 0 and result.best["latency_ms"] == t.user_attrs["latency_ms"]
    assert (tmp_path / "tune" / "best_model" / "architecture.json").is_file()


def test_a_latency_budget_no_trial_meets_leaves_no_best_and_says_why(tmp_path, saved_model):
    result = tune(compress_job(tmp_path, saved_model), TuneConfig(trials=2, startup_trials=1,
                                                                  trial_latency_budget=TINY), quiet=True)
    trials = trials_of(result)
    ref = result.study.user_attrs[LATENCY_ATTR]["ms"]
    for t in trials:  # trained, MACs within budget, but too slow: infeasible, graded
        assert t.state == TrialState.COMPLETE and t.user_attrs["feasible"] is False
        assert t.constraints["macs"] <= 0 and t.constraints["measured_latency"] > 1e5
        check_timed(t, 1e-6, ref)
    s = result.summary
    assert result.best is None and s["feasible"] == 0 and result.pareto_front == []
    assert s["best_model"] is None and not (tmp_path / "ctune" / "best_model").exists()
    assert "2 over the latency budget of 1e-06 ms" in s["no_feasible"]
    assert result.study.best_trials == []  # Optuna agrees: no feasible trial
    text = format_tuning_run(tmp_path / "ctune")
    assert "no feasible trial: none of the 2 completed trial(s) is feasible" in text


# ---------------------------------------------------------------- pareto-latency

def test_pareto_latency_trades_accuracy_against_measured_latency(tmp_path, wide_search):
    enqueue = [{"lr": lr, "reg_strength": 0.5, "gate_lr": 0.03} for lr in (0.16, 0.01, 0.04)]
    result = tune(job(tmp_path), TuneConfig(trials=3, objective="pareto-latency", enqueue=enqueue,
                                            knobs={"budget": None}), quiet=True)
    study = result.study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["val_acc", "latency_ms"]
    trials = trials_of(result)
    ref = study.user_attrs[LATENCY_ATTR]["ms"]
    for t in trials:
        assert t.state == TrialState.COMPLETE and not t.intermediate_values  # never pruned
        assert t.values[1] == t.user_attrs["latency_ms"] and t.values[0] == t.user_attrs["val_acc"]
        assert t.user_attrs["feasible"] is True and list(t.constraints) == ["macs"]  # no budget: no constraint
        check_timed(t, None, ref)
    by_width = sorted(trials, key=lambda t: t.params["lr"])  # widths 8, 32, 128
    assert by_width[0].user_attrs["latency_ms"] < by_width[2].user_attrs["latency_ms"]  # 256x the MACs
    front = result.pareto_front
    assert result.summary["pareto_cost"] == "latency_ms" and len(front) >= 2
    assert [f["latency_ms"] for f in front] == sorted(f["latency_ms"] for f in front)
    accs = [f["val_acc"] for f in front]
    assert accs == sorted(accs) and len(set(accs)) == len(accs)  # more latency on the front buys accuracy
    assert {f["number"] for f in front} == {t.number for t in study.best_trials}
    run = tmp_path / "tune"
    assert (run / "pareto.png").is_file() and (run / "macs.png").is_file()
    text = format_tuning_run(run)
    assert "Pareto front (feasible, accuracy vs latency): trial" in text
    assert f"{front[0]['latency_ms']:.3f} ms" in text


def test_pareto_latency_front_holds_only_trials_within_the_latency_budget(tmp_path, wide_search, monkeypatch):
    monkeypatch.setattr(tune_mod, "model_latency_ms", lambda model, size, batch: (100.0, "nchw"))
    # trial "latency" proportional to MACs: the two studies below see the same numbers, whatever the machine's load
    monkeypatch.setattr(trials_mod, "model_latency_ms",
                        lambda model, size, batch: (count_macs(model, size) / 1e6, "nchw"))
    enqueue = [{"lr": lr, "reg_strength": 0.5, "gate_lr": 0.03} for lr in (0.16, 0.01)]
    trials_probe = tune(job(tmp_path, "probe"), TuneConfig(trials=2, objective="pareto-latency", enqueue=enqueue,
                                                           knobs={"budget": None}), quiet=True)
    narrow, wide = sorted(trials_of(trials_probe), key=lambda t: t.params["lr"])
    # a budget between the two measured latencies, given as a fraction of the (stubbed) 100 ms reference
    cut = math.sqrt(narrow.user_attrs["latency_ms"] * wide.user_attrs["latency_ms"])
    result = tune(job(tmp_path), TuneConfig(trials=2, objective="pareto-latency", enqueue=enqueue,
                                            knobs={"budget": None}, trial_latency_budget=cut / 100), quiet=True)
    assert result.summary["latency_budget_ms"] == pytest.approx(cut)
    by_lr = sorted(trials_of(result), key=lambda t: t.params["lr"])
    fast, slow = by_lr  # width 8 and width 128: latencies far apart, on either side of the budget
    assert fast.user_attrs["latency_ms"] <= cut < slow.user_attrs["latency_ms"]
    assert fast.user_attrs["feasible"] and not slow.user_attrs["feasible"]
    assert slow.constraints["measured_latency"] == pytest.approx(slow.user_attrs["latency_ms"] / cut - 1)
    assert slow.constraints["measured_latency"] > 0 >= fast.constraints["measured_latency"]
    assert [f["number"] for f in result.pareto_front] == [fast.number] == [result.best["number"]]


# ---------------------------------------------------------------- the dense reference

def test_dense_reference_is_measured_once_and_reused_on_resume(tmp_path, wide_search, monkeypatch):
    calls = []
    real = tune_mod.model_latency_ms

    def counting(model, size, batch):
        calls.append(batch)
        return real(model, size, batch)

    monkeypatch.setattr(tune_mod, "model_latency_ms", counting)
    cfg = job(tmp_path)
    enqueue = [{"lr": 0.01, "reg_strength": 0.5, "gate_lr": 0.03}]
    first = tune(cfg, TuneConfig(trials=1, trial_latency_budget=0.99, enqueue=enqueue), quiet=True)
    ref = first.study.user_attrs[LATENCY_ATTR]
    assert calls == [1] and ref["ms"] > 0
    assert first.summary["latency_budget_ms"] == pytest.approx(0.99 * ref["ms"])  # a fraction of the reference
    again = tune(cfg, TuneConfig(trials=2, trial_latency_budget=0.99), resume=True, quiet=True)
    assert calls == [1]  # not measured again
    assert again.study.user_attrs[LATENCY_ATTR] == ref
    assert again.summary["latency_reference_ms"] == ref["ms"]
    assert again.summary["latency_budget_ms"] == pytest.approx(0.99 * ref["ms"])
    trials = trials_of(again)
    assert len(trials) == 2
    for t in trials:
        check_timed(t, 0.99 * ref["ms"], ref["ms"])
    # settings that change the results must match to resume: the budget, the batch, latency on or off
    for other in (TuneConfig(trials=3, trial_latency_budget=0.5), TuneConfig(trials=3, trial_latency_budget=0.99,
                                                                                trial_latency_batch=4),
                  TuneConfig(trials=3)):
        with pytest.raises(ConfigError, match="other settings.*latency"):
            tune(cfg, other, resume=True, quiet=True)
    assert calls == [1]


def test_a_study_without_latency_resumes_as_before_and_times_nothing(tmp_path, wide_search, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("timed a model though no latency setting was given")

    monkeypatch.setattr(tune_mod, "model_latency_ms", never)
    monkeypatch.setattr("nas_grouping.tune._trials.model_latency_ms", never)
    cfg = job(tmp_path)
    result = tune(cfg, TuneConfig(trials=1), quiet=True)
    assert LATENCY_ATTR not in result.study.user_attrs and "latency" not in result.study.user_attrs[
        tune_mod.SETTINGS_ATTR]
    again = tune(cfg, TuneConfig(trials=2), resume=True, quiet=True)
    t = trials_of(again)[-1]
    assert "latency_ms" not in t.user_attrs and list(t.constraints) == ["macs"]
    assert again.summary["latency"] is None and "latency.png" not in again.summary["plots"].values()


@pytest.mark.slow
def test_workers_reuse_the_reference_the_parent_measured(tmp_path):
    cfg = job(tmp_path, finetune_epochs=0)
    result = tune(cfg, TuneConfig(trials=2, workers=2, startup_trials=1, pruner="none", trial_latency_budget=HUGE),
                  quiet=True)
    ref = result.study.user_attrs[LATENCY_ATTR]
    trials = trials_of(result)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    for t in trials:
        assert t.state == TrialState.COMPLETE
        check_timed(t, 100000.0, ref["ms"])
