"""Channel pruning: coupled channel sets, exact removal of dead channels, frozen sets, budgets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas_grouping.channels.importance import ChannelImportance, L1Importance
from nas_grouping.channels.pruning import ChannelPruning, prune_channels
from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.export.records import records_of
from nas_grouping.macs import count_macs

from helpers import randomize_bn


# ---------------------------------------------------------------------------------------------- helpers


def kill(modules: list[nn.Module], idx: list[int]) -> None:
    """Zero the channels ``idx`` of every module's weight and bias (a conv's filters, a BN's affine terms)."""
    with torch.no_grad():
        for m in modules:
            m.weight[idx] = 0
            if m.bias is not None:
                m.bias[idx] = 0


def live(n: int, dead: list[int]) -> list[int]:
    return [i for i in range(n) if i not in dead]


def set_of(pruning: ChannelPruning, name: str, role: str):
    found = [s for s in pruning.sets if (name, role) in s.members]
    assert len(found) == 1, f"({name}, {role}) in {len(found)} sets"
    return found[0]


def check_exact(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref, out = model(x), pruned(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


# ---------------------------------------------------------------------------------------------- models


class Plain(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> flatten -> linear."""

    def __init__(self, c1: int = 8, c2: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


class Residual(nn.Module):
    """A stem and one ResNet basic block (``out + identity``), then a classifier."""

    def __init__(self, c: int = 8, mid: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        out = F.relu(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Concat(nn.Module):
    """Two branches concatenated, then a conv that can shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.c, self.bn = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.relu(self.bn(self.c(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Shared(nn.Module):
    """One conv applied twice, then a head that can shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.shared = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head, self.bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.bn(self.head(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Depthwise(nn.Module):
    """stem -> 1x1 conv -> BN -> depthwise conv -> BN -> 1x1 conv -> BN, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pw1, self.pw1_bn = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.dw_bn = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw2, self.pw2_bn = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu6(self.pw1_bn(self.pw1(x)))
        x = F.relu6(self.dw_bn(self.dw(x)))
        x = F.relu(self.pw2_bn(self.pw2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Odd(nn.Module):
    """Channel counts that are not multiples of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 24, 3, padding=1), nn.Conv2d(24, 20, 3, padding=1), \
            nn.Conv2d(20, 12, 3, padding=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.conv(x)


# ---------------------------------------------------------------------------------------------- exactness


def test_dead_channels_are_the_ones_removed_and_outputs_are_exact():
    torch.manual_seed(0)
    model = randomize_bn(Plain()).eval()
    dead1, dead2 = [1, 3, 4, 6], [0, 2, 5, 7]
    kill([model.conv1, model.bn1], dead1)
    kill([model.conv2, model.bn2], dead2)
    keep1, keep2 = live(8, dead1), live(8, dead2)

    pruned = ChannelPruning(model, (3, 8, 8)).prune(0.5).eval()

    assert (pruned.conv1.out_channels, pruned.bn1.num_features, pruned.conv2.in_channels) == (4, 4, 4)
    assert (pruned.conv2.out_channels, pruned.bn2.num_features, pruned.fc.in_features) == (4, 4, 4)
    assert pruned.conv1.in_channels == 3 and pruned.fc.out_features == 5
    assert pruned.conv1.weight.shape == (4, 3, 3, 3) and pruned.conv2.weight.shape == (4, 4, 3, 3)
    assert pruned.fc.weight.shape == (5, 4) and pruned.bn2.running_var.shape == (4,)
    # exactly the dead channels went, the kept ones in their order
    assert torch.equal(pruned.conv1.weight, model.conv1.weight[keep1])
    assert torch.equal(pruned.conv2.weight, model.conv2.weight[keep2][:, keep1])
    assert torch.equal(pruned.conv2.bias, model.conv2.bias[keep2])
    assert torch.equal(pruned.bn1.running_mean, model.bn1.running_mean[keep1])
    assert torch.equal(pruned.fc.weight, model.fc.weight[:, keep2])
    check_exact(model, pruned, torch.randn(4, 3, 8, 8))


def test_ratio_zero_is_an_equal_copy():
    torch.manual_seed(1)
    model = randomize_bn(Plain()).eval()
    pruned = ChannelPruning(model, (3, 8, 8)).prune(0.0).eval()
    assert pruned is not model and pruned.conv1.out_channels == 8
    check_exact(model, pruned, torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- residuals


def test_residual_addition_ties_stem_and_block_output_channels():
    torch.manual_seed(2)
    model = randomize_bn(Residual()).eval()
    pruning = ChannelPruning(model, (3, 8, 8))

    stream = set_of(pruning, "stem", "out")
    assert stream is set_of(pruning, "conv2", "out")
    assert {("stem", "out"), ("stem_bn", "through"), ("conv2", "out"), ("bn2", "through"), ("conv1", "in"),
            ("fc", "in")} <= set(stream.members)
    inner = set_of(pruning, "conv1", "out")
    assert inner is not stream and {("bn1", "through"), ("conv2", "in")} <= set(inner.members)
    assert stream.prunable and inner.prunable
    assert {id(s) for s in pruning.prunable()} == {id(stream), id(inner)}

    pruned = pruning.prune(0.5).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (2, 4)
    widths = {pruned.stem.out_channels, pruned.stem_bn.num_features, pruned.conv2.out_channels,
              pruned.bn2.num_features, pruned.conv1.in_channels, pruned.fc.in_features}
    assert widths == {4}
    assert pruned.conv1.out_channels == pruned.bn1.num_features == pruned.conv2.in_channels == 4


def test_residual_stream_prunes_the_same_channels_in_every_layer_it_ties():
    """Dead channels on both sides of the addition: pruning is exact only if both sides lose the same ones."""
    torch.manual_seed(3)
    model = randomize_bn(Residual()).eval()
    dead_stream, dead_inner = [0, 3, 5, 6], [1, 2, 4, 7]
    kill([model.stem, model.stem_bn, model.conv2, model.bn2], dead_stream)
    kill([model.conv1, model.bn1], dead_inner)
    pruned = ChannelPruning(model, (3, 8, 8)).prune(0.5).eval()
    keep = live(8, dead_stream)
    assert torch.equal(pruned.stem.weight, model.stem.weight[keep])
    assert torch.equal(pruned.conv1.weight, model.conv1.weight[live(8, dead_inner)][:, keep])
    check_exact(model, pruned, torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- frozen sets


def test_model_input_and_output_channels_are_never_pruned():
    torch.manual_seed(4)
    model = Plain()
    pruning = ChannelPruning(model, (3, 8, 8))
    frozen = {s.why: s for s in pruning.sets if not s.prunable}
    assert ("conv1", "in") in frozen["the model's input"].members
    assert ("fc", "out") in frozen["the model's output"].members
    assert all(s.prunable for s in pruning.prunable())
    assert not any(("fc", "out") in s.members or ("conv1", "in") in s.members for s in pruning.prunable())
    for ratio in (0.3, 0.5, 0.9):
        pruned = pruning.prune(ratio)
        assert pruned.conv1.in_channels == 3 and pruned.fc.out_features == 5
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_concatenation_freezes_its_branches():
    torch.manual_seed(5)
    model = Concat().eval()
    pruning = ChannelPruning(model, (3, 8, 8))
    for branch in ("a", "b"):
        s = set_of(pruning, branch, "out")
        assert not s.prunable and "cat" in s.why
    assert [s.members for s in pruning.prunable()] == [set_of(pruning, "c", "out").members]
    pruned = pruning.prune(0.5).eval()
    assert (pruned.a.out_channels, pruned.b.out_channels, pruned.c.in_channels) == (8, 8, 16)
    assert pruned.c.out_channels == pruned.bn.num_features == pruned.fc.in_features == 4
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_a_module_called_twice_keeps_its_channels():
    torch.manual_seed(6)
    model = Shared().eval()
    pruning = ChannelPruning(model, (3, 8, 8))
    assert not any(("stem", "out") in s.members or ("shared", "out") in s.members for s in pruning.prunable())
    assert not set_of(pruning, "stem", "out").prunable
    pruned = pruning.prune(0.5).eval()
    assert pruned.stem.out_channels == 8
    assert pruned.shared.in_channels == pruned.shared.out_channels == 8
    assert pruned.head.in_channels == 8 and pruned.head.out_channels == pruned.bn.num_features == 8
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_ignore_keeps_a_modules_output_channels():
    torch.manual_seed(7)
    model = Plain()
    pruning = ChannelPruning(model, (3, 8, 8), ignore=["conv1"])
    s = set_of(pruning, "conv1", "out")
    assert not s.prunable and "conv1" in s.why
    pruned = pruning.prune(0.5)
    assert pruned.conv1.out_channels == pruned.bn1.num_features == pruned.conv2.in_channels == 8
    assert pruned.conv2.out_channels == pruned.fc.in_features == 4
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_bad_settings_raise_config_error():
    model = Plain()
    with pytest.raises(ConfigError, match="nope"):
        ChannelPruning(model, (3, 8, 8), ignore=["nope"])
    with pytest.raises(ConfigError, match="round_to"):
        ChannelPruning(model, (3, 8, 8), round_to=0)
    pruning = ChannelPruning(model, (3, 8, 8))
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="ratio"):
            pruning.prune(ratio)


class SpatialGate(nn.Module):
    """``y * gate`` with a one-channel gate: broadcasting over the channels must not tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1)
        self.c, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = y * torch.sigmoid(self.gate(y))
        y = F.relu(self.c(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_broadcast_over_channels_freezes_instead_of_tying():
    torch.manual_seed(15)
    model = SpatialGate().eval()
    pruning = ChannelPruning(model, (3, 8, 8))
    assert not set_of(pruning, "a", "out").prunable and not set_of(pruning, "gate", "out").prunable
    assert set_of(pruning, "a", "out") is not set_of(pruning, "gate", "out")
    pruned = pruning.prune(0.5).eval()
    assert (pruned.a.out_channels, pruned.gate.out_channels, pruned.c.out_channels) == (8, 1, 4)
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)


# ---------------------------------------------------------------------------------------------- depthwise


def test_depthwise_conv_shrinks_with_its_input():
    torch.manual_seed(8)
    model = randomize_bn(Depthwise()).eval()
    dead_stem, dead_pw1, dead_pw2 = [0, 1, 2, 3], list(range(1, 16, 2)), [4, 5, 6, 7]
    kill([model.stem, model.stem_bn], dead_stem)
    kill([model.pw1, model.pw1_bn, model.dw_bn], dead_pw1)  # the depthwise BN too: zero in, zero out
    kill([model.pw2, model.pw2_bn], dead_pw2)
    pruning = ChannelPruning(model, (3, 8, 8))
    s = set_of(pruning, "pw1", "out")
    assert {("pw1_bn", "through"), ("dw", "through"), ("dw_bn", "through"), ("pw2", "in")} <= set(s.members)
    assert s.prunable

    pruned = pruning.prune(0.5).eval()
    dw = pruned.dw
    assert dw.in_channels == dw.out_channels == dw.groups == 8 and dw.weight.shape == (8, 1, 3, 3)
    assert pruned.pw1.out_channels == pruned.pw1_bn.num_features == pruned.dw_bn.num_features == 8
    assert pruned.pw2.in_channels == 8 and pruned.pw2.out_channels == 4 and pruned.stem.out_channels == 4
    assert torch.equal(dw.weight, model.dw.weight[live(16, dead_pw1)])
    check_exact(model, pruned, torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- round_to


def test_round_to_keeps_multiples_of_it():
    torch.manual_seed(9)
    model = Odd()
    widths = lambda m: [m.c1.out_channels, m.c2.out_channels, m.c3.out_channels]  # noqa: E731
    assert widths(ChannelPruning(model, (3, 8, 8)).prune(0.5)) == [12, 10, 6]
    pruning = ChannelPruning(model, (3, 8, 8), round_to=8)
    assert widths(pruning.prune(0.5)) == [16, 16, 8]
    assert widths(pruning.prune(0.3)) == [24, 16, 12]  # rounding up past the original keeps it
    for ratio in (0.1, 0.3, 0.5, 0.7, 0.9):
        pruned = pruning.prune(ratio)
        for got, full in zip(widths(pruned), (24, 20, 12)):
            assert got % 8 == 0 or got == full
            assert got <= full
        assert pruned.c2.in_channels == pruned.c1.out_channels and pruned.fc.in_features == pruned.c3.out_channels
        assert pruned(torch.randn(1, 3, 8, 8)).shape == (1, 3)


# ---------------------------------------------------------------------------------------------- budgets


def test_prune_to_budget_finds_the_least_pruning_within_the_budget():
    torch.manual_seed(10)
    model = Plain(16, 32)
    pruning = ChannelPruning(model, (3, 8, 8))
    dense = count_macs(model, (3, 8, 8))
    budget = int(dense * 0.4)
    pruned, ratio = pruning.prune_to_budget(budget)
    assert 0 < ratio <= 0.9
    assert count_macs(pruned, (3, 8, 8)) <= budget
    assert count_macs(pruned, (3, 8, 8)) == count_macs(pruning.prune(ratio), (3, 8, 8))
    # with round_to=1 the MACs fall monotonically with the ratio: a little less pruning misses the budget
    assert count_macs(pruning.prune(max(0.0, ratio - 1e-3)), (3, 8, 8)) > budget
    assert count_macs(pruning.prune(max(0.0, ratio - 1e-2)), (3, 8, 8)) > budget
    macs = [count_macs(pruning.prune(r / 20), (3, 8, 8)) for r in range(19)]
    assert macs == sorted(macs, reverse=True)


def test_unreachable_budget_raises_budget_error():
    model = Plain()
    pruning = ChannelPruning(model, (3, 8, 8))
    with pytest.raises(BudgetError, match="budget of 1 MACs cannot be met"):
        pruning.prune_to_budget(1)
    frozen_only = nn.Sequential(nn.Conv2d(3, 4, 3))  # its only channels are the model's output
    with pytest.raises(BudgetError, match="no channel"):
        ChannelPruning(frozen_only, (3, 8, 8)).prune_to_budget(1)


def test_budget_above_dense_returns_an_equal_copy():
    torch.manual_seed(11)
    model = randomize_bn(Plain()).eval()
    dense = count_macs(model, (3, 8, 8))
    for budget in (dense, dense * 2):
        pruned, ratio = ChannelPruning(model, (3, 8, 8)).prune_to_budget(budget)
        assert ratio == 0.0 and pruned is not model
        assert pruned.conv1.out_channels == 8
        check_exact(model, pruned.eval(), torch.randn(2, 3, 8, 8))


def test_pruning_leaves_the_original_model_alone():
    torch.manual_seed(12)
    model = randomize_bn(Residual()).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    pruning = ChannelPruning(model, (3, 8, 8))
    pruning.prune(0.5)
    pruning.prune_to_budget(count_macs(model, (3, 8, 8)) // 2)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.stem.out_channels == model.conv1.out_channels == 8 and not model.training
    with torch.no_grad():
        assert torch.equal(model(x), ref)


# ---------------------------------------------------------------------------------------------- real models, errors


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(13)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    size = (3, 64, 64)
    pruning = ChannelPruning(model, size)
    stream = set_of(pruning, "conv1", "out")
    assert {("layer1.0.conv2", "out"), ("layer1.1.conv2", "out"), ("bn1", "through")} <= set(stream.members)
    assert set_of(pruning, "layer2.0.downsample.0", "out") is set_of(pruning, "layer2.1.conv2", "out")
    assert set_of(pruning, "layer4.1.conv2", "out") is set_of(pruning, "fc", "in")
    assert all(s.prunable for s in (stream, set_of(pruning, "layer1.0.conv1", "out")))

    pruned = pruning.prune(0.5).eval()
    dense, small = count_macs(model, size), count_macs(pruned, size)
    assert 0.15 * dense < small < 0.5 * dense
    assert pruned.conv1.in_channels == 3 and pruned.fc.out_features == 10
    assert pruned.conv1.out_channels == pruned.layer1[1].conv2.out_channels == 32
    with torch.no_grad():
        assert pruned(torch.randn(2, *size)).shape == (2, 10)


def test_untraceable_model_raises_config_error():
    with pytest.raises(ConfigError, match="torch.fx"):
        ChannelPruning(Untraceable(), (3, 8, 8))


def test_prune_channels():
    torch.manual_seed(14)
    model = Plain()
    with pytest.raises(ConfigError, match="exactly one"):
        prune_channels(model, (3, 8, 8))
    with pytest.raises(ConfigError, match="exactly one"):
        prune_channels(model, (3, 8, 8), ratio=0.5, budget_macs=1000)
    for ratio in (1.0, -0.5):
        with pytest.raises(ConfigError, match="ratio"):
            prune_channels(model, (3, 8, 8), ratio=ratio)
    pruned = prune_channels(model, (3, 8, 8), ratio=0.5, ignore=["conv2"])
    assert pruned.conv1.out_channels == 4 and pruned.conv2.out_channels == 8
    budget = count_macs(model, (3, 8, 8)) // 2
    small = prune_channels(model, (3, 8, 8), budget_macs=budget, round_to=2)
    assert count_macs(small, (3, 8, 8)) <= budget
    assert small.conv1.out_channels % 2 == 0 and small.conv1.out_channels < 8
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_importance_object_defaults_to_l1_and_replaces_it():
    torch.manual_seed(15)
    model = randomize_bn(Plain()).eval()
    default = ChannelPruning(model, (3, 8, 8))
    assert isinstance(default.importance, L1Importance)
    by_name, by_object = default.prune(0.5), ChannelPruning(model, (3, 8, 8), importance=L1Importance()).prune(0.5)
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), by_object.state_dict().values()))

    class LastFirst(ChannelImportance):
        """Keeps the last channels of every set."""

        def __call__(self, model, s):
            return torch.arange(s.channels, dtype=torch.float)

    for pruned in (ChannelPruning(model, (3, 8, 8), importance=LastFirst()).prune(0.5),
                   prune_channels(model, (3, 8, 8), ratio=0.5, importance=LastFirst())):
        assert torch.equal(pruned.conv1.weight, model.conv1.weight[4:])
        assert torch.equal(pruned.conv2.weight, model.conv2.weight[4:, 4:])
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def wide() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


class MacClock:
    """A fake machine: a model's time is a fixed overhead plus its MACs at a fixed rate (ms)."""

    def __init__(self, size, overhead: float = 1.0, per_mac: float = 1e-5) -> None:
        self.size, self.overhead, self.per_mac, self.calls = size, overhead, per_mac, 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        return self.overhead + self.per_mac * count_macs(model, self.size)


def test_prune_to_latency_meets_a_measured_budget_with_the_least_pruning():
    torch.manual_seed(0)
    size = (3, 16, 16)
    model = wide()
    clock = MacClock(size)
    dense_ms = clock(model)
    pruning = ChannelPruning(model, size)
    budget_ms = 0.6 * dense_ms
    pruned, ratio, report = pruning.prune_to_latency(budget_ms, clock)
    assert report["met"] and clock(pruned) <= budget_ms and report["measured_ms"] == pytest.approx(clock(pruned))
    assert 0 < ratio < 0.9 and 1 <= len(report["tries"]) <= 4
    assert report["measured_ms"] >= 0.9 * budget_ms  # not pruned much more than the budget needs
    less = pruning.prune(max(ratio - 0.1, 0.0))
    assert clock(less) > budget_ms
    # a MAC budget tighter than the latency needs: it binds, and the start already meets the latency
    budget_macs = count_macs(model, size) // 4
    pruned, ratio, report = pruning.prune_to_latency(dense_ms, clock, budget_macs=budget_macs)
    assert report["met"] and report["tries"] == [] and count_macs(pruned, size) <= budget_macs


def test_prune_to_latency_out_of_reach_keeps_the_fastest():
    torch.manual_seed(0)
    size = (3, 16, 16)
    model = wide()
    clock = MacClock(size, overhead=5.0)  # the overhead alone exceeds the budget
    pruning = ChannelPruning(model, size)
    pruned, ratio, report = pruning.prune_to_latency(1.0, clock, max_ratio=0.9)
    assert not report["met"] and count_macs(pruned, size) == count_macs(pruning.prune(0.9), size)
    assert report["measured_ms"] == pytest.approx(clock(pruned)) == pytest.approx(
        min(t["measured_ms"] for t in report["tries"]))
    # a machine where fewer channels never run faster: the start (the unpruned model) is kept
    flat = lambda m: 2.0  # noqa: E731
    pruned, ratio, report = ChannelPruning(model, size).prune_to_latency(1.0, flat)
    assert ratio == 0.0 and count_macs(pruned, size) == count_macs(model, size)


def test_a_pruned_model_saves_and_loads_with_its_widths(tmp_path):
    from search_spaces import get_space

    from nas_grouping import convert_to_dgconv, dgconv_layers, export_model, load_model, save_model

    torch.manual_seed(0)
    size = (1, 8, 8)
    dense = get_space("digits_convnet", widths=[16, 16, 32, 32, 32, 32], dense=True).eval()
    randomize_bn(dense)
    pruned = ChannelPruning(dense, size, round_to=8).prune(0.5)
    x = torch.randn(4, *size)
    save_model(pruned, tmp_path / "plain")
    loaded = load_model(tmp_path / "plain")
    with torch.no_grad():
        assert torch.allclose(loaded(x), pruned(x), atol=1e-5)
    assert loaded.state_dict().keys() == pruned.state_dict().keys()
    # pruned, then grouped (DGConv with some gates off), exported: widths and groups both come back
    searchable = convert_to_dgconv(pruned).eval()
    for _, layer in dgconv_layers(searchable)[1:3]:
        layer.set_groups(2)
    exported = export_model(searchable).eval()
    save_model(exported, tmp_path / "grouped")
    again = load_model(tmp_path / "grouped")
    with torch.no_grad():
        assert torch.allclose(again(x), searchable(x), atol=1e-4)
    assert [m.out_channels for m in again.modules() if isinstance(m, nn.Conv2d)] == \
        [m.out_channels for m in exported.modules() if isinstance(m, nn.Conv2d)]


def test_an_exported_search_result_pruned_afterwards_saves_and_loads(tmp_path):
    from search_spaces import get_space

    from nas_grouping import dgconv_layers, export_model, load_model, save_model

    torch.manual_seed(0)
    size = (1, 8, 8)
    searchable = get_space("digits_convnet", widths=[16, 16, 32, 32, 32, 32]).eval()
    for _, layer in dgconv_layers(searchable)[2:4]:
        layer.set_groups(2)
    exported = export_model(searchable).eval()
    randomize_bn(exported)
    pruning = ChannelPruning(exported, size)
    pruned = pruning.prune(0.5)
    after, after_widths = records_of(pruned)
    narrowed = [n for n in after if after[n]["config"].get("out_channels") != getattr(
        exported.get_submodule(n), "out_channels", None)]
    assert narrowed, "a recorded (exported) layer that was pruned keeps its record, with its new widths"
    assert not set(narrowed) & set(after_widths)
    save_model(pruned, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = torch.randn(4, *size)
    with torch.no_grad():
        assert torch.allclose(loaded(x), pruned(x), atol=1e-5)


def test_set_widths_rejects_records_that_do_not_fit():
    from nas_grouping.channels.pruning import set_widths
    from nas_grouping.errors import ExportError

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(ExportError, match="no layer"):
        set_widths(model, {"5": [4]})
    with pytest.raises(ExportError, match="cannot take"):
        set_widths(model, {"1": [3, 4, 1]})


class TiedWeight(nn.Module):
    """``c2``'s weight is also read directly by a functional conv: its channels have a reader the trace rules
    for modules do not see."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        a = F.conv2d(h, self.c2.weight, padding=1)
        b = self.c2(h)
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


def test_tied_weights_freeze_their_layers_channels():
    torch.manual_seed(0)
    pruning = ChannelPruning(TiedWeight().eval(), (3, 8, 8))
    frozen = [s for s in pruning.sets if any(n == "c2" for n, _ in s.members)]
    assert frozen and not any(s.prunable for s in frozen)
    assert all(not any(n == "c2" for n, _ in s.members) for s in pruning.prunable())


def test_ignore_takes_a_container_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Conv2d(8, 4, 3)).eval()
    assert ChannelPruning(model, (3, 8, 8)).prunable()
    assert not ChannelPruning(model, (3, 8, 8), ignore=["0"]).prunable()


def test_wrong_input_size_and_dtype_are_handled(capfd):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ConfigError, match=r"does not run on an input of size \(4, 8, 8\) \(C, H, W\): "
                                          r"RuntimeError: .*expected input\[1, 4, 8, 8\] to have 3 channels"):
        ChannelPruning(model, (4, 8, 8))
    assert "Traceback" not in capfd.readouterr().err  # the error says it once, with no traceback printed before
    assert ChannelPruning(model.double(), (3, 8, 8)).prunable()  # the probe input takes the model's dtype
