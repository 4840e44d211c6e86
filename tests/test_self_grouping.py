"""The SG-CNN self-grouping pass: plans, exactness, budgets, clustering, errors, fine-tuning and resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nas_grouping.self_grouping._finetune as finetune_mod
import nas_grouping.self_grouping.grouping as sg_mod
from nas_grouping import (
    BudgetError, ConfigError, DGConv2d, PermutedGroupConv2d, SelfGrouping, SelfGroupingConfig, count_macs,
    export_model, load_model, save_model, self_group,
)
from nas_grouping.importance import taylor_importance
from nas_grouping.self_grouping._cluster import balance_labels, centroid_prune, kmeans_labels
from nas_grouping.errors import RunExistsError
from nas_grouping.self_grouping._layers import Prunable
from nas_grouping.importance import (IMPORTANCES, Importance, MagnitudeImportance, TaylorImportance,
                                                   register_importance)
from nas_grouping.specs import list_cluster_rules, parse_clusters, resolve_clusters
from nas_grouping.data import DataConfig, load_datasets
from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear
from nas_grouping.ops.group_conv import conv_config
from nas_grouping.self_grouping.grouping import grouping_outcomes

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")

SIZE = (3, 12, 12)
FAST = dict(kmeans_restarts=2, progress=False)


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class MixedNet(nn.Module):
    """Every kind of layer the pass meets: stem, regular, grouped, depthwise, 1x1, permuted group conv, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.perm = PermutedGroupConv2d(conv_config(nn.Conv2d(32, 32, 3, padding=1, groups=4)),
                                        in_perm=_perm(32, 1), out_perm=_perm(32, 2))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.conv(x))
        x = self.pw(self.dw(self.grouped(x)))
        return self.fc(F.relu(self.perm(x)).mean((2, 3)))


class PlainNet(nn.Module):
    """Only groups=1 convolutions and a linear layer: their masked reference is W * M."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(2 * width, 7)

    def forward(self, x):
        x = F.relu(self.conv1(F.relu(self.stem(x))))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------ exactness

def test_no_pruning_gives_the_same_outputs_and_leaves_the_input_alone():
    model = _randomize_bn(MixedNet())
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, *SIZE)
    out = SelfGrouping(fraction=0.0, clusters=3, **FAST).apply(model, SIZE)
    kinds = {name: type(out.get_submodule(name)).__name__ for name in ("stem", "conv", "grouped", "dw", "pw", "perm",
                                                                        "fc")}
    assert kinds == {"stem": "Conv2d", "conv": "DiverseGroupConv2d", "grouped": "DiverseGroupConv2d", "dw": "Conv2d",
                     "pw": "DiverseGroupConv2d", "perm": "DiverseGroupConv2d", "fc": "DiverseGroupLinear"}
    torch.testing.assert_close(_outputs(out, x), _outputs(model, x), rtol=1e-5, atol=1e-5)
    assert type(model.perm) is PermutedGroupConv2d and type(model.conv) is nn.Conv2d
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert count_macs(out, SIZE) == count_macs(model, SIZE)


def _existing_masks() -> dict[str, torch.Tensor]:
    """The connection masks of MixedNet's layers, written out independently of the pass."""
    block = lambda c, g: torch.arange(c)[:, None] // (c // g) == torch.arange(c)[None, :] // (c // g)  # noqa: E731
    perm = torch.zeros(32, 32, dtype=torch.bool)
    perm[torch.tensor(_perm(32, 2))[:, None], torch.tensor(_perm(32, 1))[None, :]] = block(32, 4)
    return {"conv": torch.ones(16, 16, dtype=torch.bool), "grouped": block(16, 2),
            "pw": torch.ones(32, 16, dtype=torch.bool), "perm": perm, "fc": torch.ones(5, 32, dtype=torch.bool)}


@pytest.mark.parametrize("threshold", ["layer", "cluster"])
def test_pruning_stays_inside_existing_masks_and_meets_each_layer_target(threshold):
    model = _randomize_bn(MixedNet())
    sg = SelfGrouping(fraction=0.5, clusters=3, threshold=threshold, **FAST)
    plan = sg.plan(model, SIZE)
    out = sg.apply(model, SIZE, plan=plan)
    masks = _existing_masks()
    for lp in plan.prunable:
        layer = out.get_submodule(lp.name)
        new, old = layer.mask(), masks[lp.name]
        assert not (new & ~old).any(), f"{lp.name}: a connection outside the existing mask"
        assert lp.connections == int(old.sum())
        assert layer.kept_connections() <= int(0.5 * old.sum())
        assert layer.kept_connections() >= int(0.5 * old.sum()) - 16, "pruned far more than asked"
        for filters, inputs in layer.groups:  # every filter of a group reads the same inputs
            assert all(new[o].tolist() == new[filters[0]].tolist() for o in filters)
    assert count_macs(out, SIZE) <= plan.macs_after


def test_pruned_model_equals_the_masked_dense_model():
    model = PlainNet().eval()
    out = SelfGrouping(fraction=0.6, clusters=4, **FAST).apply(model, SIZE)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc"):
            w = reference.get_submodule(name).weight
            mask = out.get_submodule(name).mask().to(w.dtype)
            w.mul_(mask.reshape(mask.shape + (1,) * (w.dim() - 2)))
    x = torch.randn(4, *SIZE)
    assert isinstance(out.conv2, DiverseGroupConv2d) and out.conv2.kept_connections() < 16 * 32
    torch.testing.assert_close(_outputs(out, x), _outputs(reference, x), rtol=1e-5, atol=1e-5)


def test_gradients_are_those_of_the_masked_dense_model_at_kept_weights():
    model = PlainNet().train()
    out = SelfGrouping(fraction=0.5, clusters=4, **FAST).apply(model, SIZE).train()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc"):
            w = reference.get_submodule(name).weight
            w.mul_(out.get_submodule(name).mask().to(w.dtype).reshape(w.shape[:2] + (1,) * (w.dim() - 2)))
    x, y = torch.randn(6, *SIZE), torch.randint(0, 7, (6,))
    F.cross_entropy(out(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    for name in ("conv1", "conv2", "fc"):
        layer, ref = out.get_submodule(name), reference.get_submodule(name)
        assert all(p.requires_grad for p in layer.parameters())
        for w, (f, s) in zip(layer.weights, layer.groups):
            if s:
                torch.testing.assert_close(w.grad, ref.weight.grad[list(f)][:, list(s)], rtol=1e-4, atol=1e-6)


def test_exported_search_model_and_save_load_round_trip(tmp_path):
    from search_spaces import get_space

    torch.manual_seed(3)
    searched = get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16])
    gen = torch.Generator().manual_seed(0)
    for m in searched.modules():
        if isinstance(m, DGConv2d):
            m.set_gates(torch.randint(0, 2, (m.num_gates,), generator=gen))
    exported = _randomize_bn(export_model(searched))
    assert any(isinstance(m, PermutedGroupConv2d) for m in exported.modules())
    size = (1, 8, 8)
    x = torch.randn(4, *size)
    same = SelfGrouping(fraction=0.0, clusters=2, **FAST).apply(exported, size)
    torch.testing.assert_close(_outputs(same, x), _outputs(exported, x), rtol=1e-5, atol=1e-5)
    small = SelfGrouping(budget=0.5, clusters=2, **FAST).apply(exported, size)
    assert count_macs(small, size) <= count_macs(exported, size) // 2
    save_model(small, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    torch.testing.assert_close(_outputs(loaded, x), _outputs(small, x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models(tv_models, name):
    model = tv_models(name)
    size = (3, 32, 32)
    x = torch.randn(2, *size)
    plan = SelfGrouping(fraction=0.0, clusters="upto:4", kmeans_restarts=1).plan(model, size)
    reasons = {lp.reason for lp in plan.skipped}
    assert any("first layer" in r for r in reasons)
    if name == "mobilenet_v2":
        assert "depthwise convolution" in reasons
    same = SelfGrouping(fraction=0.0, clusters="upto:4", kmeans_restarts=1).apply(model, size, plan=plan)
    torch.testing.assert_close(_outputs(same, x), _outputs(model, x), rtol=1e-4, atol=1e-4)
    half = SelfGrouping(budget=0.5, clusters="upto:4", kmeans_restarts=1).apply(model, size)
    assert count_macs(half, size) <= count_macs(model, size) // 2


# -------------------------------------------------------------- the method

def _planted(seed: int = 0) -> tuple[nn.Module, list[int], list[int]]:
    """A conv whose filters A read channels A' strongly and filters B read channels B' (weak elsewhere)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False))
    filters_a, chans_a = [0, 2, 5, 7], [1, 3, 4, 6]
    w = torch.full((8, 8, 3, 3), 0.01) * torch.randn(8, 8, 3, 3).sign()
    for o in range(8):
        chans = chans_a if o in filters_a else [c for c in range(8) if c not in chans_a]
        w[o, chans] = torch.rand(len(chans), 3, 3) + 0.5
    with torch.no_grad():
        model[1].weight.copy_(w)
    return model, filters_a, chans_a


def test_clusters_and_centroids_recover_planted_groups():
    model, filters_a, chans_a = _planted()
    out = SelfGrouping(fraction=0.5, clusters=2, **FAST).apply(model, (3, 6, 6))
    groups = {tuple(f): tuple(sorted(s)) for f, s in out[1].groups}
    rest_f = tuple(o for o in range(8) if o not in filters_a)
    rest_c = tuple(c for c in range(8) if c not in chans_a)
    assert groups == {tuple(filters_a): tuple(chans_a), rest_f: rest_c}
    (outcome,) = grouping_outcomes(out)
    assert outcome.name == "1" and outcome.clusters == 2 and outcome.kept == 32 and outcome.connections_before == 64


def test_layer_threshold_is_the_papers_percentile_over_centroid_values():
    importance = np.array([[5.0, 4, 0.1, 0.2], [5.0, 4, 0.1, 0.2], [0.3, 0.4, 9, 1]])
    mask = torch.ones(3, 4, dtype=torch.bool)
    labels = np.array([0, 0, 1])
    # centroid values per filter: [5, 4, .1, .2] x2 and [.3, .4, 9, 1]; prune the 6 lowest of 12
    d = centroid_prune(importance, mask, labels, keep=6)
    assert d.groups == [[0, 1], [2]] and d.kept == 6 and d.clusters == 2
    assert d.mask.tolist() == [[True, True, False, False], [True, True, False, False], [False, False, True, True]]
    assert d.threshold == pytest.approx(0.4)
    e = centroid_prune(importance, mask, labels, keep=6, mode="cluster")
    assert [int(e.mask[o].sum()) for o in range(3)] == [2, 2, 2] and e.kept == 6
    assert e.mask[2].tolist() == [False, False, True, True]
    assert centroid_prune(importance, mask, labels, keep=5, mode="cluster").kept == 3, "each group rounds down"
    # an existing mask splits a cluster into groups and pruning stays inside it
    existing = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    f = centroid_prune(importance, existing, labels, keep=4)
    assert f.groups == [[0], [1], [2]] and not (f.mask & ~existing).any() and f.kept <= 4


def test_kmeans_is_seeded_and_equal_sizes_balance_clusters():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(0, 0.1, (11, 6)), rng.normal(3, 0.1, (3, 6)), rng.normal(-3, 0.1, (2, 6))])
    a = kmeans_labels(vectors, 3, seed=4, restarts=3, init="k-means++")
    b = kmeans_labels(vectors, 3, seed=4, restarts=3, init="k-means++")
    assert a.tolist() == b.tolist() and a[0] == 0 and sorted(np.bincount(a).tolist()) == [2, 3, 11]
    balanced = balance_labels(vectors, a, 3)
    assert sorted(np.bincount(balanced).tolist()) == [5, 5, 6]
    assert len(set(balanced[11:14].tolist())) == 1, "the tight cluster stays together"
    assert kmeans_labels(vectors[:3], 5, seed=0, restarts=1, init="random").tolist() == [0, 1, 2]


def test_equal_cluster_sizes_and_cluster_threshold_give_uniform_groups():
    model = PlainNet(width=16).eval()
    out = SelfGrouping(fraction=0.5, clusters=3, cluster_sizes="equal", threshold="cluster", **FAST).apply(model, SIZE)
    for name in ("conv1", "conv2"):
        sizes = sorted(len(f) for f, _ in out.get_submodule(name).groups)
        widths = {len(s) for _, s in out.get_submodule(name).groups}
        assert max(sizes) - min(sizes) <= 1 and len(sizes) == 3
        assert widths == {8}, f"{name}: every group reads half of the 16 input channels"


def test_runs_repeat_with_the_same_seed():
    model = PlainNet().eval()
    a = SelfGrouping(fraction=0.5, clusters=4, seed=7, **FAST).apply(model, SIZE)
    b = SelfGrouping(fraction=0.5, clusters=4, seed=7, **FAST).apply(model, SIZE)
    for name in ("conv1", "conv2", "fc"):
        assert a.get_submodule(name).groups == b.get_submodule(name).groups


def test_taylor_importance_is_mean_abs_first_order_term():
    model = PlainNet(width=4).train()
    model.stem.weight.requires_grad_(False)
    batches = [(torch.randn(5, *SIZE), torch.randint(0, 7, (5,))) for _ in range(2)]
    layer = Prunable("conv2", model.conv2)
    scores = taylor_importance(model, [layer], batches)["conv2"]
    assert model.training and not model.stem.weight.requires_grad and model.conv2.weight.requires_grad
    assert all(p.grad is None for p in model.parameters()), "the model is left as it was"
    expected = torch.zeros(8, 4)
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        expected += (model.conv2.weight * model.conv2.weight.grad).sum((2, 3)).abs() / len(batches)
    np.testing.assert_allclose(scores, expected.detach().double().numpy(), rtol=1e-4, atol=1e-9)
    with pytest.raises(ConfigError, match="calibration"):
        SelfGrouping(importance="taylor", **FAST).apply(model, SIZE)
    out = SelfGrouping(importance="taylor", fraction=0.5, clusters=2, **FAST).apply(model, SIZE, calibration=batches)
    assert isinstance(out.conv2, DiverseGroupConv2d)


def _same_model(a: nn.Module, b: nn.Module) -> None:
    assert [o.__dict__ for o in grouping_outcomes(a)] == [o.__dict__ for o in grouping_outcomes(b)]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_importance_objects_give_what_their_names_give():
    model = PlainNet(width=4).eval()
    batches = [(torch.randn(5, *SIZE), torch.randint(0, 7, (5,))) for _ in range(2)]
    settings = dict(fraction=0.5, clusters=2, seed=3, **FAST)
    by_object = SelfGrouping(importance=MagnitudeImportance(), **settings)
    assert by_object.config.importance == "magnitude", "the config names a registered object's name"
    _same_model(SelfGrouping(**settings).apply(model, SIZE), by_object.apply(model, SIZE))
    taylor = SelfGrouping(SelfGroupingConfig(**settings), importance=TaylorImportance())
    assert taylor.config.importance == "taylor" and taylor.importance.needs_calibration
    _same_model(SelfGrouping(importance="taylor", **settings).apply(model, SIZE, calibration=batches),
                taylor.apply(model, SIZE, calibration=batches))
    with pytest.raises(ConfigError, match="calibration"):
        taylor.apply(model, SIZE)


def test_a_custom_importance_object_scores_the_connections():
    class SmallestFirst(Importance):
        """The opposite of magnitude: keeps the weakest connections."""

        def __call__(self, model, layers, calibration=None):
            return {name: -score for name, score in MagnitudeImportance()(model, layers).items()}

    model = PlainNet(width=4).eval()
    sg = SelfGrouping(importance=SmallestFirst(), fraction=0.5, clusters=1, **FAST)
    assert sg.config.importance == "magnitude", "an unregistered object leaves the config as it was"
    out = sg.apply(model, SIZE)
    scores = MagnitudeImportance()(model, [Prunable("conv1", model.conv1)])["conv1"]
    weakest = set(np.argsort(scores.sum(0))[:2].tolist())  # the input channels of the least summed magnitude
    kept = Prunable("conv1", out.conv1).mask().numpy().astype(bool)
    assert {i for i in range(4) if kept[:, i].all()} == weakest and kept.sum() == 8, \
        "one cluster keeps the weakest half of the input channels"


def test_an_unknown_importance_is_one_line_and_a_registered_one_is_valid():
    with pytest.raises(ConfigError, match="importance must be one of magnitude, taylor, got 'inverse'") as info:
        SelfGroupingConfig(importance="inverse")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="magnitude, taylor"):
        SelfGrouping(importance="inverse")

    @register_importance("inverse")
    class InverseImportance(Importance):
        def __call__(self, model, layers, calibration=None):
            return {name: 1 / (1 + s) for name, s in MagnitudeImportance()(model, layers).items()}

    try:
        assert SelfGroupingConfig(importance="inverse").importance == "inverse"
        sg = SelfGrouping(importance="inverse", fraction=0.5, clusters=2, **FAST)
        assert isinstance(sg.importance, InverseImportance) and InverseImportance.name == "inverse"
        model = PlainNet(width=4).eval()
        _same_model(sg.apply(model, SIZE), SelfGrouping(importance=InverseImportance(), fraction=0.5, clusters=2,
                                                        **FAST).apply(model, SIZE))
    finally:
        del IMPORTANCES["inverse"]
    assert list(IMPORTANCES) == ["magnitude", "taylor"]


# ---------------------------------------------------------------- budgets

@pytest.mark.parametrize("budget", [0.5, 0.3, "300K"])
def test_mac_budget_is_met_and_checked_with_count_macs(budget):
    model = _randomize_bn(MixedNet())
    sg = SelfGrouping(budget=budget, clusters=3, **FAST)
    plan = sg.plan(model, SIZE)
    dense = count_macs(model, SIZE)
    target = int(budget * dense) if isinstance(budget, float) else 300_000
    assert plan.budget_macs == target and plan.macs_after <= target
    macs = count_macs(sg.apply(model, SIZE, plan=plan), SIZE)
    assert macs <= target and macs >= 0.9 * target, (macs, target)
    caps = {lp.name: lp.fraction for lp in plan.prunable}
    assert caps["fc"] <= 0.6 and plan.global_fraction is not None


def test_unreachable_budget_fails_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("clustering ran")

    monkeypatch.setattr(sg_mod, "kmeans_labels", no_work)
    with pytest.raises(BudgetError, match="cannot be met") as info:
        SelfGrouping(budget=0.05, **FAST).apply(_randomize_bn(MixedNet()), SIZE)
    message = str(info.value)
    assert "MACs" in message and "skipped layer" in message and "at least 0." in message


def test_linear_layers_have_their_own_cap():
    plan = SelfGrouping(fraction=0.9, clusters=2, **FAST).plan(MixedNet(), SIZE)
    fractions = {lp.name: lp.fraction for lp in plan.prunable}
    assert fractions["fc"] == pytest.approx(0.6) and fractions["conv"] == pytest.approx(0.9)
    plan = SelfGrouping(fraction=0.99, clusters=2, max_fraction=0.8, **FAST).plan(MixedNet(), SIZE)
    assert {lp.name: lp.fraction for lp in plan.prunable}["conv"] == pytest.approx(0.8)


# -------------------------------------------------------- skips and errors

class ZooNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.searchable = DGConv2d(8, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.dw = PermutedGroupConv2d(conv_config(nn.Conv2d(8, 8, 3, padding=1, groups=8)), in_perm=_perm(8, 0),
                                      out_perm=_perm(8, 0))
        self.seq = nn.Conv1d(8, 8, 1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.dw(self.reflect(self.head(self.body(self.searchable(self.stem(x))))))
        t = self.seq(x.flatten(2)).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.fc(t.mean(1))


def test_plan_says_what_is_skipped_and_why():
    plan = SelfGrouping(clusters=2, exclude="head", **FAST).plan(ZooNet(), (3, 4, 4))
    reasons = {lp.name: lp.reason for lp in plan.layers}
    assert reasons["stem"].startswith("first layer")
    assert reasons["searchable"].startswith("DGConv2d") and "export_model" in reasons["searchable"]
    assert reasons["head"] == "excluded by pattern 'head'"
    assert reasons["reflect"].startswith("padding_mode='reflect'")
    assert reasons["seq"].startswith("Conv1d") and reasons["dw"] == "depthwise convolution"
    assert reasons["unused"] == "not used in forward"
    assert "Linear subclass" in reasons["attn.out_proj"]
    assert [lp.name for lp in plan.prunable] == ["body", "fc"]
    text = plan.describe()
    assert "unused: skipped (not used in forward)" in text and "body: Conv2d 8->8, 2 clusters" in text
    frame = plan.to_frame()
    assert list(frame["name"]) == [lp.name for lp in plan.layers] and "macs_after" in frame


def test_no_prunable_layer_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ConfigError, match="no prunable layer") as info:
        SelfGrouping(**FAST).plan(model, (3, 8, 8))
    assert "first layer" in str(info.value) and "depthwise" in str(info.value)
    with pytest.raises(TypeError, match="nn.Module"):
        SelfGrouping().plan("resnet18", (3, 8, 8))
    with pytest.raises(ConfigError, match="forward pass"):
        SelfGrouping().plan(PlainNet(), (5, 8, 8))


def test_more_clusters_than_filters_names_the_layer():
    with pytest.raises(ConfigError, match="layer 'conv1': 20 clusters but only 16 filters"):
        SelfGrouping(clusters=20, **FAST).plan(PlainNet(), SIZE)
    with pytest.raises(ConfigError, match="'fc'"):
        SelfGrouping(clusters={"conv*": 4, "fc": 9}, **FAST).plan(PlainNet(), SIZE)


def test_cluster_rules_and_per_layer_mappings():
    assert resolve_clusters("upto:16", "a", 8) == 8 and resolve_clusters("upto:16", "a", 64) == 16
    assert resolve_clusters("per:4", "a", 64) == 16 and resolve_clusters("sqrt", "a", 64) == 8
    assert resolve_clusters({"layer3.*": 2, "*": "upto:4"}, "layer3.0.conv1", 64) == 2
    assert resolve_clusters({"layer3.*": 2, "*": "upto:4"}, "layer1.0.conv1", 64) == 4
    with pytest.raises(ConfigError, match="no pattern"):
        resolve_clusters({"layer3.*": 2}, "fc", 10)
    assert parse_clusters('{"a*": 3, "*": "per:8"}') == {"a*": 3, "*": "per:8"} and parse_clusters("12") == 12
    for bad, match in [("nope:3", "unknown rule"), ("upto", "needs a number"), (0, ">= 1"), ("per:x", "integer")]:
        with pytest.raises(ConfigError, match=match):
            parse_clusters(bad)
    assert set(list_cluster_rules()) == {"upto", "per", "sqrt"}
    plan = SelfGrouping(fraction={"conv*": 0.5}, clusters={"conv1": 2, "*": 3}, **FAST).plan(PlainNet(), SIZE)
    got = {lp.name: (lp.prune, lp.clusters, lp.fraction, lp.reason) for lp in plan.layers}
    assert got["conv1"] == (True, 2, 0.5, "pruned") and got["conv2"] == (True, 3, 0.5, "pruned")
    assert got["fc"] == (False, None, None, "no fraction pattern matches")


def test_config_validation():
    with pytest.raises(ConfigError, match="either fraction"):
        SelfGroupingConfig(fraction=0.5, budget=0.5)
    for kwargs, match in [({"fraction": 1.5}, r"\[0, 1\]"), ({"budget": "lots"}, "budget"),
                          ({"steps": 0}, "steps"), ({"finetune": "some"}, "finetune"),
                          ({"max_fraction": 2}, "max_fraction"), ({"exclude": 3}, "exclude")]:
        with pytest.raises(ConfigError, match=match):
            SelfGroupingConfig(**kwargs)
    cfg = SelfGroupingConfig(exclude="layer4.*, fc", fraction='{"*": 0.25}')
    assert cfg.exclude == ["layer4.*", "fc"] and cfg.fraction == {"*": 0.25}
    assert SelfGroupingConfig().target_fraction == 0.5 and SelfGroupingConfig(budget=0.4).target_fraction is None
    with pytest.raises(TypeError):
        SelfGrouping({"budget": 0.5})


def test_self_group_one_call():
    model = PlainNet().eval()
    with pytest.raises(ConfigError, match="input_size"):
        self_group(model, fraction=0.5)
    out = self_group(model, SelfGroupingConfig(fraction=0.5, clusters=2, kmeans_restarts=1), input_size=SIZE)
    assert isinstance(out.fc, DiverseGroupLinear) and out is not model and type(model.fc) is nn.Linear


# ------------------------------------------------- schedule and fine-tuning

@pytest.fixture(scope="module")
def digits():
    return load_datasets(DataConfig(batch_size=128, augment=False))


def _digits_net():
    from search_spaces import get_space

    torch.manual_seed(0)
    return get_space("digits_convnet", widths=[8, 8, 16, 16, 16, 16], dense=True)


def _cfg(**kw) -> SelfGroupingConfig:
    base = dict(fraction=0.5, clusters=2, kmeans_restarts=1, epochs=1, step_epochs=1, progress=False, lr=0.05)
    base.update(kw)
    return SelfGroupingConfig(**base)


def test_fine_tuning_trains_the_kept_weights_and_keeps_the_masks(digits):
    model = _digits_net()
    sg = SelfGrouping(_cfg())
    pruned = sg.apply(model, (1, 8, 8))
    result = sg.run(model, digits, batch_size=128)
    assert [r["phase"] for r in result.history] == ["input", "pruned", "global"]
    for name, layer in result.model.named_modules():
        if isinstance(layer, (DiverseGroupConv2d, DiverseGroupLinear)):
            before = pruned.get_submodule(name)
            assert layer.groups == before.groups, f"{name}: fine-tuning changed the mask"
            assert not torch.equal(layer.dense_weight(), before.dense_weight()), f"{name} did not train"
    assert count_macs(result.model, (1, 8, 8)) <= result.plan.macs_after
    assert result.val_acc("input") is not None and result.val_acc("global") is not None
    assert result.outcomes and result.outcomes == grouping_outcomes(result.model)


def test_local_then_global_fine_tuning_and_progressive_steps(digits, monkeypatch):
    seen = []
    real = finetune_mod.train_epoch

    def spy(model, loader, rt, **kwargs):
        seen.append((kwargs["desc"], {n for n, p in model.named_parameters() if p.requires_grad}))
        return real(model, loader, rt, **kwargs)

    monkeypatch.setattr(finetune_mod, "train_epoch", spy)
    model = _digits_net()
    result = SelfGrouping(_cfg(finetune="local+global", steps=2, budget=0.5, fraction=None)).run(
        model, digits, batch_size=128)
    phases = [r["phase"] for r in result.history]
    assert phases == ["input", "pruned", "local", "global", "pruned", "local", "global"]
    macs = [r["macs"] for r in result.history if r["phase"] == "pruned"]
    assert macs[0] > macs[1] and macs[1] <= result.plan.budget_macs
    pruned = tuple(lp.name + "." for lp in result.plan.prunable)
    local = [names for desc, names in seen if "local" in desc]
    glob = [names for desc, names in seen if "global" in desc]
    assert len(local) == 2 and len(glob) == 2
    assert all(names and all(n.startswith(pruned) for n in names) for names in local), "only pruned layers train"
    assert all("features.1.weight" in names and "features.0.weight" in names for names in glob)


def test_interrupted_run_resumes_to_the_same_result(digits, tmp_path, monkeypatch):
    cfg = _cfg(steps=2, epochs=2)
    model = _digits_net()
    full = SelfGrouping(cfg).run(model, digits, batch_size=128, out=tmp_path / "a")
    real, calls = finetune_mod.train_epoch, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # mid-phase: the second epoch of the last fine-tuning (optimizer state resumes)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_mod, "train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        SelfGrouping(cfg).run(model, digits, batch_size=128, out=tmp_path / "b")
    monkeypatch.setattr(finetune_mod, "train_epoch", real)
    with pytest.raises(RunExistsError, match="already holds a run"):  # a ConfigError, caught by type in tune
        SelfGrouping(cfg).run(model, digits, batch_size=128, out=tmp_path / "b")
    with pytest.raises(ConfigError, match="other self-grouping settings"):
        SelfGrouping(_cfg(steps=2, epochs=3)).run(model, digits, batch_size=128, out=tmp_path / "b", resume=True)
    resumed = SelfGrouping(cfg).run(model, digits, batch_size=128, out=tmp_path / "b", resume=True)
    assert [r["phase"] for r in resumed.history] == [r["phase"] for r in full.history]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_unreadable_checkpoint_is_a_clear_error(digits, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        SelfGrouping(_cfg()).run(_digits_net(), digits, out=tmp_path, resume=True)


def test_distillation_follows_the_input_model_or_a_given_teacher(digits, monkeypatch):
    seen = []
    real = finetune_mod.train_epoch

    def spy(model, loader, rt, **kwargs):
        seen.append(kwargs["distill"])
        return real(model, loader, rt, **kwargs)

    monkeypatch.setattr(finetune_mod, "train_epoch", spy)
    model, other = _digits_net(), _digits_net()
    torch.nn.init.zeros_(other.fc.weight)
    SelfGrouping(_cfg(distill=0.7, distill_temperature=2.0)).run(model, digits, batch_size=128)
    (d,) = seen
    assert (d.weight, d.temperature) == (0.7, 2.0) and not d.teacher.training
    assert all(torch.equal(a, b) for a, b in zip(d.teacher.state_dict().values(), model.state_dict().values()))
    assert not any(p.requires_grad for p in d.teacher.parameters())
    SelfGrouping(_cfg(distill=0.5)).run(model, digits, batch_size=128, teacher=other)
    assert all(torch.equal(a, b) for a, b in zip(seen[-1].teacher.state_dict().values(), other.state_dict().values()))
    SelfGrouping(_cfg()).run(model, digits, batch_size=128)
    assert seen[-1] is None  # off by default
    with pytest.raises(ConfigError, match="distill must be in"):
        _cfg(distill=1.5)
