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
    retrained = tmp_path / "retrained"  # the groups the search found, trained from scratch
    assert main(["train", "--space", "digits_convnet", "--space-kwargs", SMALL, "--epochs", "2", "--progress", "false",
                 "--fixed-groups", str(out), "--out", str(retrained)]) == 0
    found = json.loads((out / "summary.json").read_text())["groups"]
    assert json.loads((retrained / "summary.json").read_text())["groups"] == found
    assert json.loads((retrained / "config.json").read_text())["fixed_groups"] == found


def test_spaces_lists_registered_spaces(capsys):
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "g_resnext_cifar" in out


def test_quiet_silences_the_progress_lines_and_the_library_logs_without_the_cli(tmp_path, capsys, caplog):
    import logging

    from nas_grouping.cli import build_parser
    from nas_grouping.search.loop import search

    tiny = ["--space", "digits_convnet", "--space-kwargs", SMALL, "--epochs", "2", "--warmup-epochs", "1",
            "--finetune-epochs", "0", "--progress", "false", "--measure-latency", "false"]
    parser = build_parser()
    assert parser.parse_args(["--quiet", "search"]).log_level == logging.WARNING
    assert parser.parse_args(["search", "--verbose"]).log_level == logging.DEBUG
    assert not hasattr(parser.parse_args(["search"]), "log_level"), "not a setting of the job unless given"
    assert main(["search", *tiny, "--out", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr()
    assert "epoch   1/2" in loud.out and "validation accuracy" in loud.out
    assert main(["--quiet", "search", *tiny, "--out", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and "epoch" not in quiet.err and "validation accuracy" not in quiet.err
    assert (tmp_path / "quiet" / "summary.json").is_file(), "quiet, not idle"
    logger = logging.getLogger("nas_grouping")
    assert logger.level == logging.NOTSET and not any(type(h).__name__ == "_ConsoleHandler" for h in logger.handlers)
    # from Python, without the CLI: nothing on stdout, every line on the "nas_grouping" logger
    caplog.set_level(logging.INFO, logger="nas_grouping")
    args = build_parser().parse_args(["search", *tiny, "--out", str(tmp_path / "api")])
    search(config_from_args(SearchConfig, args))
    assert capsys.readouterr().out == ""
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("nas_grouping")]
    assert any(m.startswith("epoch   1/2") for m in lines) and any("validation accuracy" in m for m in lines)
