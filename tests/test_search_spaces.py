"""Tests of the ready search spaces in ``search_spaces`` and of their registry."""

from __future__ import annotations

import functools
import importlib
import json
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import search_spaces
from nas_grouping.errors import ConfigError
from nas_grouping.macs import count_macs
from nas_grouping.ops.dgconv import DGConv2d
from search_spaces import _registry, default_input_size, get_space, get_space_builder, list_spaces, register_space

# Per space: extra kwargs, a small forward size, number of searchable layers, default classes.
CASES = {
    "resnet20": ({}, (3, 32, 32), 18, 10),
    "resnet56": ({}, (3, 32, 32), 54, 10),
    "g_resnext50": ({}, (3, 32, 32), 16, 1000),
    "g_resnext_cifar": ({}, (3, 32, 32), 9, 10),
    "mobilenet_v2": ({}, (3, 64, 64), 34, 1000),
    "mobilenet_v2_cifar": ({}, (3, 32, 32), 34, 10),
    "digits_convnet": ({}, (1, 8, 8), 5, 10),
    "torchvision": ({"name": "resnet18"}, (3, 32, 32), 19, 1000),
}
SPACES = sorted(CASES)
DOC_MACS = re.compile(r"Dense MACs at (\d+)x(\d+)x(\d+)(?: for ``name=\"(\w+)\"``)?: ([\d,]+)\.")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_free_models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    built.cache_clear()


@functools.lru_cache(maxsize=None)
def built(name: str, dense: bool) -> nn.Module:
    """One model per space and kind, built with default arguments, shared by the tests that do not train it."""
    torch.manual_seed(0)
    return get_space(name, dense=dense, **CASES[name][0])


def convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def dgconvs(model: nn.Module) -> list[DGConv2d]:
    return [m for m in model.modules() if isinstance(m, DGConv2d)]


def test_registered_names():
    assert list_spaces() == SPACES
    for name in SPACES:
        assert getattr(search_spaces, get_space_builder(name).__name__) is get_space_builder(name)
    for module in ("resnet_cifar", "g_resnext", "mobilenet_v2", "digits_net", "torchvision_models", "_registry"):
        mod = importlib.import_module(f"search_spaces.{module}")
        assert mod.__all__ and all(hasattr(mod, n) for n in mod.__all__)
    assert all(hasattr(search_spaces, n) for n in search_spaces.__all__)


@pytest.mark.parametrize("name", SPACES)
def test_forward_shape_and_searchable_layers(name):
    kwargs, size, n_dg, n_classes = CASES[name]
    model = built(name, False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *size))
    assert out.shape == (2, n_classes)
    assert torch.isfinite(out).all()
    assert len(dgconvs(model)) == n_dg
    stem_name, stem = convs(model)[0]
    assert type(stem) is nn.Conv2d and stem.in_channels == default_input_size(name)[0], stem_name
    assert all(m.learned_groups == 1 for m in dgconvs(model))


@pytest.mark.parametrize("name", SPACES)
def test_dense_baseline_has_the_same_architecture(name):
    kwargs, size, _, n_classes = CASES[name]
    dense, searchable = built(name, True), built(name, False)
    assert not dgconvs(dense)
    with torch.no_grad():
        assert dense.eval()(torch.randn(2, *size)).shape == (2, n_classes)
    assert [(n, type(m) is nn.Conv2d) for n, m in convs(dense)] == [(n, True) for n, _ in convs(searchable)]
    dense_state, state = dense.state_dict(), searchable.state_dict()
    assert set(state) - set(dense_state) == {f"{n}.gate_latent" for n, m in searchable.named_modules()
                                            if isinstance(m, DGConv2d)}
    assert all(dense_state[k].shape == state[k].shape for k in dense_state)


@pytest.mark.parametrize("name", SPACES)
def test_training_step_reaches_the_gates(name):
    kwargs, size, _, n_classes = CASES[name]
    torch.manual_seed(0)
    model = get_space(name, **kwargs).train()
    loss = F.cross_entropy(model(torch.randn(2, *size)), torch.tensor([0, n_classes - 1]))
    loss.backward()
    for layer in dgconvs(model):
        grad = layer.gate_latent.grad
        assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all()


@pytest.mark.parametrize("name", SPACES)
def test_documented_dense_macs_are_measured(name):
    found = DOC_MACS.findall(get_space_builder(name).__doc__)
    assert len(found) == 1, "the docstring states its dense MACs once"
    c, h, w, model_name, number = found[0]
    assert (int(c), int(h), int(w)) == default_input_size(name)
    assert model_name == CASES[name][0].get("name", "")
    documented = int(number.replace(",", ""))
    assert count_macs(built(name, True), default_input_size(name)) == documented
    assert count_macs(built(name, False), default_input_size(name)) == documented


def test_g_resnext50_with_32_groups_is_resnext50_32x4d():
    ours = search_spaces.g_resnext50(groups=32, conv_layer=nn.Conv2d)
    ref = torchvision.models.resnext50_32x4d()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert count_macs(ours, (3, 64, 64)) == count_macs(ref, (3, 64, 64))


def test_mobilenet_v2_matches_torchvision():
    ours = search_spaces.mobilenet_v2(conv_layer=nn.Conv2d)
    ref = torchvision.models.mobilenet_v2()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert count_macs(ours, (3, 64, 64)) == count_macs(ref, (3, 64, 64))


@pytest.mark.parametrize("width_mult", [0.35, 0.5, 0.75, 1.3])
@pytest.mark.parametrize("builder", [search_spaces.mobilenet_v2, search_spaces.mobilenet_v2_cifar])
def test_mobilenet_v2_layers(builder, width_mult):
    model = builder(width_mult=width_mult)
    for name, conv in convs(model)[1:]:
        assert conv.in_channels % 8 == 0 and conv.out_channels % 8 == 0, name
        if conv.kernel_size == (1, 1):
            assert isinstance(conv, DGConv2d) and conv.max_groups >= 8, name
        else:
            assert type(conv) is nn.Conv2d and conv.groups == conv.in_channels, name
    assert model(torch.randn(2, 3, 32, 32)).shape[1] == model.classifier[-1].out_features


def test_resnet_cifar_layers():
    model = search_spaces.resnet20(width=2)
    for name, conv in convs(model)[1:]:
        if conv.kernel_size == (3, 3):
            assert isinstance(conv, DGConv2d), name
        else:
            assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and "shortcut" in name, name
    assert [m.out_channels for m in dgconvs(model)][::6] == [32, 64, 128]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1 + 18 + 2
    assert len(dgconvs(search_spaces.cifar_resnet(32))) == 30
    for depth in (19, 2, 0):
        with pytest.raises(ConfigError):
            search_spaces.cifar_resnet(depth)


def test_g_resnext_layers():
    model = search_spaces.g_resnext_cifar(groups=4)
    assert all(m.kernel_size == (3, 3) and m.learned_groups == 4 for m in dgconvs(model))
    grouped = search_spaces.g_resnext_cifar(groups=4, conv_layer=nn.Conv2d)
    dense_macs = count_macs(built("g_resnext_cifar", True), (3, 32, 32))
    assert count_macs(model, (3, 32, 32)) == count_macs(grouped, (3, 32, 32)) < dense_macs
    assert [m.out_channels for m in dgconvs(model)] == [32] * 3 + [64] * 3 + [128] * 3
    assert type(convs(model)[0][1]) is nn.Conv2d
    for name, conv in convs(model)[1:]:
        assert isinstance(conv, DGConv2d) == (conv.kernel_size == (3, 3)), name
    with pytest.raises(ConfigError):
        search_spaces.g_resnext_cifar(layers=(1, 1), widths=(32, 64, 128))
    with pytest.raises(ConfigError):
        search_spaces.GResNeXt((1,), (32,), num_classes=10, stem="tiny")


def test_digits_convnet_layers():
    model = search_spaces.digits_convnet()
    widths = [m.out_channels for _, m in convs(model)]
    assert widths == [32, 32, 64, 64, 128, 128]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1
    with pytest.raises(ConfigError):
        search_spaces.digits_convnet(pool_after=6)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet20", {}),
        ("g_resnext_cifar", {}),
        ("mobilenet_v2_cifar", {}),
        ("digits_convnet", {}),
        ("torchvision", {"name": "resnet18"}),
    ],
)
def test_small_single_channel_inputs(name, kwargs):
    model = get_space(name, num_classes=10, in_channels=1, **kwargs)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert type(convs(model)[0][1]) is nn.Conv2d and convs(model)[0][1].in_channels == 1
    assert dgconvs(model)


@pytest.mark.parametrize("name, kwargs", [("resnet20", {"width": 2}), ("torchvision", {"name": "resnet18"})])
@pytest.mark.parametrize("dense", [False, True])
def test_recipe_rebuilds_the_model(name, kwargs, dense):
    torch.manual_seed(0)
    model = get_space(name, num_classes=5, dense=dense, **kwargs)
    recipe = model.nas_grouping_recipe
    assert recipe == {"space": name, "kwargs": {"num_classes": 5, **kwargs, "dense": dense}}
    saved = json.loads(json.dumps(recipe))
    for layer in dgconvs(model):
        layer.set_groups(2)
    rebuilt = get_space(saved["space"], **saved["kwargs"])
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    assert rebuilt.nas_grouping_recipe == recipe


def test_recipe_records_the_default_dense_flag():
    assert get_space("digits_convnet").nas_grouping_recipe == {"space": "digits_convnet", "kwargs": {"dense": False}}


def test_unknown_space_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown search space 'resnet21'") as info:
        get_space("resnet21")
    assert all(name in str(info.value) for name in SPACES)
    with pytest.raises(ConfigError):
        default_input_size("resnet21")
    with pytest.raises(ConfigError):
        get_space_builder("resnet21")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"conv_layer": nn.Conv2d}, "dense=True"),
        ({"conv_layer": DGConv2d}, "dense=True"),
        ({"dense": 1}, "dense must be"),
        ({"depth": 20}, "unexpected argument"),
        ({"width": float("nan")}, "JSON"),
        ({"num_classes": torch.tensor(3)}, "JSON"),
    ],
)
def test_get_space_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        get_space("resnet20", **kwargs)


def test_register_space(monkeypatch):
    monkeypatch.setattr(_registry, "_SPACES", dict(_registry._SPACES))
    monkeypatch.setattr(_registry, "_INPUT_SIZES", dict(_registry._INPUT_SIZES))
    with pytest.raises(ConfigError, match="already registered"):
        register_space("resnet20")(search_spaces.resnet56)
    assert get_space_builder("resnet20") is search_spaces.resnet20

    @register_space("tiny_test_space", input_size=(1, 4, 4))
    def tiny(*, num_classes: int = 2, conv_layer=DGConv2d) -> nn.Module:
        return nn.Sequential(conv_layer(8, 8, 1), nn.Flatten(), nn.LazyLinear(num_classes))

    assert "tiny_test_space" in list_spaces() and default_input_size("tiny_test_space") == (1, 4, 4)
    assert dgconvs(get_space("tiny_test_space")) and not dgconvs(get_space("tiny_test_space", dense=True))
    with pytest.raises(ConfigError, match="already registered"):
        register_space("tiny_test_space")(tiny)
    register_space("tiny_no_size")(tiny)
    with pytest.raises(ConfigError, match="input_size"):
        default_input_size("tiny_no_size")
    for bad in ("", None):
        with pytest.raises(ConfigError):
            register_space(bad)


def test_torchvision_space_conversion_options():
    model = search_spaces.torchvision_space("resnet18", num_classes=10, skip_pointwise=True)
    assert len(dgconvs(model)) == 16 and all(m.kernel_size == (3, 3) for m in dgconvs(model))
    assert not dgconvs(search_spaces.torchvision_space("resnet18", num_classes=10, conv_layer=nn.Conv2d))
    mobile = search_spaces.torchvision_space("mobilenet_v3_small", num_classes=10)
    depthwise = [n for n, m in convs(torchvision.models.mobilenet_v3_small()) if m.groups == m.in_channels > 1]
    assert depthwise and [n for n, m in convs(mobile) if type(m) is nn.Conv2d and m.groups > 1] == depthwise
    assert dgconvs(mobile)
    assert mobile(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="not a torchvision"):
        search_spaces.torchvision_space("resnet19")
    with pytest.raises(ConfigError):
        search_spaces.torchvision_space("resnet18", conv_layer=nn.Conv1d)
    with pytest.raises(ConfigError):
        search_spaces.torchvision_space("resnet18", in_channels=1, weights="IMAGENET1K_V1")
