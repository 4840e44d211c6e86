"""Diverse group layers: exact against the masked dense computation, MACs, export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nas_grouping.errors import ConfigError
from nas_grouping.ops.diverse_group import (
    FORMS,
    DiverseGroupConv2d,
    DiverseGroupLinear,
    choose_form,
)


def _groups(c_in: int, c_out: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Uneven groups: one single-filter group, one group with an EMPTY input set, the rest
    random sizes; input sets random (overlapping, different sizes, unsorted)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(c_out, generator=gen).tolist()
    cut = sorted(torch.randperm(c_out - 3, generator=gen)[:2].add(2).tolist())
    blocks = [perm[:1], perm[1:cut[0]], perm[cut[0]:cut[1]], perm[cut[1]:]]
    blocks = [b for b in blocks if b]
    groups = []
    for g, filters in enumerate(blocks):
        if g == 1:
            inputs: list[int] = []  # this group reads nothing: its filters output their bias
        else:
            k = int(torch.randint(1, c_in + 1, (1,), generator=gen))
            inputs = torch.randperm(c_in, generator=gen)[:k].tolist()
        groups.append((filters, inputs))
    return groups


def _mask(groups, c_in: int, c_out: int) -> torch.Tensor:
    m = torch.zeros(c_out, c_in, dtype=torch.bool)
    for f, s in groups:
        for o in f:
            m[o, s] = True
    return m


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to 1e-5 relative to the output's scale."""
    y, ref = y.detach(), ref.detach()
    assert y.shape == ref.shape
    if ref.numel() == 0:
        return
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max().clamp_min(1.0)))


CONV_CASES = [
    # c_in, c_out, kernel, stride, padding, dilation, (H, W)
    (7, 10, 3, 1, 1, 1, (9, 8)),
    (13, 6, 1, 1, 0, 1, (5, 7)),
    (12, 20, 3, 2, 1, 1, (11, 6)),
    (10, 9, 3, 1, 2, 2, (12, 9)),
    (6, 11, (1, 3), (2, 1), (0, 1), 1, (7, 10)),
    (5, 7, 3, 2, 0, 1, (9, 9)),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("form", FORMS)
def test_conv_exact_vs_masked_dense(case, form):
    c_in, c_out, k, stride, padding, dilation, hw = case
    torch.manual_seed(hash(case) % 1000)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, dilation)
    groups = _groups(c_in, c_out, seed=len(CONV_CASES) + c_in)
    mask = _mask(groups, c_in, c_out)
    layer = DiverseGroupConv2d.from_masked(conv, mask, [f for f, _ in groups], form=form)
    assert layer.form == form
    x = torch.randn(3, c_in, *hw)
    ref = F.conv2d(x, conv.weight * mask[:, :, None, None], conv.bias, stride, padding, dilation)
    _close(layer(x), ref)
    with torch.inference_mode():  # the cached (dense / padded) weight path
        _close(layer(x), ref)
        _close(layer(x), ref)


@pytest.mark.parametrize("form", FORMS)
def test_conv_constructor_groups_any_order_and_empty_group_outputs_bias(form):
    # S_g unsorted and overlapping; group 1 reads nothing; group 2 has one filter
    groups = [([4, 0, 2], [5, 1, 3]), ([1, 5], []), ([3], [0, 5, 2, 4, 1]), ([6, 7], [3, 2])]
    layer = DiverseGroupConv2d(6, 8, 3, padding=1, groups=groups, form=form)
    with torch.no_grad():
        for w in layer.weights:
            w.normal_()
        layer.bias.normal_()
    dense = torch.zeros(8, 6, 3, 3)
    for (f, s), w in zip(groups, layer.weights):  # row r = F_g[r], column c = S_g[c]
        for r, o in enumerate(f):
            for c, i in enumerate(s):
                dense[o, i] = w[r, c].detach()
    x = torch.randn(2, 6, 5, 7)
    y = layer(x)
    _close(y, F.conv2d(x, dense, layer.bias.detach(), 1, 1))
    for o in (1, 5):
        assert torch.equal(y[:, o], layer.bias[o].detach().expand(2, 5, 7))


@pytest.mark.parametrize("form", FORMS)
def test_conv_without_bias_and_all_groups_empty(form):
    layer = DiverseGroupConv2d(4, 5, 3, stride=2, bias=False, groups=[([0, 1], [2]), ([2, 3, 4], [])], form=form)
    x = torch.randn(2, 4, 9, 8)
    ref = F.conv2d(x, layer.dense_weight().detach(), None, 2)
    _close(layer(x), ref)
    assert torch.equal(layer(x)[:, 2:], torch.zeros(2, 3, 4, 3))
    empty = DiverseGroupConv2d(4, 3, 3, padding=1, groups=[([0, 2], []), ([1], [])], form=form)
    y = empty(x)
    assert y.shape == (2, 3, 9, 8)
    assert torch.equal(y, empty.bias.detach().view(1, 3, 1, 1).expand(2, 3, 9, 8))


def test_conv_channels_last_input():
    groups = _groups(9, 12, seed=1)
    conv = nn.Conv2d(9, 12, 3, padding=1)
    mask = _mask(groups, 9, 12)
    x = torch.randn(2, 9, 6, 6).contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, conv.weight * mask[:, :, None, None], conv.bias, 1, 1)
    for form in FORMS:
        _close(DiverseGroupConv2d.from_masked(conv, mask, [f for f, _ in groups], form=form)(x), ref)


def test_gradients_match_masked_dense():
    groups = _groups(8, 9, seed=3)
    conv = nn.Conv2d(8, 9, 3, padding=1)
    mask = _mask(groups, 8, 9)
    x = torch.randn(2, 8, 5, 5)
    ref_out = F.conv2d(x, conv.weight * mask[:, :, None, None], conv.bias, 1, 1)
    (ref_out ** 2).sum().backward()
    for form in FORMS:
        layer = DiverseGroupConv2d.from_masked(conv, mask, [f for f, _ in groups], form=form)
        (layer(x) ** 2).sum().backward()
        for w, (f, s) in zip(layer.weights, layer.groups):
            if not s:  # a group that reads nothing has no weights (per_group never uses them)
                assert w.numel() == 0
                continue
            _close(w.grad, conv.weight.grad[list(f)][:, list(s)])
        _close(layer.bias.grad, conv.bias.grad)


@pytest.mark.parametrize("form", ("grouped", "dense"))
def test_cached_weight_follows_in_place_edits_and_load_state_dict(form):
    groups = _groups(6, 7, seed=4)
    layer = DiverseGroupConv2d(6, 7, 3, padding=1, groups=groups, form=form)
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        y1 = layer(x)
        layer.weights[0].mul_(-3.0)
        layer.weights[2].add_(1.0)
        y2 = layer(x)
        _close(y2, F.conv2d(x, layer.dense_weight(), layer.bias, 1, 1))
        assert not torch.allclose(y1, y2)
        other = DiverseGroupConv2d(6, 7, 3, padding=1, groups=groups, form=form)
        layer.load_state_dict(other.state_dict())
        _close(layer(x), other(x))


def test_permute_input_channels_follows_a_permuted_producer():
    groups = _groups(10, 8, seed=5)
    layer = DiverseGroupConv2d(10, 8, 3, padding=1, groups=groups, form="grouped")
    x = torch.randn(2, 10, 6, 6)
    before = layer(x).detach()
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    layer.permute_input_channels(order)
    _close(layer(x[:, order]), before)
    with pytest.raises(ConfigError, match="permutation"):
        layer.permute_input_channels([0] * 10)


# --------------------------------------------------------------------- validation
def test_from_masked_rejects_a_mask_that_varies_within_a_group():
    conv = nn.Conv2d(4, 4, 3)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[3, 1] = False
    with pytest.raises(ConfigError, match="same for every filter"):
        DiverseGroupConv2d.from_masked(conv, mask, [[0, 1], [2, 3]])
    # the same mask is fine when filter 3 is a group of its own
    layer = DiverseGroupConv2d.from_masked(conv, mask, [[0, 1, 2], [3]])
    assert layer.groups[1] == ((3,), (0, 2, 3))
    lin = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="same for every filter"):
        DiverseGroupLinear.from_masked(lin, mask, [[0, 3], [1, 2]])


@pytest.mark.parametrize("groups_of_filters, match", [
    ([[0, 1], [1, 2, 3]], "exactly one group"),   # filter 1 twice
    ([[0, 1], [2]], "missing \\[3\\]"),           # filter 3 missing
    ([[0, 1], [2, 3, 4]], "0 <= index < 4"),      # out of range
    ([[0, 1, 2, 3], []], "empty"),                # empty group
])
def test_bad_partition_is_rejected(groups_of_filters, match):
    conv = nn.Conv2d(3, 4, 1)
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match=match):
        DiverseGroupConv2d.from_masked(conv, mask, groups_of_filters)


def test_constructor_and_from_masked_validation():
    with pytest.raises(ConfigError, match="input channel 5"):
        DiverseGroupConv2d(5, 2, 3, groups=[([0, 1], [5])])
    with pytest.raises(ConfigError, match="more than once"):
        DiverseGroupConv2d(5, 2, 3, groups=[([0, 1], [1, 1])])
    with pytest.raises(ConfigError, match="exactly one group"):
        DiverseGroupLinear(5, 2, groups=[([0, 1], [1]), ([1], [2])])
    with pytest.raises(ConfigError, match="form must be one of"):
        DiverseGroupConv2d(5, 2, 3, groups=[([0, 1], [1])], form="fast")
    with pytest.raises(ConfigError, match="shape \\(4, 3\\)"):
        DiverseGroupConv2d.from_masked(nn.Conv2d(3, 4, 1), torch.ones(3, 4, dtype=torch.bool), [[0, 1, 2, 3]])
    with pytest.raises(ConfigError, match="only 0 and 1"):
        DiverseGroupConv2d.from_masked(nn.Conv2d(3, 4, 1), torch.full((4, 3), 0.5), [[0, 1, 2, 3]])
    with pytest.raises(ConfigError, match="groups=1"):
        DiverseGroupConv2d.from_masked(nn.Conv2d(4, 4, 1, groups=2), torch.ones(4, 2), [[0, 1, 2, 3]])
    with pytest.raises(ConfigError, match="expected an input"):
        DiverseGroupConv2d(5, 2, 3, groups=[([0, 1], [1])])(torch.randn(1, 4, 5, 5))


# --------------------------------------------------------------------------- MACs
@pytest.mark.parametrize("case", CONV_CASES[:4])
def test_macs_formula_and_flop_counter(case):
    c_in, c_out, k, stride, padding, dilation, hw = case
    groups = _groups(c_in, c_out, seed=7)
    layer = DiverseGroupConv2d(c_in, c_out, k, stride, padding, dilation, groups=groups, form="per_group")
    batch = 2
    x = torch.randn(batch, c_in, *hw)
    kh, kw = layer.kernel_size
    kept = int(_mask(groups, c_in, c_out).sum())
    assert layer.kept_connections() == kept
    with FlopCounterMode(display=False) as counter:
        out = layer(x)
    size = tuple(out.shape[2:])
    assert layer.output_size(hw) == size
    # macs() is the formula: kept connections x kernel taps x output positions, per sample
    assert layer.macs(size) == kept * kh * kw * size[0] * size[1]
    # per_group executes exactly the kept connections (an empty group runs no conv), so
    # PyTorch's count (2 FLOPs per MAC, whole batch) equals macs()
    assert counter.get_total_flops() == 2 * batch * layer.macs(size)
    # the padded grouped form also multiplies its zero padding: FlopCounterMode counts
    # what it executes (executed_macs), which is >= the kept MACs
    layer.form = "grouped"
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * batch * layer.executed_macs(size)
    assert layer.executed_macs(size) >= layer.macs(size)
    layer.form = "dense"
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * batch * c_in * c_out * kh * kw * size[0] * size[1]


def test_linear_macs_and_flop_counter():
    groups = _groups(11, 9, seed=8)
    layer = DiverseGroupLinear(11, 9, groups=groups, form="per_group")
    kept = int(_mask(groups, 11, 9).sum())
    assert layer.macs(()) == kept
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(4, 11))
    assert counter.get_total_flops() == 2 * 4 * kept
    layer.form = "grouped"
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(4, 11))
    assert counter.get_total_flops() == 2 * 4 * layer.executed_macs(())


# ------------------------------------------------------------------------- export
@pytest.mark.parametrize("form", FORMS)
def test_conv_config_round_trip_through_json(form):
    groups = _groups(9, 13, seed=9)
    layer = DiverseGroupConv2d(9, 13, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 1), groups=groups,
                               form=form)
    config = json.loads(json.dumps(layer.to_config()))
    assert config == layer.to_config() and config["form"] == form
    state = layer.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert not any(k.startswith("_") for k in state)  # index buffers are rebuilt, not saved
    rebuilt = DiverseGroupConv2d.from_config(config)
    rebuilt.load_state_dict(state)
    assert rebuilt.form == form and rebuilt.groups == layer.groups
    x = torch.randn(2, 9, 8, 7)
    assert torch.equal(rebuilt(x), layer(x))
    assert rebuilt.to_config() == config


@pytest.mark.parametrize("form", FORMS)
def test_linear_exact_and_round_trip(form):
    groups = _groups(11, 9, seed=10)
    lin = nn.Linear(11, 9)
    mask = _mask(groups, 11, 9)
    layer = DiverseGroupLinear.from_masked(lin, mask, [f for f, _ in groups], form=form)
    x = torch.randn(2, 3, 11)
    ref = F.linear(x, lin.weight * mask, lin.bias)
    _close(layer(x), ref)
    with torch.inference_mode():
        _close(layer(x), ref)
    empty_out = [o for f, s in groups if not s for o in f]
    assert torch.equal(layer(x)[..., empty_out].detach(), lin.bias[empty_out].detach().expand(2, 3, -1))
    config = json.loads(json.dumps(layer.to_config()))
    rebuilt = DiverseGroupLinear.from_config(config)
    rebuilt.load_state_dict(layer.state_dict())
    assert rebuilt.form == form
    assert torch.equal(rebuilt(x), layer(x))
    no_bias = DiverseGroupLinear(11, 9, bias=False, groups=groups, form=form)
    _close(no_bias(x), F.linear(x, no_bias.dense_weight().detach()))


def test_auto_form_follows_the_rule_and_stays_exact():
    x_small, x_big = torch.randn(1, 32, 6, 6), torch.randn(4, 32, 6, 6)
    # 4 equal groups, each reading 8 of 32 channels: a 4x MAC saving, but groups read < 32
    # channels, too small for the grouped kernel -> dense at batch 1
    even = [(list(range(g * 8, g * 8 + 8)), list(range(g * 8, g * 8 + 8))) for g in range(4)]
    layer = DiverseGroupConv2d(32, 32, 3, padding=1, groups=even)
    assert layer.form == "auto" and layer.to_config()["form"] == "auto"
    assert layer.executed_connections("grouped") == layer.kept_connections() == 32 * 32 // 4
    assert layer.resolve_form((6, 6), 1) == "dense"
    # the same groups over 128 channels (32 per group): one grouped conv for small calls,
    # one conv per group once each group has >= 25M MACs to do
    wide = [(list(range(g * 32, g * 32 + 32)), list(range(g * 32, g * 32 + 32))) for g in range(4)]
    layer = DiverseGroupConv2d(128, 128, 3, padding=1, groups=wide)
    assert layer.resolve_form((14, 14), 1) == "grouped"
    assert layer.resolve_form((14, 14), 32) == "per_group"  # 1024 x 9 x 196 x 32 = 58M per group
    assert layer.executed_macs((14, 14), batch=32) == layer.macs((14, 14))
    # one big group reading everything plus a tiny one: only 1.03x saving -> dense
    skew = [(list(range(31)), list(range(32))), ([31], [0])]
    layer = DiverseGroupConv2d(32, 32, 3, groups=skew)
    assert layer.resolve_form((4, 4), 1) == layer.resolve_form((4, 4), 256) == "dense"
    # a pinned form is used whatever the call
    layer.form = "grouped"
    assert layer.resolve_form((4, 4), 256) == "grouped"
    assert DiverseGroupConv2d.from_config(layer.to_config()).form == "grouped"
    # "auto" switches forms between calls and stays exact
    groups = _groups(10, 12, seed=11)
    conv = nn.Conv2d(10, 12, 3, padding=1)
    mask = _mask(groups, 10, 12)
    auto = DiverseGroupConv2d.from_masked(conv, mask, [f for f, _ in groups])
    with torch.no_grad():
        for x in (torch.randn(1, 10, 5, 5), torch.randn(3, 10, 7, 6), torch.randn(1, 10, 5, 5)):
            _close(auto(x), F.conv2d(x, conv.weight * mask[:, :, None, None], conv.bias, 1, 1))
    assert choose_form(dense_connections=100, kept_connections=0, grouped_connections=0, groups=0,
                       padded_inputs=0, padded_filters=0, positions=10) == "per_group"
    # 16 groups: never per_group, however big the call
    many = dict(dense_connections=256 * 256, kept_connections=256 * 64, grouped_connections=256 * 64,
                groups=16, padded_inputs=64, padded_filters=16)
    assert choose_form(**many, positions=10**6) == "grouped"
    assert choose_form(**{**many, "groups": 8}, positions=10**6) == "per_group"
    assert choose_form(**{**many, "padded_filters": 8}, positions=1) == "dense"


def test_benchmark_smoke():
    from nas_grouping.bench.diverse_group import bench_diverse_group, format_table

    rows = bench_diverse_group(shapes=[(12, 10, 5)], batch_sizes=(2,), fractions=(0.5,), clusters=3,
                               repeats=1, warmup=0)
    assert len(rows) == 1
    row = rows[0]
    assert row["threads"] == torch.get_num_threads() and row["max_abs_error"] < 1e-4
    assert sorted(row["group_sizes"]) != [] and sum(row["group_sizes"]) == 10
    assert row["mac_ratio"] == pytest.approx(12 / 6)  # every group keeps half of the 12 inputs
    assert row["default_form"] in FORMS
    assert all(row[k] > 0 for k in ("dense_ms", "masked_ms", "grouped_ms", "per_group_ms", "default_ms"))
    table = format_table(rows)
    assert "12->10@5" in table and row["default_form"] in table
