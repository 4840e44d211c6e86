"""Every torchvision classification model and a set of timm CNNs through the public API (issue 20).

Per model, with random weights on a small input: MACs equal to FlopCounterMode's, a self-grouping
plan, channel pruning (and save / load of the pruned model), conversion to DGConv2d and one training
step, export at random gates to the same outputs and MACs, save / load of the exported model; or the
NasGroupingError a family must refuse with.

The zoo takes about 13 minutes on one core, so its models are dealt into ``SHARDS`` shards of equal
calibrated cost (``COSTS``) and a run checks one: ``NAS_GROUPING_ZOO_SHARD=k/n`` picks shard k of n,
``all`` every model; unset, the shard rotates with the UTC day, so CI covers the zoo every ``SHARDS`` days.
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import randomize_bn
from nas_grouping import (ChannelPruning, ConfigError, DGConv2d, NasGroupingError, SelfGrouping, arch_parameters,
                          convert_to_dgconv, count_macs, dgconv_layers, export_model, load_model, save_model)
from nas_grouping.graph import FoldWarning

tvm = pytest.importorskip("torchvision.models")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

#: shards of the default rotation: about 125 s on one core each, a minute under ``pytest -n 2``
SHARDS = 6
#: seconds of ``test_zoo_model`` per model on one core of the 2-core development machine, the other core busy
COSTS = {
    "tv-alexnet": 6, "tv-convnext_base": 8, "tv-convnext_large": 16, "tv-convnext_small": 5, "tv-convnext_tiny": 4,
    "tv-densenet121": 3, "tv-densenet161": 7, "tv-densenet169": 5, "tv-densenet201": 8, "tv-efficientnet_b0": 2,
    "tv-efficientnet_b1": 3, "tv-efficientnet_b2": 4, "tv-efficientnet_b3": 5, "tv-efficientnet_b4": 7,
    "tv-efficientnet_b5": 9, "tv-efficientnet_b6": 10, "tv-efficientnet_b7": 16, "tv-efficientnet_v2_l": 32,
    "tv-efficientnet_v2_m": 14, "tv-efficientnet_v2_s": 8, "tv-googlenet": 3, "tv-inception_v3": 5,
    "tv-maxvit_t": 16, "tv-mnasnet0_5": 2, "tv-mnasnet0_75": 1, "tv-mnasnet1_0": 2, "tv-mnasnet1_3": 2,
    "tv-mobilenet_v2": 2, "tv-mobilenet_v3_large": 2, "tv-mobilenet_v3_small": 1, "tv-regnet_x_16gf": 10,
    "tv-regnet_x_1_6gf": 3, "tv-regnet_x_32gf": 18, "tv-regnet_x_3_2gf": 4, "tv-regnet_x_400mf": 3,
    "tv-regnet_x_800mf": 3, "tv-regnet_x_8gf": 7, "tv-regnet_y_128gf": 6, "tv-regnet_y_16gf": 14,
    "tv-regnet_y_1_6gf": 4, "tv-regnet_y_32gf": 29, "tv-regnet_y_3_2gf": 4, "tv-regnet_y_400mf": 2,
    "tv-regnet_y_800mf": 2, "tv-regnet_y_8gf": 8, "tv-resnet101": 9, "tv-resnet152": 12, "tv-resnet18": 2,
    "tv-resnet34": 4, "tv-resnet50": 5, "tv-resnext101_32x8d": 15, "tv-resnext101_64x4d": 15,
    "tv-resnext50_32x4d": 5, "tv-shufflenet_v2_x0_5": 1, "tv-shufflenet_v2_x1_0": 1, "tv-shufflenet_v2_x1_5": 2,
    "tv-shufflenet_v2_x2_0": 2, "tv-squeezenet1_0": 1, "tv-squeezenet1_1": 1, "tv-swin_b": 14, "tv-swin_s": 7,
    "tv-swin_t": 3, "tv-swin_v2_b": 13, "tv-swin_v2_s": 7, "tv-swin_v2_t": 4, "tv-vgg11": 15, "tv-vgg11_bn": 24,
    "tv-vgg13": 22, "tv-vgg13_bn": 24, "tv-vgg16": 24, "tv-vgg16_bn": 24, "tv-vgg19": 23, "tv-vgg19_bn": 24,
    "tv-vit_b_16": 9, "tv-vit_b_32": 8, "tv-vit_h_14": 4, "tv-vit_l_16": 6, "tv-vit_l_32": 6,
    "tv-wide_resnet101_2": 27, "tv-wide_resnet50_2": 18, "timm-resnet50d": 7, "timm-seresnext26d_32x4d": 6,
    "timm-efficientnet_b0": 3, "timm-tf_efficientnet_b0": 2, "timm-mobilenetv3_large_100": 3, "timm-regnety_002": 4,
    "timm-convnext_atto": 3, "timm-ghostnet_100": 3, "timm-ese_vovnet19b_dw": 3, "timm-dla46_c": 2,
    "timm-cspresnet50": 5, "timm-hrnet_w18_small": 4,
}
#: the representative CNN families (issue 19) whose exported model is also deploy-exported (ONNX and .pt2)
DEPLOYED = {"tv-resnet18", "tv-resnext50_32x4d", "tv-mobilenet_v2", "tv-mobilenet_v3_small", "tv-efficientnet_b0",
            "tv-regnet_x_400mf", "tv-densenet121", "tv-shufflenet_v2_x0_5", "tv-mnasnet0_5"}
#: seconds the deploy export adds to those (one core, the other busy)
DEPLOY_COST = 25
#: the cost assumed for a model without one (new in torchvision)
DEFAULT_COST = 10


# ------------------------------------------------------------------------------------------- the models


def _vit(patch_size: int, num_heads: int, hidden_dim: int, mlp_dim: int) -> Callable[..., nn.Module]:
    """A torchvision ViT size whose depth is a keyword (its builder fixes it), to check it shallower."""
    return functools.partial(tvm.VisionTransformer, patch_size=patch_size, num_heads=num_heads,
                             hidden_dim=hidden_dim, mlp_dim=mlp_dim)


def regnet_y_128gf_stages(depths: list[int], **kwargs: Any) -> nn.Module:
    """regnet_y_128gf (2.6 GB of weights) with ``depths`` blocks in its first ``len(depths)`` stages."""
    from torchvision.models.regnet import BlockParams, RegNet

    full = BlockParams.from_init_params(depth=27, w_0=456, w_a=160.83, w_m=2.52, group_width=264, se_ratio=0.25)
    n = len(depths)
    params = BlockParams(list(depths), full.widths[:n], full.group_widths[:n], full.bottleneck_multipliers[:n],
                         full.strides[:n], full.se_ratio)
    return RegNet(params, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1), **kwargs)


def blocks_after(stage: str, first: int, count: int) -> tuple[str, ...]:
    """Exclude patterns of blocks ``first`` to ``count - 1`` of ``stage``, repeats of the blocks before.

    A DGConv2d keeps an int64 (out, in) channel index beside its weight, so converting 500 MB of 1x1
    convolutions takes 1-2 GB more; the repeats stay nn.Conv2d to keep a test within ~2.5 GB.
    """
    return tuple(f"{stage}.{i}.*" for i in range(first, count))


@dataclass(frozen=True)
class Case:
    """One model of the zoo and what the library must do with it.

    ``converts``: convert_to_dgconv finds layers to search (the one conv of ViT and Swin is the stem);
    ``prunes`` / ``plans``: None where channel pruning / a self-grouping plan at half the MACs works,
    else the pattern of the NasGroupingError it must refuse with; ``untraceable``: torch.fx cannot trace
    it, so export must warn that it leaves its channel gathers unfolded.
    """

    id: str
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any]
    size: tuple[int, int, int] = (3, 64, 64)
    converts: bool = True
    exclude: tuple[str, ...] = ()
    prunes: str | None = None
    plans: str | None = None
    untraceable: bool = False

    @property
    def cost(self) -> float:
        return COSTS.get(self.id, DEFAULT_COST) + (DEPLOY_COST if self.id in DEPLOYED else 0)


NOTHING_TO_PRUNE = r"no channel of this \w+ can be pruned"
BUDGET_UNMET = r"cannot be met: with every prunable layer at its cap"

#: what the torchvision models of a family (a name prefix) must do: LayerNorm over channels and attention
#: tie every channel to the input; with the linear layers capped at 60%, half the MACs is out of reach
FAMILIES: dict[str, dict[str, Any]] = {
    "convnext_": {"prunes": NOTHING_TO_PRUNE},
    "swin_": {"converts": False, "prunes": NOTHING_TO_PRUNE, "plans": BUDGET_UNMET},
    "vit_": {"converts": False, "prunes": NOTHING_TO_PRUNE, "plans": BUDGET_UNMET},
}

#: torchvision models that need another input, or less memory: 2.6 GB of weights (vit_h_14, regnet_y_128gf),
#: 1.2 GB (ViT-L), or 3-4 GB to train converted (efficientnet_v2_l, regnet_y_32gf)
TORCHVISION: dict[str, dict[str, Any]] = {
    "googlenet": {"kwargs": {"init_weights": True}},  # as now, without the FutureWarning
    "inception_v3": {"kwargs": {"aux_logits": False, "init_weights": True}, "size": (3, 75, 75)},  # aux: 299
    "maxvit_t": {"size": (3, 224, 224)},  # 7 x 7 windows at stride 32
    "vit_b_16": {"kwargs": {"image_size": 32}, "size": (3, 32, 32)},
    "vit_b_32": {"kwargs": {"image_size": 64}},
    "vit_l_16": {"builder": _vit(16, 16, 1024, 4096), "kwargs": {"num_layers": 4, "image_size": 32},
                 "size": (3, 32, 32)},
    "vit_l_32": {"builder": _vit(32, 16, 1024, 4096), "kwargs": {"num_layers": 4, "image_size": 64}},
    "vit_h_14": {"builder": _vit(14, 16, 1280, 5120), "kwargs": {"num_layers": 2, "image_size": 28},
                 "size": (3, 28, 28)},
    "regnet_y_128gf": {"builder": regnet_y_128gf_stages, "kwargs": {"depths": [1, 1, 1]}},  # widths to 2904
    "efficientnet_v2_l": {"exclude": blocks_after("features.6", 2, 25) + blocks_after("features.7", 2, 7)},
    "regnet_y_32gf": {"exclude": blocks_after("trunk_output.block3.block3-", 2, 13)},
}

#: timm CNNs of families torchvision lacks: ResNet-D, SE-ResNeXt, TF "same" padding, ghost, one-shot
#: aggregation, DLA, CSP, HRNet (TF padding defeats torch.fx; concatenations tie VoVNet's and CSPNet's channels)
TIMM: dict[str, dict[str, Any]] = {
    "resnet50d": {},
    "seresnext26d_32x4d": {},
    "efficientnet_b0": {},
    "tf_efficientnet_b0": {"prunes": r"traces the model with torch\.fx, which failed", "untraceable": True},
    "mobilenetv3_large_100": {},
    "regnety_002": {},
    "convnext_atto": {},
    "ghostnet_100": {},
    "ese_vovnet19b_dw": {"prunes": NOTHING_TO_PRUNE},
    "dla46_c": {},
    "cspresnet50": {"prunes": NOTHING_TO_PRUNE},
    "hrnet_w18_small": {},
}


def _torchvision_cases() -> list[Case]:
    cases = []
    for name in tvm.list_models(module=tvm):
        family = next((f for prefix, f in FAMILIES.items() if name.startswith(prefix)), {})
        spec = {**family, **TORCHVISION.get(name, {})}
        builder = spec.pop("builder", getattr(tvm, name))
        kwargs = {"num_classes": 10, **spec.pop("kwargs", {})}
        cases.append(Case(id=f"tv-{name}", builder=builder, kwargs=kwargs, **spec))
    return cases


def _timm_cases() -> list[Case]:
    try:
        import timm
    except ImportError:
        return []
    return [Case(id=f"timm-{name}", builder=functools.partial(timm.create_model, name),
                 kwargs={"pretrained": False, "num_classes": 10}, **spec) for name, spec in TIMM.items()]


CASES = _torchvision_cases() + _timm_cases()


# ------------------------------------------------------------------------------------------- the shards


def shard_of(cases: list[Case], shards: int) -> dict[str, int]:
    """Each case's shard (0-based): the costliest first, each to the shard with the least cost so far."""
    load, where = [0.0] * shards, {}
    for case in sorted(cases, key=lambda c: (-c.cost, c.id)):
        k = min(range(shards), key=lambda i: (load[i], i))
        load[k] += case.cost
        where[case.id] = k
    return where


def selected_shard(value: str | None, today: datetime.date) -> tuple[int, int] | None:
    """(k, n), 1-based, from ``NAS_GROUPING_ZOO_SHARD``; None for ``all``; unset, the shard of ``today``."""
    if value is None or not value.strip():
        return today.toordinal() % SHARDS + 1, SHARDS
    if value.strip().lower() == "all":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise pytest.UsageError(f"NAS_GROUPING_ZOO_SHARD={value!r}: expected k/n with 1 <= k <= n, or 'all'")
    return int(m.group(1)), int(m.group(2))


def _params() -> list:
    today = datetime.datetime.now(datetime.timezone.utc).date()
    chosen = selected_shard(os.environ.get("NAS_GROUPING_ZOO_SHARD"), today)
    where = shard_of(CASES, chosen[1]) if chosen else {}
    params = []
    for case in CASES:
        marks = []
        if chosen and where[case.id] + 1 != chosen[0]:
            marks.append(pytest.mark.skip(
                reason=f"zoo shard {chosen[0]}/{chosen[1]} runs other models ({case.id} is in shard "
                       f"{where[case.id] + 1}/{chosen[1]}); NAS_GROUPING_ZOO_SHARD=all runs every model"))
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def test_every_model_is_in_one_shard_and_the_shards_cost_alike():
    assert set(COSTS) <= {c.id for c in CASES}, "a cost for a model the zoo does not have"
    for n in (1, SHARDS, 11):
        where = shard_of(CASES, n)
        assert set(where) == {c.id for c in CASES} and set(where.values()) == set(range(n))
        loads = [sum(c.cost for c in CASES if where[c.id] == k) for k in range(n)]
        assert max(loads) - min(loads) <= max(c.cost for c in CASES)


def test_the_shard_is_read_from_the_environment_or_the_day():
    day = datetime.date(2025, 1, 1)
    assert selected_shard("2/7", day) == (2, 7) and selected_shard(" all ", day) is None
    assert {selected_shard(None, day + datetime.timedelta(d)) for d in range(SHARDS)} == \
        {(k, SHARDS) for k in range(1, SHARDS + 1)}
    for bad in ("0/3", "4/3", "3", "x/y"):
        with pytest.raises(pytest.UsageError, match="expected k/n"):
            selected_shard(bad, day)


# ------------------------------------------------------------------------------------------- the checks


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(case.builder(**case.kwargs)).eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: non-finite outputs"
    scale = max(b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} vs output scale {scale:.3g} (rel {rel})"


def reference_macs(model: nn.Module, size: tuple[int, ...]) -> int:
    """FlopCounterMode's FLOPs / 2 for one sample, with gradients on and the math attention kernel: so
    attention runs as matmuls it counts (it does not know the CPU's fused attention kernels)."""
    model.eval()
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *size))
    return counter.get_total_flops() // 2


def check_self_grouping_plan(model: nn.Module, case: Case, macs: int) -> None:
    sg = SelfGrouping(budget=0.5)
    if case.plans is not None:
        with pytest.raises(NasGroupingError, match=case.plans):
            sg.plan(model, case.size)
        return
    plan = sg.plan(model, case.size)
    assert plan.prunable, "the self-grouping plan prunes no layer"
    assert plan.macs == macs, f"the plan's MACs {plan.macs} are not count_macs's {macs}"
    assert plan.macs_after <= plan.budget_macs <= 0.5 * macs, "the plan misses its MAC budget"


def check_save_load(model: nn.Module, case: Case, folder, x: torch.Tensor, expected: torch.Tensor) -> None:
    save_model(model, folder, recipe={"kwargs": case.kwargs}, builder=case.builder)
    loaded = load_model(folder, builder=case.builder)
    assert torch.equal(outputs(loaded, x), expected), f"the loaded {folder.name} model computes otherwise"


def check_channel_pruning(model: nn.Module, case: Case, macs: int, folder, x: torch.Tensor,
                          dense: torch.Tensor) -> None:
    if case.prunes is not None:
        with pytest.raises(NasGroupingError, match=case.prunes):
            ChannelPruning(model, case.size).prune(0.3)
        return
    pruned = ChannelPruning(model, case.size).prune(0.3)
    out = outputs(pruned, x)
    assert out.shape == dense.shape and torch.isfinite(out).all(), f"the pruned model gives {out}"
    assert count_macs(pruned, case.size) < macs, "pruning removed no MACs"
    check_save_load(pruned, case, folder, x, out)


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the logits (GoogLeNet adds aux logits in training)."""
    heads = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    return sum(F.cross_entropy(h, y) for h in heads)


def check_training_step(converted: nn.Module, case: Case) -> None:
    converted.train()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, *case.size, generator=gen), torch.randint(0, 10, (2,), generator=gen)
    sums = [p.detach().double().sum() for p in converted.parameters()]
    optimizer = torch.optim.SGD(converted.parameters(), lr=1e-3)
    loss = _loss(converted(x), y)
    assert torch.isfinite(loss), f"training step: loss {loss.item()}"
    loss.backward()
    assert all(g.grad is not None and torch.isfinite(g.grad).all() for g in arch_parameters(converted)), \
        "the gates got no finite gradient"
    nn.utils.clip_grad_norm_(converted.parameters(), 1.0)  # random deep nets (Inception) explode
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert any(s != p.detach().double().sum() for s, p in zip(sums, converted.parameters())), "the step changed nothing"


def set_random_gates(model: nn.Module) -> None:
    """Random binary gates, the first layer's outermost one off, so that some layer is grouped and permuted."""
    gen = torch.Generator().manual_seed(2)
    for i, (_, layer) in enumerate(dgconv_layers(model)):
        gates = torch.randint(0, 2, (layer.num_gates,), generator=gen)
        if i == 0:
            gates[0] = 0
        layer.set_gates(gates)


@pytest.mark.parametrize("case", _params())
def test_zoo_model(case: Case, tmp_path):
    model = build(case)
    x = torch.randn(2, *case.size, generator=torch.Generator().manual_seed(0))
    dense = outputs(model, x)
    macs = count_macs(model, case.size)
    assert macs == reference_macs(model, case.size), "count_macs differs from FlopCounterMode / 2"
    check_self_grouping_plan(model, case, macs)
    check_channel_pruning(model, case, macs, tmp_path / "pruned", x, dense)
    gc.collect()  # the copies traced by channel pruning sit in reference cycles

    converted = convert_to_dgconv(model, exclude=case.exclude)
    layers = len(dgconv_layers(converted))
    assert bool(layers) == case.converts, f"{layers} layers converted"
    assert_close_rel(outputs(converted, x), dense, 1e-5, "the converted model")
    del model
    check_training_step(converted, case)
    set_random_gates(converted)
    expected = outputs(converted, x)
    masked_macs = count_macs(converted, case.size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FoldWarning)
        exported = export_model(converted, inplace=True)  # a copy would add the converted model's 1-2 GB (VGG)
    assert any(issubclass(w.category, FoldWarning) for w in caught) == case.untraceable, \
        [str(w.message) for w in caught]
    del converted
    assert not any(isinstance(m, DGConv2d) for m in exported.modules())
    out = outputs(exported, x)
    assert_close_rel(out, expected, 1e-4, "the exported model")
    assert count_macs(exported, case.size) == masked_macs == reference_macs(exported, case.size), \
        "the exported model's MACs differ from the masked model's or from FlopCounterMode's"
    if case.converts:
        assert masked_macs < macs, "random gates removed no MACs"
    check_save_load(exported, case, tmp_path / "exported", x, out)
    if case.id in DEPLOYED:
        check_deploy_export(exported, case, tmp_path)


def check_deploy_export(model: nn.Module, case: Case, folder) -> None:
    """The exported model as ONNX (run in ONNX Runtime) and as a torch.export program, equal to it."""
    from nas_grouping.export.deploy import export_deployable

    for fmt, suffix in (("onnx", ".onnx"), ("pt2", ".pt2")):
        report = export_deployable(model, folder / f"model{suffix}", input_size=case.size)
        assert report.max_abs_error <= 1e-5 * report.output_scale, (fmt, report)
        assert report.executed_macs >= report.structural_macs


@pytest.mark.parametrize("name,kwargs,size", [
    ("vit_b_32", {"image_size": 64}, (3, 32, 32)),  # torchvision's ViT checks its size with torch._assert
    ("maxvit_t", {}, (3, 64, 64)),
    ("inception_v3", {"aux_logits": False, "init_weights": True}, (3, 32, 32)),
], ids=["vit_b_32", "maxvit_t", "inception_v3"])
def test_an_input_size_the_model_refuses_is_a_config_error(name, kwargs, size):
    model = tvm.get_model(name, num_classes=10, **kwargs)
    for call in (count_macs, SelfGrouping(budget=0.5).plan, ChannelPruning):
        with pytest.raises(ConfigError, match=re.escape(str(size))):
            call(model, size)
