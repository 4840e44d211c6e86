"""The search loop end to end on the bundled digits data (small network, few epochs)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import nas_grouping.search.loop as search_mod
from nas_grouping import BudgetError, ConfigError, count_macs, load_model
from nas_grouping.config import SearchConfig
from nas_grouping.data import DataConfig
from nas_grouping.search.loop import search

SMALL = {"widths": [8, 8, 16, 16, 16, 16]}


def config(tmp_path, **kw) -> SearchConfig:
    base = dict(space="digits_convnet", space_kwargs=SMALL, epochs=3, warmup_epochs=1, finetune_epochs=1,
                budget=0.5, progress=False, out=str(tmp_path / "run"), data=DataConfig(batch_size=128),
                measure_latency=False)
    base.update(kw)
    return SearchConfig(**base)


def test_search_meets_budget_and_writes_a_readable_run(tmp_path):
    cfg = config(tmp_path, measure_latency=True)
    result = search(cfg)
    s = result.summary
    lat = s["latency"]
    assert lat["batch_1"]["dense_ms"] > 0 and lat["batch_32"]["exported_ms"] > 0
    assert lat["export_choice"]["layout"] in ("nchw", "channels_last")
    assert s["budget_met"] and s["macs"] <= s["budget_macs"] == s["dense_macs"] // 2
    assert s["macs"] == count_macs(result.model, (1, 8, 8))
    assert s["export_max_abs_diff"] < 1e-4
    run = tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "history.csv", "layers.csv", "summary.json", "search.png"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert list(history["phase"]) == ["warmup", "search", "search", "finetune"]
    layers = pd.read_csv(run / "layers.csv")
    assert {"layer", "groups", "macs_dense", "macs_after"} <= set(layers.columns)
    assert layers["macs_after"].sum() == s["macs"]
    # the exported model ships: it loads without the search code and computes the same
    loaded = load_model(run / "model").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), result.model(x), atol=1e-5)
    assert json.loads((run / "summary.json").read_text())["val_acc"] == pytest.approx(s["val_acc"])


def test_unreachable_budget_fails_before_training(tmp_path):
    cfg = config(tmp_path, budget=0.01)
    with pytest.raises(BudgetError, match="cannot be met"):
        search(cfg)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_existing_run_needs_resume_and_resume_needs_same_settings(tmp_path):
    cfg = config(tmp_path, epochs=2, finetune_epochs=0)
    search(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        search(cfg)
    with pytest.raises(ConfigError, match="other settings"):
        search(config(tmp_path, epochs=2, finetune_epochs=0, lr=0.01), resume=True)


def test_resume_after_interruption_loses_no_epoch(tmp_path, monkeypatch):
    cfg = config(tmp_path, epochs=3, finetune_epochs=1)
    real = search_mod.train_epoch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search_mod, "train_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        search(cfg)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["next_epoch"] == 2
    monkeypatch.setattr(search_mod, "train_epoch", real)
    result = search(cfg, resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.summary["budget_met"]


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Seeded per-epoch loaders and saved RNG state: a resumed run repeats the uninterrupted one."""
    whole = search(config(tmp_path / "a", epochs=3, finetune_epochs=0, data=DataConfig(batch_size=128, augment=False)))
    cfg = config(tmp_path / "b", epochs=3, finetune_epochs=0, data=DataConfig(batch_size=128, augment=False))
    real = search_mod.train_epoch
    calls = {"n": 0}

    def stop_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search_mod, "train_epoch", stop_second)
    with pytest.raises(KeyboardInterrupt):
        search(cfg)
    monkeypatch.setattr(search_mod, "train_epoch", real)
    resumed = search(cfg, resume=True)
    assert resumed.summary["groups"] == whole.summary["groups"]
    assert resumed.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], rel=1e-4)


def test_bilevel_search_runs_and_meets_budget(tmp_path):
    result = search(config(tmp_path, bilevel=True, regularizer="multiplicative", reg_strength=1.0))
    assert result.summary["budget_met"]


def test_dense_training_has_no_gates_and_full_macs(tmp_path):
    result = search(config(tmp_path, dense=True))
    assert result.summary["macs"] == result.summary["dense_macs"]
    assert result.summary["groups"] == {}


@pytest.mark.slow
def test_budget_fractions_give_ordered_models_within_budget(tmp_path):
    """On a network that learns (ResNet-20, warmed up): tighter budgets give smaller exported models."""
    macs = []
    for fraction in (0.25, 0.5, 0.75):
        cfg = config(tmp_path / str(fraction), space="resnet20", space_kwargs={}, epochs=7, warmup_epochs=3,
                     finetune_epochs=0, budget=fraction, data=DataConfig(batch_size=64))
        s = search(cfg).summary
        assert s["budget_met"], fraction
        macs.append(s["macs"])
    assert macs[0] < macs[1] < macs[2]


def test_fixed_groups_is_the_uniform_baseline(tmp_path):
    result = search(config(tmp_path, fixed_groups=4))
    s = result.summary
    assert set(s["groups"].values()) == {4}
    assert [h["phase"] for h in result.history] == ["train"] * 4
    assert s["macs"] == s["budget_macs"] < s["dense_macs"] and not s["projected"]
    with pytest.raises(ConfigError, match="power of two"):
        config(tmp_path, fixed_groups=3)


def test_a_budget_ramp_moves_the_target_over_the_search_epochs(tmp_path):
    cfg = SearchConfig(epochs=7, warmup_epochs=2, finetune_epochs=1, budget_ramp=1.0)
    assert [search_mod._budget_share(cfg, e) for e in range(2, 7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    half = SearchConfig(epochs=6, warmup_epochs=2, finetune_epochs=1, budget_ramp=0.5)
    assert [search_mod._budget_share(half, e) for e in range(2, 6)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert search_mod._budget_share(SearchConfig(), 3) == 1.0
    with pytest.raises(ConfigError, match="budget_ramp"):
        SearchConfig(budget_ramp=1.5)
    result = search(config(tmp_path / "run", budget_ramp=1.0, budget=0.5))
    assert result.summary["budget_met"]


def test_a_search_starts_from_a_trained_models_weights(tmp_path):
    from nas_grouping import save_model
    from search_spaces import get_space

    torch.manual_seed(3)
    trained = save_model(get_space("digits_convnet", dense=True, **SMALL), tmp_path / "trained")
    base = search_mod.build_search_model(SearchConfig(space="digits_convnet", space_kwargs=SMALL), 10, 1)
    search_mod._init_weights(base, str(trained))
    state = load_model(trained).state_dict()
    for name, value in base.state_dict().items():
        if not name.endswith("gate_latent"):
            assert torch.equal(value, state[name]), name
    other = save_model(get_space("digits_convnet", dense=True, widths=[8, 8, 8, 16, 16, 16]), tmp_path / "other")
    with pytest.raises(ConfigError, match="do not fit the search space"):
        search_mod._init_weights(base, str(other))


def test_distillation_loss_is_the_tempered_kl_to_the_teacher_mixed_with_the_task():
    import torch.nn.functional as F

    from nas_grouping.training import Distillation

    torch.manual_seed(0)
    teacher, x = torch.nn.Linear(4, 3), torch.randn(8, 4)
    student = torch.nn.Linear(4, 3)
    d = Distillation(teacher, weight=0.25, temperature=2.0)
    task = torch.tensor(1.5)
    same = d.loss(x, teacher(x).detach(), task)
    assert same.item() == pytest.approx(0.75 * 1.5, abs=1e-6)  # a student equal to its teacher: no KL
    logits = student(x)
    kl = F.kl_div(F.log_softmax(logits / 2, 1), F.softmax(teacher(x) / 2, 1), reduction="batchmean")
    loss = d.loss(x, logits, task)
    assert loss.item() == pytest.approx(0.75 * 1.5 + 0.25 * 4 * kl.item(), rel=1e-5)
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None  # the teacher is a frozen copy
    for bad in (dict(weight=0.0), dict(weight=1.5), dict(temperature=0.0)):
        with pytest.raises(ConfigError):
            Distillation(teacher, **bad)
    with pytest.raises(TypeError, match="teacher must be"):
        Distillation("model")
