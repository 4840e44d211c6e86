"""No silent wrong results, no lost run folders, one clear line for bad input (issue: reliability sweep)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from helpers import interrupt_train_epoch
from nas_grouping.files import RUN_FILE, atomic_write, claim_run_folder, run_job
from nas_grouping.budget import MacBudget
from nas_grouping.cli import main
from nas_grouping.config import SearchConfig, TuneConfig, config_from_dict, config_to_dict
from nas_grouping.errors import ConfigError

SMALL = '{"widths": [8, 8, 16, 16, 16, 16]}'
TINY_SEARCH = ["--space", "digits_convnet", "--space-kwargs", SMALL, "--epochs", "2", "--warmup-epochs", "1",
               "--finetune-epochs", "0", "--progress", "false", "--measure-latency", "false"]


@pytest.mark.parametrize("value", [1.5, "1.5", "2.5K"[:-1], 100.25])
def test_a_budget_above_one_must_be_whole_macs(value):
    with pytest.raises(ConfigError, match="whole number"):
        MacBudget.parse(value)


def test_fractional_budget_above_one_is_refused_on_the_command_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["search", "--budget", "1.5", "--out", str(tmp_path / "r")])
    assert "whole number" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("values", [{"budget": "12M"}, {"budget": "0.25", "epochs": "3", "warmup_epochs": "1"},
                                    {"dense": "true", "lr": "0.1"}])
def test_config_files_and_dicts_parse_as_flags_do(values):
    cfg = config_from_dict(SearchConfig, values)
    flags = {"budget": {"12M": 12e6, "0.25": 0.25}, "epochs": {"3": 3}, "warmup_epochs": {"1": 1},
             "dense": {"true": True}, "lr": {"0.1": 0.1}}
    for key, text in values.items():
        assert getattr(cfg, key) == flags[key][text]


def test_dataclass_budget_string_is_parsed_and_wrong_types_are_named():
    assert SearchConfig(budget="12M").budget == 12e6
    with pytest.raises(ConfigError, match=r"SearchConfig\.epochs: expected an integer, got '3'"):
        SearchConfig(epochs="3")
    with pytest.raises(ConfigError, match=r"SearchConfig\.epochs: expected an integer, got 'x'"):
        config_from_dict(SearchConfig, {"epochs": "x"})


def test_config_file_with_string_numbers_runs_from_the_cli(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"budget": "50%"}))
    assert main(["search", "--config", str(f), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "budget '50%'" in err and "Traceback" not in err


def test_run_folders_know_their_job_and_refuse_another(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["search", *TINY_SEARCH, "--out", str(run)]) == 0
    assert run_job(run) == "search" and json.loads((run / RUN_FILE).read_text()) == {"job": "search"}
    summary = (run / "summary.json").read_text()
    capsys.readouterr()
    assert main(["compress", "--model", str(run), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds a search run" in err and "Traceback" not in err
    assert main(["tune", "search", *TINY_SEARCH, "--trials", "1", "--out", str(run)]) == 2
    assert "holds a search run" in capsys.readouterr().err
    assert (run / "summary.json").read_text() == summary  # nothing overwritten


def test_runs_made_before_run_json_are_recognised(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "tune.json").write_text("{}")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"model": "m", "grouping": {}}))
    assert (run_job(tmp_path / "t"), run_job(tmp_path / "c"), run_job(tmp_path / "new")) == ("tune", "compress", None)
    with pytest.raises(ConfigError, match="holds a compress run"):
        claim_run_folder(tmp_path / "c", "search")


def test_out_that_is_a_file_or_unwritable_is_one_clear_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["search", *TINY_SEARCH, "--out", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["search", *TINY_SEARCH, "--out", str(ro / "run")]) == 2
        assert "cannot write the run folder" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_tune_resume_needs_a_tuning_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tune", "search", *TINY_SEARCH, "--trials", "1", "--out", str(empty), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no tuning run" in err and not (empty / "tune.json").exists()


@pytest.mark.slow
def test_a_moved_tuning_run_resumes_its_own_study(tmp_path):
    from nas_grouping.tune.study import tune

    base = config_from_dict(SearchConfig, {"space": "digits_convnet", "space_kwargs": json.loads(SMALL), "epochs": 2,
                                          "warmup_epochs": 1, "finetune_epochs": 0, "progress": False,
                                          "measure_latency": False, "out": str(tmp_path / "first")})
    tune(base, TuneConfig(trials=1, knobs={"lr": {"low": 0.01, "high": 0.1, "log": True}}), quiet=True)
    (tmp_path / "first").rename(tmp_path / "moved")
    moved = config_from_dict(SearchConfig, {**config_to_dict(base), "out": str(tmp_path / "moved")})
    result = tune(moved, TuneConfig(trials=2, knobs={"lr": {"low": 0.01, "high": 0.1, "log": True}}), resume=True,
                  quiet=True)
    assert result.study.study_name == "first"
    assert len(result.study.trials) == 2
    assert sorted(p.name for p in (tmp_path / "moved" / "trials").iterdir()) == ["0000", "0001"]


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_killed_tuning_worker_leaves_results_and_one_clear_line(tmp_path, monkeypatch, capsys):
    import nas_grouping.tune.study as tune_mod

    monkeypatch.setattr(tune_mod, "_run_workers", lambda n, payload: ["nas-grouping-tune-1 was killed by signal 9"])
    out = tmp_path / "study"
    assert main(["tune", "search", *TINY_SEARCH, "--trials", "2", "--workers", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "killed by signal 9" in err and "study is intact" in err and "Traceback" not in err
    assert (out / "summary.json").is_file() and (out / "tune.json").is_file()


class _Attention(torch.nn.Module):
    """Attention written the way Swin and ViT write it: F.linear on a module's weight, matmuls, fused SDPA."""

    def __init__(self, dim: int = 16, fused: bool = False) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.fused = fused

    def forward(self, x):
        q, k, v = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        if self.fused:
            out = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        else:
            out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out)


@pytest.mark.parametrize("fused", [False, True])
def test_mac_counter_counts_attention_outside_modules(fused):
    from nas_grouping.macs import FUNCTIONAL, count_macs, layer_macs

    tokens, dim = 10, 16
    expected = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim
    model = _Attention(dim, fused)
    assert count_macs(model, (tokens, dim)) == expected
    assert [r.name for r in layer_macs(model, (tokens, dim))] == ["proj", FUNCTIONAL]


def test_mac_counter_refuses_an_operation_it_cannot_cost():
    from nas_grouping.macs import count_macs

    class Outer(torch.nn.Module):
        def forward(self, x):
            return torch.mv(x[0].T @ x[0], x[0, 0])

    with pytest.raises(ConfigError, match="aten.mv.*refusing"):
        count_macs(Outer(), (4, 4))


def test_channel_pruning_refuses_a_model_with_nothing_to_prune():
    from nas_grouping.channels.pruning import ChannelPruning

    with pytest.raises(ConfigError, match="no channel of this _Attention can be pruned"):
        ChannelPruning(_Attention(), (10, 16)).prune(0.3)


def test_report_reads_every_kind_of_run_folder_or_says_what_it_is(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    claim_run_folder(unfinished, "compress")
    assert main(["report", str(unfinished)]) == 2
    assert "has not finished" in capsys.readouterr().err
    search_run = tmp_path / "s"
    assert main(["search", *TINY_SEARCH, "--out", str(search_run)]) == 0
    compressed = tmp_path / "c"
    assert main(["compress", "--model", str(search_run), "--fraction", "0.3", "--epochs", "0", "--progress", "false",
                 "--latency-batches", "", "--out", str(compressed)]) == 0
    capsys.readouterr()
    assert main(["report", str(compressed)]) == 0
    out = capsys.readouterr()
    assert "MACs" in out.out and "Traceback" not in out.err


def _saved_grouped_model(folder):
    from search_spaces import get_space

    from nas_grouping.convert import dgconv_layers
    from nas_grouping.export.model import export_model, save_model

    model = get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16])
    for _, layer in dgconv_layers(model):
        layer.set_groups(2)
    save_model(export_model(model.eval()), folder)
    return json.loads((folder / "architecture.json").read_text())


@pytest.mark.parametrize("damage", ["groups", "missing-key", "no-config"])
def test_damaged_architecture_json_is_one_clear_error(tmp_path, damage):
    from nas_grouping.errors import ExportError
    from nas_grouping.export.model import load_model

    arch = _saved_grouped_model(tmp_path)
    name = next(iter(arch["layers"]))
    if damage == "groups":
        arch["layers"][name]["config"]["groups"] = 3
    elif damage == "missing-key":
        del arch["layers"][name]["config"]["in_channels"]
    else:
        del arch["layers"][name]["config"]
    (tmp_path / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ExportError, match=f"layer '{name}'.*damaged"):
        load_model(tmp_path)


def test_mnasnet_saves_and_loads_with_its_state_dict_versions(tmp_path):
    import torchvision

    from nas_grouping.export.model import load_model, save_model

    model = torchvision.models.mnasnet0_5(num_classes=10).eval()
    save_model(model, tmp_path / "m", recipe={"kwargs": {"num_classes": 10}})
    loaded = load_model(tmp_path / "m", builder=torchvision.models.mnasnet0_5)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))


def test_bare_postgresql_url_names_the_form_that_works(monkeypatch):
    import importlib.util

    from nas_grouping.tune._storage import StorageSpec, open_storage
    from nas_grouping.errors import MissingDependencyError

    if importlib.util.find_spec("psycopg") is not None or importlib.util.find_spec("psycopg2") is None:
        pytest.skip("needs psycopg2 installed and psycopg 3 absent, as the test extra installs")
    with pytest.raises(MissingDependencyError, match=r"postgresql\+psycopg2://"):
        open_storage(StorageSpec("server", "postgresql://u:p@127.0.0.1:1/db"), heartbeat=60)


def _folder_with_a_corrupt_image(root):
    from test_data import write_images

    write_images(root, {"a": 4, "b": 4})
    bad = root / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not an image")
    return bad


def test_corrupt_image_in_an_image_folder_is_named_not_a_traceback(tmp_path, capsys):
    from nas_grouping.data import DataConfig, load_datasets
    from nas_grouping.errors import DataError

    bad = _folder_with_a_corrupt_image(tmp_path / "imgs")
    cfg = dict(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), image_size=8, val_fraction=0.3)
    ds = load_datasets(DataConfig(**cfg))  # lazy: found when read
    with pytest.raises(DataError, match="broken.jpg"):
        [ds.train[i] for i in range(len(ds.train))] + [ds.val[i] for i in range(len(ds.val))]
    with pytest.raises(DataError, match=r"1 image file\(s\).*broken\.jpg"):
        load_datasets(DataConfig(**cfg, check_images="check"))
    skipped = load_datasets(DataConfig(**cfg, check_images="skip"))
    assert len(skipped.train) + len(skipped.val) == 8
    assert main(["train", "--space", "digits_convnet", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                 "--image-size", "8", "--check-images", "check", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


def test_out_of_memory_is_one_line_not_a_bad_input_message(monkeypatch, capsys, tmp_path):
    import nas_grouping.search.loop as search_mod

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 123456789 bytes")

    monkeypatch.setattr(search_mod, "train_epoch", oom)
    assert main(["search", *TINY_SEARCH, "--out", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert "out of memory" in err and "smaller --batch-size" in err and "Traceback" not in err
    assert "input_size" not in err and "weights file" not in err


def test_temporaries_of_killed_writes_are_removed_when_the_folder_is_claimed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale, fresh = run / ".checkpoint.pt.tmp-abc123", run / ".summary.json.tmp-def456"
    stale.write_bytes(b"half a checkpoint")
    fresh.write_bytes(b"being written now")
    os.utime(stale, (0, 0))
    claim_run_folder(run, "search")
    assert not stale.exists() and fresh.exists()


def test_wall_time_of_a_resumed_run_counts_every_session(tmp_path, monkeypatch):
    import nas_grouping.search.loop as search_mod
    from nas_grouping.training import load_checkpoint

    cfg = config_from_dict(SearchConfig, {"space": "digits_convnet", "space_kwargs": json.loads(SMALL), "epochs": 3,
                                          "warmup_epochs": 1, "finetune_epochs": 0, "progress": False,
                                          "measure_latency": False, "out": str(tmp_path / "r")})
    real = search_mod.train_epoch
    interrupt_train_epoch(monkeypatch, search_mod, at=3)
    with pytest.raises(KeyboardInterrupt):
        search_mod.search(cfg)
    first = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["wall_time_s"]
    monkeypatch.setattr(search_mod, "train_epoch", real)
    result = search_mod.search(cfg, resume=True)
    assert first > 0 and result.summary["wall_time_s"] > first
    assert result.history[-1]["time_s"] > first


def test_a_run_saved_before_a_setting_existed_still_resumes():
    from nas_grouping.config import SearchConfig, check_same_settings, config_to_dict

    now = config_to_dict(SearchConfig())
    old = config_to_dict(SearchConfig())
    del old["data"]["check_images"], old["label_smoothing"]
    check_same_settings(old, now, allowed=set(), where="run", kind=SearchConfig)
    with pytest.raises(ConfigError, match="other settings"):
        check_same_settings(old, now, allowed=set(), where="run")
    old["lr"] = 0.5
    with pytest.raises(ConfigError, match="lr: run has 0.5"):
        check_same_settings(old, now, allowed=set(), where="run", kind=SearchConfig)


def test_unstable_timings_are_taken_again_then_named():
    import itertools
    import time
    import warnings

    from nas_grouping.latency.timer import UnstableTimingWarning, sample_ms

    calls = itertools.count()

    def busy_machine():  # every other call is held up 20x: another process took the core
        time.sleep(0.02 if next(calls) % 2 else 0.001)

    with pytest.warns(UnstableTimingWarning, match="unstable timings: busy"):
        times = sample_ms({"busy": busy_machine, "steady": lambda: time.sleep(0.001)}, warmup=0, repeats=8)
    assert next(calls) == 2 * 8  # sampled twice (one retry) before warning
    assert len(times["busy"]) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableTimingWarning)
        sample_ms({"steady": lambda: time.sleep(0.002)}, warmup=0, repeats=8)


def test_the_command_shows_a_library_warning_as_one_line(capsys):
    import warnings

    from nas_grouping.latency.timer import UnstableTimingWarning
    from nas_grouping.log import log_to_console

    undo = log_to_console()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("unstable timings: x", UnstableTimingWarning)
    finally:
        undo()
    assert capsys.readouterr().err == "warning: unstable timings: x\n"
