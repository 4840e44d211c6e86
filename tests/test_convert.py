"""convert_to_dgconv, conversion_plan and the architecture / weight parameter split."""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize_bn
from nas_grouping import (
    DGConv2d, arch_parameters, conversion_plan, convert_to_dgconv, dgconv_layers, weight_parameters,
)

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


class SubConv(nn.Conv2d):
    """An nn.Conv2d subclass (its forward might do anything): never converted."""

    def forward(self, x):
        return super().forward(x) * 0.5


class HandNet(nn.Module):
    """Every kind of conv the conversion must decide about."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(8, 16, 3, padding=1)                 # first conv, convertible if not skipped
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)       # depthwise
        self.pw = nn.Conv2d(16, 32, 1)                              # 1x1
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)   # starts at 4 groups
        self.odd = nn.Conv2d(32, 12, 3, padding=1, bias=False)     # K = 2, r_out = 3
        self.g3 = nn.Conv2d(12, 12, 3, padding=1, groups=3)        # groups not a power of two
        self.nopow = nn.Conv2d(12, 5, 1)                            # 12 and 5 share no power of two
        self.sub = SubConv(5, 5, 1)                                 # subclass: own forward
        self.head = nn.Sequential(nn.Conv2d(5, 5, 1))               # 5 -> 5: nothing to learn
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.dw(x))
        x = F.relu(self.pw(x))
        x = F.relu(self.grouped(x))
        x = self.g3(self.odd(x))
        x = self.head(self.sub(self.nopow(x)))
        return self.fc(x.mean((2, 3)))


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = max(a.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err} vs output scale {scale}"


def snapshot(model: nn.Module):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model: nn.Module, snap) -> None:
    types, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


# ------------------------------------------------------ torchvision models

TV = ["resnet18", "mobilenet_v2", "resnext50_32x4d"]


@pytest.mark.parametrize("name", TV)
def test_converted_torchvision_model_computes_the_same(tv_models, name):
    original = randomize_bn(copy.deepcopy(tv_models(name))).eval()
    snap = snapshot(original)
    converted = convert_to_dgconv(original, skip_grouped=False).eval()
    assert converted is not original
    assert_unchanged(original, snap)  # the original is untouched
    assert not any(isinstance(m, DGConv2d) for m in original.modules())

    plan = conversion_plan(original, skip_grouped=False)
    layers = dict(dgconv_layers(converted))
    assert set(layers) == {s.name for s in plan if s.convert}
    assert len(layers) > 10
    source = dict(original.named_modules())
    for lname, layer in layers.items():
        assert layer.layer_name == lname
        assert layer.learned_groups == source[lname].groups  # dense, or the source groups
    if name == "resnext50_32x4d":
        assert {layers[n].learned_groups for n in layers if n.endswith("conv2")} == {32}

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(converted(x), original(x))


def test_resnet18_plan_reasons(tv_models):
    plan = conversion_plan(tv_models("resnet18"))
    names = [s.name for s in plan]
    assert names == [n for n, m in tv_models("resnet18").named_modules() if isinstance(m, nn.Conv2d)]
    assert plan[0].name == "conv1" and not plan[0].convert
    assert "first convolution" in plan[0].reason
    assert all(s.convert and s.reason == "converted" for s in plan[1:])
    down = next(s for s in plan if s.name == "layer2.0.downsample.0")
    assert (down.in_channels, down.out_channels, down.kernel_size, down.groups) == (64, 128, (1, 1), 1)


def test_resnext_plan_says_starting_groups(tv_models):
    plan = {s.name: s for s in conversion_plan(tv_models("resnext50_32x4d"), skip_grouped=False)}
    assert plan["layer1.0.conv2"].convert
    assert plan["layer1.0.conv2"].reason == "converted, starting at groups=32"
    assert plan["layer1.0.conv1"].reason == "converted"


def test_mobilenet_depthwise_skipped_by_default(tv_models):
    model = tv_models("mobilenet_v2")
    plan = conversion_plan(model)
    dw = [s for s in plan if s.groups > 1]
    assert dw and all(s.groups == s.in_channels for s in dw)
    assert all(not s.convert and "depthwise" in s.reason for s in dw)
    converted = convert_to_dgconv(model)
    modules = dict(converted.named_modules())
    for s in dw:
        assert type(modules[s.name]) is nn.Conv2d


def test_mobilenet_depthwise_converted_when_asked(tv_models):
    original = randomize_bn(copy.deepcopy(tv_models("mobilenet_v2"))).eval()
    converted = convert_to_dgconv(original, skip_depthwise=False).eval()
    dw = [s for s in conversion_plan(original, skip_depthwise=False) if s.groups > 1]
    modules = dict(converted.named_modules())
    for s in dw:
        layer = modules[s.name]
        if s.in_channels & (s.in_channels - 1) == 0:  # 32 channels: 32 groups = 2^5
            assert s.convert and isinstance(layer, DGConv2d)
            assert layer.learned_groups == s.in_channels == layer.max_groups
        else:  # 96 = 3 x 32 channels: 96 groups cannot be expressed by 5 gates
            assert not s.convert and type(layer) is nn.Conv2d
            assert f"groups={s.groups} is not a power of two up to" in s.reason
    assert any(s.convert for s in dw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(converted(x), original(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_skip_pointwise(tv_models, name):
    model = tv_models(name)
    plan = conversion_plan(model, skip_pointwise=True)
    pointwise = [s for s in plan if s.kernel_size == (1, 1)]
    assert pointwise
    assert all(not s.convert for s in pointwise)
    converted = convert_to_dgconv(model, skip_pointwise=True)
    modules = dict(converted.named_modules())
    for s in pointwise:
        assert type(modules[s.name]) is nn.Conv2d
        if s.name != plan[0].name:
            assert s.reason == "1x1 (skip_pointwise)"
    # resnet18 keeps its 3x3 convs; mobilenet_v2 has only the stem and depthwise convs left (skipped)
    assert any(isinstance(m, DGConv2d) for m in converted.modules()) == (name == "resnet18")
    assert all(m.kernel_size != (1, 1) for _, m in dgconv_layers(converted))


@pytest.mark.parametrize("exclude,excluded", [
    (["layer4.*"], lambda n: n.startswith("layer4.")),
    (["layer1.0.conv1", "layer2.*.conv2"], lambda n: n == "layer1.0.conv1" or
     (n.startswith("layer2.") and n.endswith(".conv2"))),
    (["*downsample*"], lambda n: "downsample" in n),
    ("layer3.*", lambda n: n.startswith("layer3.")),  # a single pattern as a string
])
def test_exclude_patterns_in_convert(tv_models, exclude, excluded):
    model = tv_models("resnet18")
    converted = convert_to_dgconv(model, exclude=exclude)
    all_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    layers = dict(dgconv_layers(converted))
    assert any(excluded(n) for n in all_convs)
    for n in all_convs:
        assert (n in layers) == (not excluded(n)), n


@pytest.mark.parametrize("exclude", [["layer4.*"], ["*.conv1"]])
def test_exclude_patterns_in_plan(tv_models, exclude):
    plan = conversion_plan(tv_models("resnet18"), exclude=exclude)
    for s in plan:
        if fnmatch.fnmatchcase(s.name, exclude[0]):
            assert not s.convert and s.reason == "excluded by name pattern"
        elif s.name != "conv1":
            assert s.convert


def test_plan_with_string_exclude_agrees_with_convert(tv_models):
    model = tv_models("resnet18")
    plan = conversion_plan(model, exclude="layer4.*")
    converted = dict(dgconv_layers(convert_to_dgconv(model, exclude="layer4.*")))
    assert {s.name for s in plan if s.convert} == set(converted)


# ----------------------------------------------------------- a hand-made net

def test_hand_net_plan_reasons():
    plan = {s.name: s for s in conversion_plan(HandNet(), skip_grouped=False)}
    assert list(plan) == ["stem", "dw", "pw", "grouped", "odd", "g3", "nopow", "sub", "head.0"]
    reasons = {n: s.reason for n, s in plan.items()}
    assert reasons["stem"] == "first convolution (skip_first)"
    assert reasons["dw"] == "depthwise (skip_depthwise)"
    assert reasons["pw"] == "converted"
    assert reasons["grouped"] == "converted, starting at groups=4"
    assert reasons["odd"] == "converted"
    assert "groups=3 is not a power of two" in reasons["g3"]
    assert "share no power of two" in reasons["nopow"]
    assert "SubConv" in reasons["sub"]
    assert "share no power of two" in reasons["head.0"]
    assert [n for n, s in plan.items() if s.convert] == ["pw", "grouped", "odd"]


@pytest.mark.parametrize("skip_first", [True, False])
@pytest.mark.parametrize("skip_depthwise", [True, False])
@pytest.mark.parametrize("skip_pointwise", [True, False])
def test_hand_net_options(skip_first, skip_depthwise, skip_pointwise):
    model = randomize_bn(HandNet()).eval()
    converted = convert_to_dgconv(model, skip_first=skip_first, skip_depthwise=skip_depthwise,
                                  skip_pointwise=skip_pointwise, skip_grouped=False, gate_init=0.2).eval()
    layers = dict(dgconv_layers(converted))
    expected = {"grouped", "odd"}
    if not skip_first:
        expected.add("stem")
    if not skip_depthwise:
        expected.add("dw")
    if not skip_pointwise:
        expected.add("pw")
    assert set(layers) == expected
    for layer in layers.values():
        assert layer.gate_latent.abs().tolist() == pytest.approx([0.2] * layer.num_gates)
    assert layers["grouped"].learned_groups == 4
    assert type(converted.sub) is SubConv and type(converted.g3) is nn.Conv2d
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert_close_rel(converted(x), model(x))
    # in training mode too (BN uses batch statistics of identical conv outputs)
    converted.train()
    model.train()
    assert_close_rel(converted(x), model(x), rel=1e-4)


def test_inplace():
    model = HandNet()
    pw = model.pw
    same = convert_to_dgconv(model, inplace=True)
    assert same is model
    assert isinstance(model.pw, DGConv2d) and model.pw is not pw
    assert torch.equal(model.pw.weight, pw.weight)


def test_not_inplace_leaves_original():
    model = HandNet()
    snap = snapshot(model)
    converted = convert_to_dgconv(model, skip_first=False)
    assert_unchanged(model, snap)
    assert isinstance(converted.stem, DGConv2d) and type(model.stem) is nn.Conv2d
    assert converted.stem.weight.data_ptr() != model.stem.weight.data_ptr()


def test_converting_twice_is_a_no_op():
    once = convert_to_dgconv(HandNet(), skip_grouped=False)
    once.grouped.set_gates([1, 0, 1, 0, 1])
    twice = convert_to_dgconv(once)
    assert [(n, type(m)) for n, m in once.named_modules()] == [(n, type(m)) for n, m in twice.named_modules()]
    assert twice.grouped.learned_groups == 4
    assert all(s.name not in dict(dgconv_layers(once)) for s in conversion_plan(once))


# ------------------------------------------------------------- parameter split

@pytest.mark.parametrize("builder", ["resnet18", "hand"])
def test_arch_and_weight_parameters_partition(tv_models, builder):
    model = convert_to_dgconv(tv_models("resnet18") if builder == "resnet18" else HandNet())
    arch, weights = arch_parameters(model), weight_parameters(model)
    layers = dgconv_layers(model)
    assert [id(p) for p in arch] == [id(m.gate_latent) for _, m in layers]
    assert all(p.dim() == 1 and p.numel() == m.num_gates for p, (_, m) in zip(arch, layers))
    arch_ids, weight_ids = {id(p) for p in arch}, {id(p) for p in weights}
    assert len(arch_ids) == len(arch) and len(weight_ids) == len(weights)
    assert not arch_ids & weight_ids
    all_ids = [id(p) for p in model.parameters()]
    assert arch_ids | weight_ids == set(all_ids)
    assert len(arch) + len(weights) == len(all_ids)
    assert all(id(m.weight) in weight_ids for _, m in layers)


def test_plain_model_has_no_arch_parameters():
    model = HandNet()
    assert arch_parameters(model) == []
    assert len(weight_parameters(model)) == len(list(model.parameters()))


@pytest.mark.parametrize("builder", ["resnet18", "hand"])
def test_one_step_with_two_optimizers_changes_weights_and_gates(tv_models, builder):
    if builder == "resnet18":
        model = convert_to_dgconv(tv_models("resnet18"))
        x, classes = torch.randn(2, 3, 32, 32), 1000
    else:
        model = convert_to_dgconv(HandNet(), skip_first=False, skip_depthwise=False)
        x, classes = torch.randn(4, 8, 8, 8), 3
    model.train()
    w_opt = torch.optim.SGD(weight_parameters(model), lr=0.1, momentum=0.9, weight_decay=1e-4)
    a_opt = torch.optim.Adam(arch_parameters(model), lr=0.01)
    before_w = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("gate_latent")}
    before_a = [p.detach().clone() for p in arch_parameters(model)]
    y = torch.randint(0, classes, (x.shape[0],))
    cost = sum(m.expected_macs((4, 4)) for _, m in dgconv_layers(model))
    loss = F.cross_entropy(model(x), y) + 1e-9 * cost
    w_opt.zero_grad()
    a_opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in arch_parameters(model))
    w_opt.step()
    a_opt.step()
    for p, b in zip(arch_parameters(model), before_a):
        assert not torch.equal(p.detach(), b)
        assert torch.allclose((p.detach() - b).abs(), torch.full_like(b, 0.01), rtol=2e-2)  # Adam's first step: ~lr
    changed = [n for n, p in model.named_parameters() if n in before_w and not torch.equal(p.detach(), before_w[n])]
    assert "fc.weight" in changed
    dg_weights = [f"{n}.weight" for n, _ in dgconv_layers(model)]
    assert set(dg_weights) <= set(changed)


def test_convert_a_bare_conv():
    conv = nn.Conv2d(8, 16, 3)
    converted = convert_to_dgconv(conv, skip_first=False)
    assert isinstance(converted, DGConv2d)


def test_grouped_convolutions_are_left_alone_by_default(tv_models):
    """A DGConv2d stores its weight dense: converting ResNeXt's 32-group convs would store 32x their weights, and
    gates that start off never reopen, so they stay as they are unless asked."""
    original = tv_models("resnext50_32x4d")
    plan = {s.name: s for s in conversion_plan(original)}
    assert not plan["layer1.0.conv2"].convert
    assert plan["layer1.0.conv2"].reason == "already grouped, groups=32 (skip_grouped)"
    assert plan["layer1.0.conv1"].convert
    converted = convert_to_dgconv(original)
    assert type(converted.layer1[0].conv2) is nn.Conv2d
    def stored(m):
        return sum(p.numel() for p in m.parameters())

    assert stored(converted) < 1.01 * stored(original)
    assert stored(convert_to_dgconv(original, skip_grouped=False)) > 2 * stored(original)
    hand = {s.name: s.reason for s in conversion_plan(HandNet())}
    assert hand["grouped"] == "already grouped, groups=4 (skip_grouped)"
    assert "groups=3" in hand["g3"] and hand["dw"] == "depthwise (skip_depthwise)"
