"""Training protocols: one recipe fills every job's settings, whatever the source; explicit settings win."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nas_grouping.cli import build_parser
from nas_grouping.config import CompressConfig, SearchConfig, config_from_args, config_from_dict, config_to_dict
from nas_grouping.data import DataConfig
from nas_grouping.errors import ConfigError
from nas_grouping.protocols import PROTOCOLS, list_protocols
from nas_grouping.training import make_lr_scheduler

SHORT = PROTOCOLS["short"]["SearchConfig"]


def test_protocol_fills_the_settings_left_out():
    cfg = config_from_dict(SearchConfig, {"protocol": "short", "data": {"dataset": "cifar10"}})
    assert (cfg.lr, cfg.epochs, cfg.finetune_epochs, cfg.lr_schedule) == (SHORT["lr"], SHORT["epochs"],
                                                                         SHORT["finetune_epochs"], "onecycle")
    assert cfg.data.batch_size == SHORT["data.batch_size"] and cfg.data.dataset == "cifar10"
    assert cfg.channels_last and cfg.label_smoothing == SHORT["label_smoothing"]


def test_explicit_settings_win_even_when_equal_to_the_default():
    default_lr = SearchConfig().lr
    cfg = config_from_dict(SearchConfig, {"protocol": "short", "lr": default_lr, "data": {"batch_size": 64}})
    assert cfg.lr == default_lr and cfg.data.batch_size == 64 and cfg.epochs == SHORT["epochs"]


def test_dataclass_path_fills_defaults_and_keeps_given_values():
    cfg = SearchConfig(protocol="short", lr=0.1, data=DataConfig(dataset="cifar10"))
    assert cfg.lr == 0.1 and cfg.epochs == SHORT["epochs"] and cfg.data.batch_size == SHORT["data.batch_size"]
    again = dataclasses.replace(cfg, lr=SearchConfig().lr)  # a tuning trial's override is not refilled
    assert again.lr == SearchConfig().lr
    assert config_from_dict(SearchConfig, config_to_dict(cfg)) == cfg


def test_command_line_flags_override_the_protocol():
    parser = build_parser()
    args = parser.parse_args(["train", "--protocol", "short", "--lr", "0.05", "--batch-size", "32"])
    cfg = config_from_args(SearchConfig, args)
    assert (cfg.lr, cfg.data.batch_size, cfg.epochs, cfg.protocol) == (0.05, 32, SHORT["epochs"], "short")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--protocol-applied", "true"])


def test_compress_takes_its_own_part_of_the_protocol():
    cfg = config_from_dict(CompressConfig, {"protocol": "short", "model": "somewhere"})
    part = PROTOCOLS["short"]["CompressConfig"]
    assert cfg.grouping.epochs == part["grouping.epochs"]
    assert cfg.grouping.label_smoothing == part["grouping.label_smoothing"]
    assert cfg.data.batch_size == part["data.batch_size"]


def test_long_protocol_is_the_usual_cifar_recipe():
    cfg = SearchConfig(protocol="long", dense=True)
    assert cfg.total_epochs == 200 and cfg.lr_schedule == "cosine" and cfg.data.batch_size == 128


def test_unknown_protocol_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown name 'shrot'.*short"):
        config_from_dict(SearchConfig, {"protocol": "shrot"})
    assert list_protocols() == ["long", "short"]


def test_protocol_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[SearchConfig]\nlr = 0.3\n"data.batch_size" = 100\n')
    cfg = config_from_dict(SearchConfig, {"protocol": str(path)})
    assert (cfg.lr, cfg.data.batch_size) == (0.3, 100)
    path.write_text('[SearchConfig]\nlearning_rate = 0.3\n')
    with pytest.raises(ConfigError, match="no setting.*learning_rate"):
        config_from_dict(SearchConfig, {"protocol": str(path)})


@pytest.mark.parametrize(("kw", "match"), [({"lr_schedule": "step"}, "lr_schedule"),
                                           ({"label_smoothing": 1.0}, "label_smoothing"),
                                           ({"lr_warmup_epochs": 99.0}, "lr_warmup_epochs")])
def test_bad_schedule_settings_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        SearchConfig(**kw)


def test_onecycle_rises_then_falls_to_zero_per_batch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched, per_batch = make_lr_scheduler(opt, "onecycle", epochs=3, steps_per_epoch=10, warmup_epochs=1)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert per_batch and lrs[0] < lrs[5] < lrs[10] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and opt.param_groups[0]["lr"] == 0.0
    _, per_epoch = make_lr_scheduler(opt, "cosine", epochs=3, steps_per_epoch=10)
    assert not per_epoch


def test_bench_quality_cells_train_by_the_protocol(tmp_path):
    from nas_grouping.bench.quality import QualityConfig, _Bench

    bench = _Bench(QualityConfig(protocol="short", out=str(tmp_path)))
    dense = bench.search_config("d", 0, dense=True)
    searched = bench.search_config("s", 1, budget=0.25)
    total = SHORT["epochs"] + SHORT["finetune_epochs"]
    # the dense cell is the `train` command's run: the protocol's schedule, over the same total epochs
    assert (dense.total_epochs, dense.epochs, dense.lr_schedule) == (total, SHORT["epochs"], "onecycle")
    assert (searched.total_epochs, searched.warmup_epochs, searched.budget) == (total, SHORT["warmup_epochs"], 0.25)
    assert dense.data.batch_size == searched.data.batch_size == PROTOCOLS["short"]["QualityConfig"]["data.batch_size"]
