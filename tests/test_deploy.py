"""Deploy export: standard modules only, equal outputs in PyTorch, torch.export, ONNX Runtime and TorchScript."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import randomize_bn
from nas_grouping import (ChannelPruning, ConfigError, DGConv2d, ExportError, MissingDependencyError, PermutedGroupConv2d,
                          SelfGrouping, count_macs, export_model, load_model, save_model)
from nas_grouping.cli import main
from nas_grouping.export._deploy_layers import Branches, ChannelGather, GroupedLinear
from nas_grouping.export.deploy import DeployConfig, deployable, export_deployable, run_deploy
from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear
from nas_grouping.ops.group_conv import conv_config

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")

STANDARD = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.Sequential, nn.ModuleList, nn.AdaptiveAvgPool2d,
            nn.Flatten, nn.Identity, ChannelGather, Branches, GroupedLinear)
CONV_GROUPS = [([0, 1, 2, 3], [0, 5, 7]), ([4, 5, 6], [1, 2]), ([7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4, 5, 6, 7])]
LINEAR_GROUPS = [([0, 1], [0, 3, 4]), ([2, 3, 4], [5, 6, 7, 8]), ([5], [9, 10, 11, 12, 13, 14, 15])]
SIZE = (8, 6, 6)


def _mixed(conv_form: str, perm_form: str, conv_groups=CONV_GROUPS, linear_groups=LINEAR_GROUPS) -> nn.Module:
    perm = PermutedGroupConv2d(conv_config(nn.Conv2d(8, 8, 1, groups=2)), in_perm=[1, 0, 3, 2, 5, 4, 7, 6],
                               out_perm=[7, 6, 5, 4, 3, 2, 1, 0], form=perm_form)
    model = nn.Sequential(perm, DiverseGroupConv2d(8, 16, 3, 1, 1, groups=conv_groups, form=conv_form), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          DiverseGroupLinear(16, 6, groups=linear_groups, form=conv_form))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


def _only_standard(model: nn.Module) -> None:
    foreign = {type(m).__name__ for m in model.modules() if not isinstance(m, STANDARD)}
    assert not foreign, foreign


@pytest.mark.parametrize("form", ["dense", "grouped", "per_group", "auto"])
@pytest.mark.parametrize("perm_form", ["grouped", "dense"])
@pytest.mark.parametrize("batch", [1, 64])
def test_every_form_becomes_standard_modules_with_equal_outputs_and_its_executed_macs(form, perm_form, batch):
    model = _mixed(form, perm_form)
    dep = deployable(model, SIZE, batch=batch)
    _only_standard(dep)
    x = torch.randn(batch, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_macs(dep, SIZE) == count_macs(model, SIZE, executed=True, batch=batch)
    assert count_macs(dep, SIZE) >= count_macs(model, SIZE)
    assert not any(p.requires_grad for p in dep.parameters())
    assert all(isinstance(m, PermutedGroupConv2d) for m in model[:1])  # the input model is left alone


def test_a_group_that_reads_nothing_outputs_its_bias_in_every_form():
    groups = [*CONV_GROUPS[:2], ([7], []), (list(range(8, 16)), [3, 4])]
    x = torch.randn(2, *SIZE)
    for form in ("dense", "grouped", "per_group"):
        model = _mixed(form, "grouped", conv_groups=groups, linear_groups=[([0, 1, 2], []), ([3, 4, 5], [0, 1])])
        with torch.no_grad():
            torch.testing.assert_close(deployable(model, SIZE)(x), model(x), rtol=1e-5, atol=1e-5)


def test_auto_forms_need_the_input_size_and_follow_the_batch():
    model = _mixed("auto", "grouped")
    with pytest.raises(ExportError, match="input_size"):
        deployable(model)
    assert isinstance(deployable(_mixed("dense", "dense")), nn.Module)  # fixed forms need no size


def test_soft_dgconv_gates_are_refused_and_hard_ones_are_exported_first():
    layer = DGConv2d(8, 8, 3, padding=1)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    layer.relax_gates(1.0)
    with pytest.raises(ExportError, match="soft"):
        deployable(model, SIZE)
    layer.harden_gates()
    layer.set_gates(torch.tensor([1, 0, 1]))
    dep = deployable(model, SIZE)
    _only_standard(dep)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_macs(dep, SIZE) == count_macs(model, SIZE)  # the grouped form is shipped


def _digits_resnet(seed: int = 0, *, searchable: bool = False) -> nn.Module:
    """ResNet-20 for 1x8x8 digits: its DGConv search space, or the dense network (all gates on, exported)."""
    from search_spaces import get_space

    torch.manual_seed(seed)
    model = randomize_bn(get_space("resnet20", in_channels=1, num_classes=10), seed).eval()
    return model if searchable else export_model(model)


def _saved_kinds(tmp_path) -> dict[str, str]:
    """One saved model of each kind users deploy: searched, self-grouped, channel-pruned, pruned + grouped."""
    size = (1, 8, 8)
    searched = _digits_resnet(searchable=True)
    gen = torch.Generator().manual_seed(0)
    for m in searched.modules():
        if isinstance(m, DGConv2d):
            m.set_gates(torch.randint(0, 2, (m.num_gates,), generator=gen))
    exported = export_model(searched)
    for name, m in exported.named_modules():  # ship some layers in the dense form, as the latency tools do
        if isinstance(m, PermutedGroupConv2d) and name.startswith("layer1"):
            m.form = "dense"
    grouped = SelfGrouping(budget=0.5, clusters=2, kmeans_restarts=1, progress=False).apply(_digits_resnet(1), size)
    pruned = ChannelPruning(_digits_resnet(2), size).prune(0.4)
    both = SelfGrouping(budget=0.5, clusters=2, kmeans_restarts=1, progress=False).apply(pruned, size)
    folders = {}
    for kind, model in {"search": exported, "compress": grouped, "channels": pruned, "hybrid": both}.items():
        folders[kind] = str(save_model(model, tmp_path / kind))
    return folders


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_every_saved_model_kind_round_trips_through_the_deploy_export(tmp_path, fmt):
    suffix = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}[fmt]
    for kind, folder in _saved_kinds(tmp_path).items():
        model = load_model(folder)
        report = export_deployable(model, tmp_path / f"{kind}{suffix}", input_size=(1, 8, 8))
        assert report.format == fmt and report.bytes > 0
        assert report.max_abs_error <= 1e-5 * report.output_scale, (kind, report)
        assert report.checked_batches == (1, 3)
        assert report.executed_macs >= report.structural_macs
        assert (tmp_path / f"{kind}{suffix}").is_file()
        assert not list(tmp_path.glob(".*partial*"))


def test_onnx_runtime_runs_the_file_at_any_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _mixed("per_group", "grouped")
    export_deployable(model, tmp_path / "m.onnx", input_size=SIZE)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 32):
        x = torch.randn(batch, *SIZE)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            assert (got - model(x)).abs().max() <= 1e-5


def test_file_errors_are_one_clear_line(tmp_path):
    model = _mixed("dense", "dense")
    (tmp_path / "taken.onnx").write_bytes(b"x")
    with pytest.raises(ExportError, match="exists"):
        export_deployable(model, tmp_path / "taken.onnx", input_size=SIZE)
    with pytest.raises(ExportError, match="suffix"):
        export_deployable(model, tmp_path / "m.bin", input_size=SIZE)
    with pytest.raises(ExportError, match="folder"):
        export_deployable(model, tmp_path, input_size=SIZE, format="onnx")
    with pytest.raises(ExportError, match="not a folder"):
        export_deployable(model, tmp_path / "missing" / "m.pt2", input_size=SIZE)
    export_deployable(model, tmp_path / "taken.onnx", input_size=SIZE, overwrite=True)
    assert (tmp_path / "taken.onnx").stat().st_size > 1


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else real(name))
    with pytest.raises(MissingDependencyError, match=r"nas-grouping\[deploy\]"):
        export_deployable(_mixed("dense", "dense"), tmp_path / "m.onnx", input_size=SIZE)
    assert not (tmp_path / "m.onnx").exists()


def test_outputs_that_differ_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    import nas_grouping.export.deploy as deploy_mod

    real = deploy_mod._run_file
    monkeypatch.setattr(deploy_mod, "_run_file", lambda path, fmt, x: real(path, fmt, x) + 1e-3)
    with pytest.raises(ExportError, match="differ"):
        export_deployable(_mixed("dense", "dense"), tmp_path / "m.pt2", input_size=SIZE)
    assert not list(tmp_path.iterdir())


def test_the_export_command_writes_and_checks_the_file(tmp_path, capsys):
    folder = save_model(_digits_resnet(), tmp_path / "model")
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.pt2")]) == 0
    out = capsys.readouterr().out
    assert "max abs error" in out and "structural" in out and "executed" in out
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err
    assert main(["export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "n.onnx")]) == 2
    assert "no saved model" in capsys.readouterr().err


def test_the_config_is_parsed_one_way():
    cfg = DeployConfig(model="m", out="x.onnx", input_size="1x8x8")
    assert cfg.input_size == [1, 8, 8]
    with pytest.raises(ConfigError, match="--out"):
        DeployConfig(model="m")
    with pytest.raises(ConfigError, match="format"):
        DeployConfig(model="m", out="x", format="tflite")
    with pytest.raises(ConfigError, match="C,H,W"):
        DeployConfig(model="m", out="x.onnx", input_size="8,8")


def test_run_deploy_reads_a_run_folder_and_its_spaces_input_size(tmp_path):
    save_model(_digits_resnet(), tmp_path / "run" / "model", extra={"input_size": [1, 8, 8]})
    report = run_deploy(DeployConfig(model=str(tmp_path / "run"), out=str(tmp_path / "m.pt")))
    assert report.input_size == (1, 8, 8) and report.format == "torchscript"
    save_model(_digits_resnet(), tmp_path / "older")  # saved before jobs recorded it: the space's own size
    report = run_deploy(DeployConfig(model=str(tmp_path / "older"), out=str(tmp_path / "m.onnx")))
    assert report.input_size == (1, 32, 32)


def test_an_onnx_file_with_its_weights_beside_it_keeps_their_names(tmp_path, monkeypatch):
    """Over 2 GB the exporter writes the weights to a side file named after the model file."""
    op = pytest.importorskip("torch.onnx._internal.exporter._onnx_program")
    monkeypatch.setattr(op, "_LARGE_MODEL_THRESHOLD", 0)
    report = export_deployable(_mixed("dense", "dense"), tmp_path / "model.onnx", input_size=SIZE)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "model.onnx" and len(names) == 2 and names[1].startswith("model.onnx")
    assert report.bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert report.max_abs_error <= 1e-5 * report.output_scale
