"""Folding the channel gathers of exported group convs into neighbouring layers: exact, and only where it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nas_grouping import DGConv2d, dgconv_layers, export_model, load_model, save_model
from nas_grouping.graph.fold import FoldWarning, count_gathers, fold_permutations
from nas_grouping.ops.group_conv import PermutedGroupConv2d
from search_spaces import get_space

from helpers import randomize_bn


def permuted(cin: int, cout: int, k: int = 3) -> DGConv2d:
    """A DGConv2d whose gates are off on inner bits only (groups that need both gathers)."""
    layer = DGConv2d(cin, cout, k, padding=k // 2, bias=False)
    n = layer.num_gates
    layer.set_gates([1] * (n - 2) + [0, 0] if n >= 2 else [0])
    return layer


def check_exact(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-4)


def test_gathers_fold_into_dense_neighbours_bn_and_classifier():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        permuted(16, 16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(),
        permuted(16, 32), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )).eval()
    exported = export_model(model, fold=False).eval()
    assert count_gathers(exported) == 4
    folded = fold_permutations(exported)
    assert count_gathers(folded) == 0 and count_gathers(exported) == 4  # a copy unless inplace
    check_exact(model, folded, torch.randn(4, 3, 8, 8))
    # batch statistics are per channel too: exact in training mode
    model.train(), folded.train()
    check_exact(model, folded, torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize("second, left", [([1, 0, 1, 0], 1), ([1, 1, 0, 0], 0)])
def test_two_permuted_convs_in_a_row_share_one_gather(second, left):
    """Between two permuted group convs the two gathers become one, none when the orders cancel."""
    torch.manual_seed(1)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 16, 1), permuted(16, 16), nn.BatchNorm2d(16), nn.ReLU(), permuted(16, 16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))).eval()
    model[4].set_gates(second)
    exported = export_model(model, fold=False)
    folded = fold_permutations(exported)
    assert count_gathers(exported) == 4 and count_gathers(folded) == left
    check_exact(model, folded, torch.randn(2, 3, 8, 8))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = permuted(16, 16)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 16, 1), permuted(16, 16)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn(self.b(torch.relu(self.bn(self.a(x)))))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 16, 1), permuted(16, 16)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.b(self.a(x))


@pytest.mark.parametrize("cls, left", [(Residual, 2), (SharedBN, 2)])
def test_orders_seen_by_two_readers_stay(cls, left):
    """The residual's input and output are read twice; a BatchNorm called twice serves two orders."""
    torch.manual_seed(2)
    model = randomize_bn(cls()).eval()
    folded = fold_permutations(export_model(model, fold=False))
    assert count_gathers(folded) == left
    check_exact(model, folded, torch.randn(2, 16, 6, 6))


def test_untraceable_models_keep_their_gathers_with_a_warning():
    torch.manual_seed(3)
    model = Untraceable().eval()
    exported = export_model(model, fold=False)
    with pytest.warns(FoldWarning, match="cannot be traced"):
        folded = fold_permutations(exported)
    assert count_gathers(folded) == 2
    check_exact(model, folded, torch.randn(2, 16, 6, 6))


def test_folded_resnet_round_trips_and_keeps_outputs(tmp_path):
    torch.manual_seed(4)
    model = get_space("torchvision", name="resnet18", num_classes=10)
    gen = torch.Generator().manual_seed(0)
    for _, layer in dgconv_layers(model):
        layer.set_gates(torch.randint(0, 2, (layer.num_gates,), generator=gen).tolist())
    model = randomize_bn(model).eval()
    exported = export_model(model, fold=False)
    folded = fold_permutations(exported)
    assert count_gathers(folded) < count_gathers(exported)
    assert count_gathers(export_model(model)) == count_gathers(folded)  # export folds by default
    x = torch.randn(2, 3, 32, 32)
    check_exact(model, folded, x)
    save_model(folded, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert count_gathers(loaded) == count_gathers(folded)
    check_exact(model, loaded, x)


def test_set_permutations_drops_identity_and_checks_indices():
    from nas_grouping import ConfigError

    layer = export_model(permuted(8, 8)).eval()
    assert isinstance(layer, PermutedGroupConv2d)
    layer.set_permutations(in_index=torch.arange(8))
    assert layer.in_index is None and layer.in_perm is None and layer.out_index is not None
    with pytest.raises(ConfigError, match="permutation"):
        layer.set_permutations(out_index=torch.zeros(8, dtype=torch.long))
