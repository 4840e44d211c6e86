"""export_layer / export_model to real group convolutions, and save_model / load_model."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas_grouping import (
    ConfigError, DGConv2d, ExportError, PermutedGroupConv2d, convert_to_dgconv, count_macs, count_parameters,
    dgconv_layers, export_model, load_model, save_model,
)
from nas_grouping.export.model import export_layer, group_permutation, read_architecture
from nas_grouping.macs import flop_counter_macs
from helpers import randomize_bn

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    scale = max(a.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err} vs output scale {scale}"


def set_random_gates(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in dgconv_layers(model):
        layer.set_gates(torch.randint(0, 2, (layer.num_gates,), generator=gen))


class SmallNet(nn.Module):
    """A hand-made net built from keyword arguments (the recipe), with DGConv2d layers when searchable."""

    def __init__(self, width: int = 16, classes: int = 5, dg: bool = False) -> None:
        super().__init__()
        conv = DGConv2d if dg else nn.Conv2d
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.block = nn.Sequential(
            conv(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            conv(width, 24, 3, stride=2, padding=1),
            nn.ReLU(),
            conv(24, 40, 1),
        )
        self.last = conv(40, 40, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(40, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = self.block(x)
        x = F.relu(self.last(x))
        return self.fc(x.mean((2, 3)))


class OtherNet(nn.Module):
    """A wrong builder: different layer names."""

    def __init__(self, width: int = 16, classes: int = 5, dg: bool = False) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, width, 3)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def searched_smallnet(seed: int = 0, width: int = 16) -> SmallNet:
    torch.manual_seed(seed)
    model = randomize_bn(SmallNet(width=width, dg=True), seed)
    set_random_gates(model, seed)
    return model.eval()


# ----------------------------------------------------------------- single layers

LAYER_CONFIGS = [
    # in, out, kernel, stride, padding, bias, padding_mode
    (8, 8, 3, 1, 1, True, "zeros"),
    (16, 16, 3, 2, 1, False, "zeros"),
    (24, 40, 3, 1, 1, True, "zeros"),
    (48, 12, 1, 1, 0, True, "zeros"),
    (12, 36, 3, 2, (0, 1), False, "zeros"),
    (32, 16, 1, 2, 0, False, "zeros"),
    (40, 24, (3, 1), 1, "same", True, "reflect"),
    (8, 24, 3, 1, 1, True, "circular"),
    (6, 10, 5, 2, 2, True, "replicate"),
]


@pytest.mark.parametrize("cfg", LAYER_CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("seed", range(4))
def test_export_layer_matches_masked_layer(cfg, seed):
    cin, cout, k, s, p, bias, mode = cfg
    torch.manual_seed(seed)
    layer = DGConv2d(cin, cout, k, s, p, bias=bias, padding_mode=mode).eval()
    layer.set_gates(torch.randint(0, 2, (layer.num_gates,)))
    g = layer.learned_groups
    new = export_layer(layer)
    x = torch.randn(2, cin, 9, 11)
    with torch.no_grad():
        assert_close_rel(new(x), layer(x))
    conv = new.conv if isinstance(new, PermutedGroupConv2d) else new
    assert type(conv) is nn.Conv2d
    assert conv.groups == g
    assert conv.weight.shape == (cout, cin // g, *layer.kernel_size)
    assert (conv.bias is not None) == bias
    assert (conv.stride, conv.padding, conv.dilation, conv.padding_mode) == (
        layer.stride, layer.padding, layer.dilation, layer.padding_mode)
    assert sum(p.numel() for p in new.parameters()) == layer.num_parameters()


@pytest.mark.parametrize("gates", [list(p) for p in itertools.product([0, 1], repeat=3)])
def test_export_every_pattern_and_permutation_only_when_needed(gates):
    layer = DGConv2d(8, 24, 3, padding=1).eval()   # K = 3, r_out = 3
    layer.set_gates(gates)
    new = export_layer(layer)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert_close_rel(new(x), layer(x))
    off = [j for j, v in enumerate(gates) if v == 0]
    contiguous = off == list(range(len(off)))   # off gates are the leading (outer) bits
    assert isinstance(new, PermutedGroupConv2d) != contiguous
    if contiguous:
        assert type(new) is nn.Conv2d and new.groups == 2 ** len(off)
    else:
        assert new.groups == new.conv.groups == 2 ** len(off)
        assert new.in_perm is not None and new.out_perm is not None


@pytest.mark.parametrize("cin,cout", [(8, 8), (24, 40), (48, 12)])
def test_group_permutation_block_diagonalises_mask(cin, cout):
    layer = DGConv2d(cin, cout, 1)
    for gates in itertools.product([0, 1], repeat=layer.num_gates):
        layer.set_gates(list(gates))
        in_perm, out_perm, g = group_permutation(layer)
        assert sorted(in_perm) == list(range(cin)) and sorted(out_perm) == list(range(cout))
        u = layer.relationship_matrix()[out_perm][:, in_perm]
        assert torch.equal(u, torch.block_diag(*[torch.ones(cout // g, cin // g)] * g))


def test_export_layer_double_precision():
    layer = DGConv2d(16, 16, 3, padding=1).double().eval()
    layer.set_gates([1, 0, 1, 0])
    new = export_layer(layer)
    assert new.conv.weight.dtype == torch.float64
    x = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(new(x), layer(x), rtol=1e-12, atol=1e-12)


def test_relaxed_gates_block_export_and_name_the_layer():
    model = SmallNet(dg=True)
    model.block[3].relax_gates(2.0)
    with pytest.raises(ExportError, match=r"block\.3"):
        export_model(model)
    model.block[3].harden_gates()
    export_model(model)


# ------------------------------------------------------------------ whole models

@pytest.mark.parametrize("seed", range(3))
def test_export_small_net(seed):
    model = searched_smallnet(seed)
    exported = export_model(model).eval()
    assert not any(isinstance(m, DGConv2d) for m in exported.modules())
    assert any(isinstance(m, DGConv2d) for m in model.modules())  # the original is untouched
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_close_rel(exported(x), model(x))
    for name, layer in dgconv_layers(model):
        new = exported.get_submodule(name)
        conv = new.conv if isinstance(new, PermutedGroupConv2d) else new
        assert type(conv) is nn.Conv2d and conv.groups == layer.learned_groups
    size = (3, 16, 16)
    macs = count_macs(model, size)
    assert count_macs(exported, size) == macs == flop_counter_macs(exported, size)
    assert macs == flop_counter_macs(model, size, effective=True)
    assert count_parameters(exported) == count_parameters(model) == sum(p.numel() for p in exported.parameters())


def test_export_inplace():
    model = searched_smallnet(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    same = export_model(model, inplace=True)
    assert same is model
    assert not any(isinstance(m, DGConv2d) for m in model.modules())
    with torch.no_grad():
        assert_close_rel(model.eval()(x), expected)


@pytest.mark.parametrize("seed", range(2))
def test_export_converted_resnet18(tv_models, seed):
    original = randomize_bn(copy.deepcopy(tv_models("resnet18")), seed)
    masked = convert_to_dgconv(original).eval()
    set_random_gates(masked, seed)
    groups = {n: m.learned_groups for n, m in dgconv_layers(masked)}
    assert max(groups.values()) > 1
    exported = export_model(masked).eval()
    assert not any(isinstance(m, DGConv2d) for m in exported.modules())
    assert any(isinstance(m, PermutedGroupConv2d) for m in exported.modules())
    for name, g in groups.items():
        new = exported.get_submodule(name)
        assert isinstance(new, (nn.Conv2d, PermutedGroupConv2d)) and new.groups == g
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(exported(x), masked(x))
    size = (3, 32, 32)
    macs = count_macs(masked, size)
    assert count_macs(exported, size) == macs == flop_counter_macs(exported, size)
    assert macs < flop_counter_macs(original, size)  # really smaller than the dense model
    assert count_parameters(exported) == count_parameters(masked)


def test_export_converted_resnext_at_source_groups(tv_models):
    """Gates start at the source groups: exporting gives back plain grouped convs, no permutation."""
    masked = convert_to_dgconv(tv_models("resnext50_32x4d"), exclude=["layer3.*", "layer4.*"], skip_grouped=False)
    exported = export_model(masked)
    assert not any(isinstance(m, PermutedGroupConv2d) for m in exported.modules())
    assert exported.layer1[0].conv2.groups == 32 and type(exported.layer1[0].conv2) is nn.Conv2d
    assert torch.equal(exported.layer1[0].conv2.weight, tv_models("resnext50_32x4d").layer1[0].conv2.weight)


def test_export_after_eval_forward_with_grad():
    model = searched_smallnet(0)  # eval mode
    model(torch.randn(1, 3, 16, 16))  # e.g. a validation pass without torch.no_grad()
    exported = export_model(model)
    assert not any(isinstance(m, DGConv2d) for m in exported.modules())


# ---------------------------------------------------------------- save / load

def saved(tmp_path, seed: int = 0, width: int = 16):
    model = searched_smallnet(seed, width)
    exported = export_model(model).eval()
    folder = save_model(exported, tmp_path / "model", recipe={"kwargs": {"width": width}}, extra={"macs": 123},
                        builder=SmallNet)
    return model, exported, folder


@pytest.mark.parametrize("seed", range(3))
def test_save_load_round_trip(tmp_path, seed):
    model, exported, folder = saved(tmp_path, seed)
    assert (folder / "weights.pt").is_file() and (folder / "architecture.json").is_file()
    loaded = load_model(folder, builder=SmallNet).eval()
    assert type(loaded) is SmallNet
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))
        assert_close_rel(loaded(x), model(x))
    assert count_macs(loaded, (3, 16, 16)) == count_macs(model, (3, 16, 16))
    # weights are plain tensors: loadable without unpickling code
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert set(state) == set(exported.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # a loaded model can be saved and loaded again
    again = load_model(save_model(loaded, tmp_path / "again"), builder=SmallNet).eval()
    with torch.no_grad():
        assert torch.equal(again(x), exported(x))


def test_architecture_json_records_groups_and_permutations(tmp_path):
    model = searched_smallnet(0)
    model.block[0].set_gates([1, 0, 1, 0])   # needs a permutation
    model.block[5].set_gates([0, 1, 1])      # contiguous groups: a plain nn.Conv2d
    model.last.set_gates([1, 1, 1])          # dense
    exported = export_model(model, fold=False)
    folder = save_model(exported, tmp_path / "m", recipe={"kwargs": {}}, extra={"top1": 0.5}, builder=SmallNet)
    arch = json.loads((folder / "architecture.json").read_text())
    assert arch == read_architecture(folder)
    assert arch["format"] == "nas-grouping/1"
    assert arch["recipe"] == {"kwargs": {}}
    assert arch["extra"] == {"top1": 0.5}
    # the records are what differs from the base network: the grouped layers, not the dense ones
    assert set(arch["layers"]) == {"block.0", "block.5"}
    # with no base to compare with (no builder), every layer that can change is recorded
    layers = read_architecture(save_model(exported, tmp_path / "all", recipe={"kwargs": {}}))["layers"]
    assert set(layers) >= {name for name, _ in dgconv_layers(model)}
    perm = layers["block.0"]
    assert perm["type"] == "PermutedGroupConv2d"
    assert perm["config"]["conv"]["groups"] == 4
    in_perm, out_perm, _ = group_permutation(model.block[0])
    assert perm["config"]["in_perm"] == in_perm and perm["config"]["out_perm"] == out_perm
    assert layers["block.5"]["type"] == "Conv2d" and layers["block.5"]["config"]["groups"] == 2
    assert layers["last"]["config"]["groups"] == 1
    assert layers["last"]["config"]["padding_mode"] == "reflect"
    for rec in layers.values():
        cfg = rec["config"]["conv"] if rec["type"] == "PermutedGroupConv2d" else rec["config"]
        assert {"in_channels", "out_channels", "kernel_size", "groups", "stride", "padding"} <= set(cfg)


def test_load_missing_weights(tmp_path):
    _, _, folder = saved(tmp_path)
    (folder / "weights.pt").unlink()
    with pytest.raises(ExportError, match="weights.pt is missing"):
        load_model(folder, builder=SmallNet)


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", b"PK\x03\x04garbage"])
def test_load_corrupt_weights(tmp_path, content):
    _, _, folder = saved(tmp_path)
    (folder / "weights.pt").write_bytes(content)
    with pytest.raises(ExportError, match="not a readable weights file"):
        load_model(folder, builder=SmallNet)


def test_load_truncated_weights(tmp_path):
    _, _, folder = saved(tmp_path)
    data = (folder / "weights.pt").read_bytes()
    (folder / "weights.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="weights.pt"):
        load_model(folder, builder=SmallNet)


def test_load_pickled_code_is_refused(tmp_path):
    _, _, folder = saved(tmp_path)
    torch.save({"obj": SmallNet()}, folder / "weights.pt")  # a pickled module, not tensors
    with pytest.raises(ExportError, match="not a readable weights file"):
        load_model(folder, builder=SmallNet)


def test_load_missing_architecture(tmp_path):
    _, _, folder = saved(tmp_path)
    (folder / "architecture.json").unlink()
    with pytest.raises(ExportError, match="architecture.json"):
        load_model(folder, builder=SmallNet)
    with pytest.raises(ExportError, match="no saved model"):
        load_model(tmp_path / "does-not-exist", builder=SmallNet)


@pytest.mark.parametrize("text,words", [
    ("{not json", "not readable JSON"),
    ('{"format": "something-else/9"}', "not a nas-grouping architecture"),
    ("[1, 2, 3]", "not a nas-grouping architecture"),
])
def test_load_corrupt_architecture(tmp_path, text, words):
    _, _, folder = saved(tmp_path)
    (folder / "architecture.json").write_text(text)
    with pytest.raises(ExportError, match=words):
        load_model(folder, builder=SmallNet)


def test_load_with_wrong_builder(tmp_path):
    _, _, folder = saved(tmp_path)
    with pytest.raises(ExportError, match="wrong builder"):
        load_model(folder, builder=OtherNet)


def test_load_with_builder_of_other_sizes(tmp_path):
    _, _, folder = saved(tmp_path, width=16)
    with pytest.raises(ExportError, match="does not fit"):
        load_model(folder, builder=lambda width: SmallNet(width=32))


def test_load_without_builder_or_space(tmp_path):
    _, _, folder = saved(tmp_path)
    with pytest.raises(ExportError, match="builder="):
        load_model(folder)


def test_load_unregistered_layer_type(tmp_path):
    _, _, folder = saved(tmp_path)
    arch = json.loads((folder / "architecture.json").read_text())
    arch["layers"]["last"]["type"] = "MysteryConv"
    (folder / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ExportError, match="MysteryConv"):
        load_model(folder, builder=SmallNet)


def test_save_refuses_model_with_dgconv(tmp_path):
    model = searched_smallnet(0)
    with pytest.raises(ExportError, match="export_model"):
        save_model(model, tmp_path / "m", recipe={"kwargs": {}})
    assert not (tmp_path / "m").exists()


def test_save_without_recipe_says_what_to_pass(tmp_path):
    exported = export_model(searched_smallnet(0))
    with pytest.raises(ExportError) as info:
        save_model(exported, tmp_path / "m")
    msg = str(info.value)
    assert "recipe=" in msg and "builder=" in msg
    assert isinstance(info.value, ValueError)


def test_save_rejects_non_json_recipe(tmp_path):
    exported = export_model(searched_smallnet(0))
    with pytest.raises(ExportError, match="JSON"):
        save_model(exported, tmp_path / "m", recipe={"kwargs": {"width": object()}})


def test_load_to_map_location(tmp_path):
    _, exported, folder = saved(tmp_path)
    loaded = load_model(folder, builder=SmallNet, map_location="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())


# ------------------------------------------------------------- PermutedGroupConv2d

def test_permuted_group_conv_config_round_trip():
    layer = DGConv2d(16, 16, 3, padding=1).eval()
    layer.set_gates([0, 1, 0, 1])
    new = export_layer(layer)
    assert isinstance(new, PermutedGroupConv2d)
    cfg = json.loads(json.dumps(new.to_config()))
    rebuilt = PermutedGroupConv2d.from_config(cfg)
    rebuilt.load_state_dict(new.state_dict())
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), new(x))
    assert set(new.state_dict()) == {"conv.weight", "conv.bias"}  # index buffers are not persistent


@pytest.mark.parametrize("perm", [[0, 1, 2], [0, 0, 1, 2], [1, 2, 3, 4]])
def test_permuted_group_conv_rejects_bad_permutations(perm):
    kwargs = {"in_channels": 4, "out_channels": 4, "kernel_size": [1, 1], "stride": [1, 1], "padding": [0, 0],
              "dilation": [1, 1], "groups": 2, "bias": True, "padding_mode": "zeros"}
    with pytest.raises(ConfigError, match="permutation"):
        PermutedGroupConv2d(kwargs, in_perm=perm, out_perm=None)


def test_load_with_builder_that_rejects_the_recipe(tmp_path):
    class NoKwargs(nn.Module):
        def __init__(self) -> None:
            super().__init__()

    _, _, folder = saved(tmp_path)
    with pytest.raises(ExportError, match="width"):
        load_model(folder, builder=NoKwargs)


def test_export_model_of_a_bare_layer():
    layer = DGConv2d(8, 8, 3, padding=1).eval()
    layer.set_gates([0, 1, 0])
    exported = export_model(layer)
    assert not any(isinstance(m, DGConv2d) for m in exported.modules())
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert_close_rel(exported(x), layer(x))
