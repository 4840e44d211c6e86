"""The nas-grouping command line: flags from the config dataclass, clear errors, reports."""

from __future__ import annotations

import json

import pytest

from nas_grouping.cli import build_parser, main
from nas_grouping.config import SearchConfig, config_from_args

SMALL = '{"widths": [8, 8, 16, 16, 16, 16]}'


def test_flags_come_from_the_config_dataclass():
    args = build_parser().parse_args(["search", "--budget", "12M", "--gate-lr", "0.1", "--batch-size", "32",
                                      "--bilevel", "--augment", "false", "--space-kwargs", SMALL])
    cfg = config_from_args(SearchConfig, args)
    assert cfg.budget == 12e6 and cfg.gate_lr == 0.1 and cfg.bilevel is True
    assert cfg.data.batch_size == 32 and cfg.data.augment is False
    assert cfg.space_kwargs == {"widths": [8, 8, 16, 16, 16, 16]}
    assert cfg.epochs == SearchConfig().epochs  # untouched fields keep their defaults


def test_config_file_then_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": 7, "lr": 0.2, "data": {"batch_size": 16}}))
    args = build_parser().parse_args(["search", "--config", str(f), "--lr", "0.3"])
    from nas_grouping.config import read_config_file

    cfg = config_from_args(SearchConfig, args, base=read_config_file(f))
    assert cfg.epochs == 7 and cfg.lr == 0.3 and cfg.data.batch_size == 16


def test_unknown_setting_in_config_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochz": 7}))
    assert main(["search", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) epochz" in err and "Traceback" not in err


def test_bad_values_exit_with_one_line(capsys, tmp_path):
    assert main(["search", "--warmup-epochs", "5", "--epochs", "3", "--out", str(tmp_path / "r")]) == 2
    assert "warmup_epochs" in capsys.readouterr().err
    assert main(["search", "--budget", "0.001", "--space", "digits_convnet", "--space-kwargs", SMALL,
                 "--out", str(tmp_path / "r2")]) == 2
    assert "cannot be met" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--budget", "lots"])


def test_search_then_report(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["search", "--space", "digits_convnet", "--space-kwargs", SMALL, "--epochs", "2", "--warmup-epochs", "1",
               "--finetune-epochs", "0", "--progress", "false", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "budget" in printed and "met" in printed
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "macs_after" in table and "features" in table


def test_spaces_lists_registered_spaces(capsys):
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "g_resnext_cifar" in out
