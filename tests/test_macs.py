"""MAC and parameter counting, verified against torch.utils.flop_counter.FlopCounterMode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nas_grouping import ConfigError, DGConv2d, convert_to_dgconv, count_macs, count_parameters, dgconv_layers
from nas_grouping import PermutedGroupConv2d, export_model, layer_macs
from nas_grouping.macs import LayerMacs, check_input_size, flop_counter_macs

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


class DGNet(nn.Module):
    """A small net mixing DGConv2d (square, non-square, strided, 1x1), a plain conv and a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.c1 = DGConv2d(width, width, 3, padding=1)
        self.c2 = DGConv2d(width, 24, 3, stride=2, padding=1, bias=False)
        self.c3 = DGConv2d(24, 40, 1)
        self.c4 = DGConv2d(40, 40, 3, padding=1, padding_mode="reflect")
        self.unused = nn.Conv2d(40, 40, 1)  # defined, never called: not counted
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = self.c4(x)
        return self.fc(self.pool(x).flatten(1))


def set_random_gates(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in dgconv_layers(model):
        layer.set_gates(torch.randint(0, 2, (layer.num_gates,), generator=gen))


# --------------------------------------------------- count_macs vs FlopCounterMode

TV_CASES = [
    ("resnet18", (3, 32, 48)),
    ("mobilenet_v2", (3, 32, 32)),
    ("resnext50_32x4d", (3, 32, 32)),
    ("shufflenet_v2_x0_5", (3, 32, 32)),
]


@pytest.mark.parametrize("name,size", TV_CASES)
def test_count_macs_matches_flop_counter_on_torchvision(tv_models, name, size):
    model = tv_models(name)
    macs = count_macs(model, size)
    assert macs > 0
    assert macs == flop_counter_macs(model, size)
    if name == "shufflenet_v2_x0_5":  # grouped (depthwise) convs, no masks: the effective counter agrees
        assert macs == flop_counter_macs(model, size, effective=True)


def test_resnext_grouped_convs_are_divided_by_groups(tv_models):
    model = tv_models("resnext50_32x4d")
    rows = {r.name: r for r in layer_macs(model, (3, 32, 32))}
    r = rows["layer1.0.conv2"]
    assert (r.kind, r.groups, r.in_channels, r.out_channels, r.kernel_size) == ("Conv2d", 32, 128, 128, (3, 3))
    assert r.output_size == (8, 8)
    assert r.macs == 8 * 8 * 128 * (128 // 32) * 9
    assert r.params == 128 * 4 * 9


def test_hand_computed_macs():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),       # 8x8 out: 64 * 8 * 3 * 9
        nn.Conv2d(8, 8, 3, stride=2, groups=4, bias=False),  # 3x3 out: 9 * 8 * 2 * 9
        nn.Flatten(),
        nn.Linear(72, 5),                   # 72 * 5
    )
    expected = 64 * 8 * 3 * 9 + 9 * 8 * 2 * 9 + 72 * 5
    assert count_macs(model, (3, 8, 8)) == expected
    assert flop_counter_macs(model, (3, 8, 8)) == expected
    rows = layer_macs(model, (3, 8, 8))
    assert [r.name for r in rows] == ["0", "1", "3"]
    assert [r.macs for r in rows] == [64 * 8 * 3 * 9, 9 * 8 * 2 * 9, 72 * 5]
    assert [r.params for r in rows] == [8 * 3 * 9 + 8, 8 * 2 * 9, 72 * 5 + 5]
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_transposed_conv_and_linear_match_flop_counter():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ConvTranspose2d(8, 4, 3, stride=2, groups=2),
                          nn.Flatten(), nn.Linear(4 * 13 * 13, 5))
    assert count_macs(model, (4, 8, 8)) == flop_counter_macs(model, (4, 8, 8)) > 0


# ------------------------------------------------------ models with DGConv2d layers

@pytest.mark.parametrize("pattern", ["dense", "all_off", "seed0", "seed1", "seed2", "seed3"])
def test_dgconv_model_count_matches_effective_flop_counter(pattern):
    model = DGNet()
    if pattern == "all_off":
        for _, layer in dgconv_layers(model):
            layer.set_gates([0] * layer.num_gates)
    elif pattern.startswith("seed"):
        set_random_gates(model, int(pattern[4:]))
    size = (3, 16, 16)
    macs = count_macs(model, size)
    effective = flop_counter_macs(model, size, effective=True)
    plain = flop_counter_macs(model, size)
    assert macs == effective
    if pattern == "dense":
        assert macs == plain
    else:
        assert macs < plain  # FlopCounterMode counts a masked conv as dense
    # the sum of the per-layer rows is the total
    assert macs == sum(r.macs for r in layer_macs(model, size))


def test_dgconv_model_macs_go_down_as_groups_go_up():
    model = DGNet()
    size = (3, 16, 16)
    previous = count_macs(model, size)
    layer = model.c4
    for g in [2, 4, 8]:
        layer.set_groups(g)
        now = count_macs(model, size)
        assert now < previous
        previous = now


@pytest.mark.parametrize("seed", [0])
def test_converted_torchvision_model_counts(tv_models, seed):
    model = convert_to_dgconv(tv_models("resnet18"))
    # random weights for every layer so that the only zeros are the mask's
    set_random_gates(model, seed)
    size = (3, 32, 32)
    macs = count_macs(model, size)
    assert macs == flop_counter_macs(model, size, effective=True)
    assert macs < flop_counter_macs(model, size)


def test_layer_macs_rows():
    model = DGNet()
    model.c1.set_gates([0, 1, 0, 1])   # 4 groups
    model.c2.set_gates([0, 0, 0])      # 8 groups (16 -> 24: K = 3)
    model.c3.set_gates([1, 0, 1])      # 2 groups (24 -> 40: K = 3)
    model.c4.set_gates([1, 1, 1])      # dense (40 -> 40: K = 3)
    rows = layer_macs(model, (3, 16, 12))
    assert all(isinstance(r, LayerMacs) for r in rows)
    names = [r.name for r in rows]
    assert names == ["stem", "c1", "c2", "c3", "c4", "fc"]  # "unused" is not called, BN not counted
    by = {r.name: r for r in rows}
    assert [by[n].kind for n in names] == ["Conv2d", "DGConv2d", "DGConv2d", "DGConv2d", "DGConv2d", "Linear"]
    assert [by[n].groups for n in names] == [1, 4, 8, 2, 1, 1]
    assert by["stem"].output_size == (16, 12)
    assert by["c1"].output_size == (16, 12)
    assert by["c2"].output_size == (8, 6)
    assert by["c3"].output_size == (8, 6)
    assert by["c4"].output_size == (8, 6)
    assert by["fc"].output_size == ()
    assert (by["c2"].in_channels, by["c2"].out_channels, by["c2"].kernel_size) == (16, 24, (3, 3))
    assert by["c1"].macs == 16 * 12 * 16 * 16 // 4 * 9
    assert by["c2"].macs == 8 * 6 * 24 * 16 // 8 * 9
    assert by["c3"].macs == 8 * 6 * 40 * 24 // 2
    assert by["c4"].macs == 8 * 6 * 40 * 40 * 9
    assert by["fc"].macs == 400
    assert by["c1"].params == 16 * 16 // 4 * 9 + 16
    assert by["c2"].params == 24 * 16 // 8 * 9  # no bias
    assert by["c3"].params == 40 * 24 // 2 + 40
    d = by["c1"].as_dict()
    assert d["name"] == "c1" and d["macs"] == by["c1"].macs


def test_layer_macs_of_exported_model_counts_each_exported_layer_once():
    model = DGNet()
    model.c1.set_gates([1, 0, 1, 0])  # needs a permutation
    model.c3.set_gates([0, 1, 1])     # contiguous: plain grouped conv
    exported = export_model(model)
    rows = {r.name: r for r in layer_macs(exported, (3, 16, 16))}
    # a permuted layer counts itself (the same kept MACs in either exact form), not its inner conv again
    assert "c1" in rows and "c1.conv" not in rows
    assert rows["c1"].kind == "PermutedGroupConv2d" and rows["c1"].groups == 4
    assert rows["c1"].kernel_size == (3, 3)
    assert rows["c3"].kind == "Conv2d" and rows["c3"].groups == 2
    masked = {r.name: r for r in layer_macs(model, (3, 16, 16))}
    assert rows["c1"].macs == masked["c1"].macs
    assert rows["c3"].macs == masked["c3"].macs


# ------------------------------------------------------------------ count_parameters

def test_count_parameters_drops_masked_weights_and_gates():
    model = DGNet()
    set_random_gates(model, 7)
    dg = dict(dgconv_layers(model))
    expected = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] not in dg)
    for layer in dg.values():
        expected += int((layer.masked_weight() != 0).sum())
        expected += layer.bias.numel() if layer.bias is not None else 0
    assert count_parameters(model) == expected
    gates = sum(layer.gate_latent.numel() for layer in dg.values())
    assert count_parameters(model) < sum(p.numel() for p in model.parameters()) - gates
    exported = export_model(model)
    assert count_parameters(exported) == expected == sum(p.numel() for p in exported.parameters())


def test_count_parameters_dense_dgconv_excludes_only_gates():
    model = DGNet()
    gates = sum(layer.gate_latent.numel() for _, layer in dgconv_layers(model))
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) - gates


def test_count_parameters_plain_model(tv_models):
    model = tv_models("mobilenet_v2")
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("bad,words", [
    ((3, -1, 32), "positive"),
    ((3, 0, 32), "positive"),
    ((-3, 32, 32), "positive"),
    ((), "positive"),
    ("abc", "sequence of ints"),
    ((3, "x", 32), "sequence of ints"),
    (None, "sequence of ints"),
    ((3, 32), "(3, 32)"),            # wrong length: the forward fails, the size is named
    ((1, 3, 32, 32), "without the batch"),
    ((1, 32, 32), "3 channels"),    # wrong channel count for the model
    ((4, 32, 32), "(4, 32, 32)"),
])
@pytest.mark.parametrize("fn", [count_macs, layer_macs])
def test_bad_input_size_raises_config_error(tv_models, fn, bad, words):
    model = tv_models("resnet18")
    with pytest.raises(ConfigError) as info:
        fn(model, bad)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [(3, -1, 32), (0,), "abc"])
def test_flop_counter_validates_input_size(bad):
    with pytest.raises(ConfigError):
        flop_counter_macs(DGNet(), bad)


def test_bad_channels_on_dgconv_model_names_layer():
    model = nn.Sequential(DGConv2d(8, 8, 3))
    model[0].layer_name = "first"
    with pytest.raises(ConfigError, match="first.*expected 8 input channels"):
        count_macs(model, (4, 8, 8))


def test_check_input_size_normalises():
    assert check_input_size([3, 32.0, 32]) == (3, 32, 32)


# --------------------------------------------------------- flags and state restored

def _flags(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("fn", [
    lambda m: count_macs(m, (3, 16, 16)),
    lambda m: layer_macs(m, (3, 16, 16)),
    lambda m: flop_counter_macs(m, (3, 16, 16)),
    lambda m: flop_counter_macs(m, (3, 16, 16), effective=True),
], ids=["count_macs", "layer_macs", "flop_counter", "flop_counter_effective"])
@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_train_eval_flags_and_bn_stats_restored(fn, start):
    model = DGNet()
    if start == "eval":
        model.eval()
    elif start == "mixed":
        model.bn.eval()
        model.c2.eval()
    before = _flags(model)
    stats = copy.deepcopy(model.bn.state_dict())
    fn(model)
    assert _flags(model) == before
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, stats[k]), k  # counting ran in eval mode: BN statistics untouched


def test_flags_restored_after_failed_count():
    model = DGNet().train()
    model.c1.eval()
    before = _flags(model)
    with pytest.raises(ConfigError):
        count_macs(model, (5, 16, 16))
    assert _flags(model) == before


def test_counting_leaves_no_hooks_and_no_grad():
    model = DGNet()
    count_macs(model, (3, 16, 16))
    assert all(not m._forward_hooks for m in model.modules())
    for p in model.parameters():
        assert p.grad is None


def test_flop_counter_on_double_model():
    model = DGNet().double()
    assert flop_counter_macs(model, (3, 16, 16)) == count_macs(model, (3, 16, 16))


def test_executed_macs_count_what_the_chosen_form_computes():
    from nas_grouping.macs import format_macs
    from nas_grouping.ops.group_conv import conv_config

    layer = PermutedGroupConv2d(conv_config(nn.Conv2d(16, 16, 3, padding=1, groups=4)), in_perm=list(range(16))[::-1],
                                out_perm=None)
    size = (16, 5, 5)
    structural = count_macs(layer, size)
    assert count_macs(layer, size, executed=True) == structural
    layer.form = "dense"
    assert count_macs(layer, size) == structural
    assert count_macs(layer, size, executed=True) == 4 * structural
    text = format_macs(structural, 4 * structural, 4 * structural)
    assert "structural" in text and "executed" in text and "25.0%" in text and "100.0%" in text
    assert "not recorded" in format_macs(structural, None, 4 * structural)
