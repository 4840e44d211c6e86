"""DGConv2d: drop-in behaviour, the Kronecker mask, gates, cost, eval caching, bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas_grouping import ConfigError, DGConv2d, ExportError, NasGroupingError, export_model
from nas_grouping.export.model import export_layer
from nas_grouping.ops.dgconv import shared_power_of_two

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


# ----------------------------------------------------------------- helpers

def kron_mask(gates, r_out: int = 1, r_in: int = 1) -> torch.Tensor:
    """U_1 (x) ... (x) U_K (x) 1_{r_out x r_in}, U_k = 1_{2x2} if gate on else I_2, via torch.kron."""
    u = torch.ones(1, 1)
    for g in gates:
        u = torch.kron(u, torch.ones(2, 2) if int(g) else torch.eye(2))
    return torch.kron(u, torch.ones(r_out, r_in))


def soft_kron_mask(g: torch.Tensor, r_out: int = 1, r_in: int = 1) -> torch.Tensor:
    """Differentiable kron mask for gate values g: U_k = g_k * 1_{2x2} + (1 - g_k) * I_2."""
    u = torch.ones(1, 1, dtype=g.dtype)
    eye, ones = torch.eye(2, dtype=g.dtype), torch.ones(2, 2, dtype=g.dtype)
    for gk in g:
        u = torch.kron(u, gk * ones + (1 - gk) * eye)
    return torch.kron(u, torch.ones(r_out, r_in, dtype=g.dtype))


def twin_conv(m: DGConv2d) -> nn.Conv2d:
    """An nn.Conv2d with m's constructor arguments and weights."""
    c = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1,
                  m.bias is not None, m.padding_mode)
    c.load_state_dict({k: v for k, v in m.state_dict().items() if k in ("weight", "bias")})
    return c


def all_patterns(k: int):
    return [list(p) for p in itertools.product([0, 1], repeat=k)]


def close(a, b, rtol=1e-5, atol=1e-6):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


# -------------------------------------------------------- 1. drop-in for nn.Conv2d

DROP_IN_CONFIGS = [
    # in, out, kernel, stride, padding, dilation, bias, padding_mode
    (8, 16, 3, 1, 1, 1, True, "zeros"),
    (8, 16, 3, 2, 1, 1, False, "zeros"),
    (16, 8, 3, (2, 1), (1, 2), 1, True, "zeros"),
    (8, 8, (3, 5), 1, (1, 2), (2, 1), True, "zeros"),
    (8, 8, 3, 1, "same", 1, True, "zeros"),
    (8, 8, 4, 1, "same", 2, False, "zeros"),
    (8, 8, 3, 1, "valid", 1, True, "zeros"),
    (8, 8, 3, 1, 0, 1, True, "zeros"),
    (4, 12, 3, 1, 1, 1, True, "reflect"),
    (4, 12, 3, 2, (1, 2), 1, False, "replicate"),
    (12, 4, 3, 1, 2, 2, True, "circular"),
    (8, 8, 3, 1, "same", 1, True, "reflect"),
    (24, 40, 1, 1, 0, 1, True, "zeros"),
    (6, 10, 5, 3, 2, 1, True, "circular"),
]


def test_is_an_nn_conv2d():
    m = DGConv2d(8, 16, 3)
    assert isinstance(m, nn.Conv2d)
    assert isinstance(m, nn.Module)
    assert m.groups == 1  # the stored weight is dense
    assert m.weight.shape == (16, 8, 3, 3)


@pytest.mark.parametrize("cfg", DROP_IN_CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("training", [True, False])
def test_all_gates_on_equals_conv2d(cfg, training):
    cin, cout, k, s, p, d, bias, mode = cfg
    m = DGConv2d(cin, cout, k, s, p, d, bias=bias, padding_mode=mode)
    assert m.learned_groups == 1
    ref = twin_conv(m)
    m.train(training)
    ref.train(training)
    x = torch.randn(2, cin, 11, 13)
    y, y_ref = m(x), ref(x)
    assert y.shape == y_ref.shape
    assert close(y, y_ref)
    # gradients with respect to the weight agree as well (U is all ones)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert close(m.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    if bias:
        assert close(m.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", DROP_IN_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_output_size_matches_forward(cfg):
    cin, cout, k, s, p, d, bias, mode = cfg
    m = DGConv2d(cin, cout, k, s, p, d, bias=bias, padding_mode=mode)
    for hw in [(11, 13), (7, 7), (16, 9)]:
        y = m(torch.randn(1, cin, *hw))
        assert m.output_size(hw) == tuple(y.shape[2:])


FROM_CONV_CONFIGS = [
    # in, out, kernel, stride, padding, groups, bias, padding_mode
    (8, 16, 3, 1, 1, 1, True, "zeros"),
    (8, 16, 3, 1, 1, 2, True, "zeros"),
    (8, 16, 3, 2, 1, 4, False, "zeros"),
    (16, 16, 1, 1, 0, 4, True, "zeros"),
    (16, 8, 3, 1, "same", 2, True, "reflect"),
    (12, 24, 3, 1, 1, 4, True, "circular"),
    (8, 8, 3, 1, (0, 1), 8, False, "replicate"),
    (24, 40, 3, 2, 1, 2, True, "zeros"),
]


@pytest.mark.parametrize("cfg", FROM_CONV_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_from_conv_is_exact(cfg):
    cin, cout, k, s, p, g, bias, mode = cfg
    src = nn.Conv2d(cin, cout, k, s, p, groups=g, bias=bias, padding_mode=mode)
    m = DGConv2d.from_conv(src)
    assert isinstance(m, DGConv2d)
    assert m.learned_groups == g
    # the first log2(g) gates are off (contiguous groups, as nn.Conv2d(groups=g))
    off = int(math.log2(g))
    assert m.gate_values().tolist() == [0.0] * off + [1.0] * (m.num_gates - off)
    x = torch.randn(2, cin, 10, 9)
    for training in (True, False):
        m.train(training)
        src.train(training)
        assert close(m(x), src(x))
    # the copy is independent of the source
    with torch.no_grad():
        src.weight.add_(1.0)
    assert not close(m.eval()(x), src.eval()(x))


def test_from_conv_keeps_requires_grad_and_gate_init():
    src = nn.Conv2d(8, 8, 3, groups=2)
    src.weight.requires_grad_(False)
    m = DGConv2d.from_conv(src, gate_init=0.5)
    assert not m.weight.requires_grad
    assert m.gate_latent.abs().tolist() == pytest.approx([0.5] * 3)


@pytest.mark.parametrize("gates", [[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]])
def test_state_dict_round_trip(gates):
    a = DGConv2d(8, 8, 3, padding=1)
    a.set_gates(gates)
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "gate_latent"}  # index buffers are not persistent
    b = DGConv2d(8, 8, 3, padding=1)
    b.load_state_dict(sd)
    assert b.learned_groups == a.learned_groups == 2 ** gates.count(0)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_double_precision():
    m = DGConv2d(8, 16, 3, padding=1).double()
    ref = twin_conv(m).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert m(x).dtype == torch.float64
    assert torch.allclose(m(x), ref(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- 2. the mask

SQUARE_CASES = [(k, p) for k in range(1, 5) for p in all_patterns(k)]


@pytest.mark.parametrize("k,gates", SQUARE_CASES, ids=lambda v: str(v))
def test_mask_equals_kron_square(k, gates):
    c = 2**k
    m = DGConv2d(c, c, 3, padding=1)
    assert m.num_gates == k and m.r_in == m.r_out == 1
    m.set_gates(gates)
    u = m.relationship_matrix()
    assert torch.equal(u, kron_mask(gates))
    assert torch.equal(m.masked_weight(), m.weight * kron_mask(gates)[:, :, None, None])
    g = 2 ** gates.count(0)
    assert m.learned_groups == g
    # uniform groups: every row and every column has the same number of ones
    assert torch.equal(u.sum(1), torch.full((c,), c / g))
    assert torch.equal(u.sum(0), torch.full((c,), c / g))
    assert m.connections() == int(u.sum())


NONSQUARE = [(24, 40), (48, 12), (12, 36), (8, 24), (40, 24), (6, 10), (16, 48), (32, 8), (20, 12)]


@pytest.mark.parametrize("cin,cout", NONSQUARE)
def test_mask_nonsquare_equals_gated_kron_times_ones(cin, cout):
    k = shared_power_of_two(cin, cout)
    assert cin % 2**k == 0 and cout % 2**k == 0
    assert (cin >> k) % 2 or (cout >> k) % 2  # 2^K is the largest shared power of two
    m = DGConv2d(cin, cout, 3)
    assert (m.num_gates, m.r_in, m.r_out) == (k, cin >> k, cout >> k)
    for gates in all_patterns(k):
        m.set_gates(gates)
        u = m.relationship_matrix()
        expected = kron_mask(gates, cout >> k, cin >> k)
        assert u.shape == (cout, cin)
        assert torch.equal(u, expected), gates
        g = 2 ** gates.count(0)
        assert m.learned_groups == g
        assert torch.equal(u.sum(1), torch.full((cout,), cin / g))  # every row: C_in / G ones
        assert torch.equal(u.sum(0), torch.full((cin,), cout / g))
        # exactly G distinct rows, each used C_out / G times: G uniform groups
        rows, counts = torch.unique(u, dim=0, return_counts=True)
        assert len(rows) == g and torch.all(counts == cout // g)


@pytest.mark.parametrize("cin,cout", [(8, 8), (24, 40), (48, 12), (12, 36)])
def test_all_on_dense_all_off_max_groups(cin, cout):
    m = DGConv2d(cin, cout, 1)
    k = m.num_gates
    m.set_gates([1] * k)
    assert m.learned_groups == 1
    assert torch.equal(m.relationship_matrix(), torch.ones(cout, cin))
    m.set_gates([0] * k)
    assert m.learned_groups == 2**k == m.max_groups
    assert int(m.relationship_matrix().sum()) == cout * cin // 2**k


@pytest.mark.parametrize("cin,cout,gates", [(8, 8, [0, 1, 0]), (24, 40, [1, 0, 0]), (12, 36, [0, 1])])
def test_forward_uses_kron_mask(cin, cout, gates):
    m = DGConv2d(cin, cout, 3, stride=2, padding=1)
    m.set_gates(gates)
    k = m.num_gates
    u = kron_mask(gates, cout >> k, cin >> k)
    x = torch.randn(2, cin, 9, 9)
    expected = F.conv2d(x, m.weight * u[:, :, None, None], m.bias, 2, 1)
    assert close(m(x), expected)
    assert close(m.eval()(x), expected)


# ------------------------------------------------------------------------ 3. gates

def test_latent_exactly_zero_gives_gate_one():
    m = DGConv2d(8, 8, 3)
    with torch.no_grad():
        m.gate_latent.zero_()
    assert m.gate_values().tolist() == [1.0, 1.0, 1.0]  # not 0.5 (sign(0) bug)
    assert m.learned_groups == 1
    assert torch.equal(m.relationship_matrix(), torch.ones(8, 8))
    with torch.no_grad():
        m.gate_latent.copy_(torch.tensor([0.0, -1e-12, 1e-12]))
    assert m.gate_values().tolist() == [1.0, 0.0, 1.0]
    assert m.learned_groups == 2
    assert set(m.relationship_matrix().unique().tolist()) <= {0.0, 1.0}


def test_gate_latent_is_a_leaf_parameter_and_is_not_overwritten():
    m = DGConv2d(8, 16, 3, padding=1, gate_init=0.3)
    assert isinstance(m.gate_latent, nn.Parameter)
    assert m.gate_latent.is_leaf and m.gate_latent.requires_grad
    before = m.gate_latent.detach().clone()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y0 = m(x)
    assert y0.grad_fn is None
    y1 = m(x)
    assert y1.grad_fn is not None
    y1.sum().backward()
    assert m.gate_latent.grad is not None
    assert torch.equal(m.gate_latent.detach(), before)  # no `.data` swapping: latents are kept
    assert torch.equal(y0, y1.detach())


@pytest.mark.parametrize("cin,cout", [(8, 8), (16, 16), (24, 40), (12, 36)])
@pytest.mark.parametrize("seed", range(3))
def test_straight_through_gradient_equals_gate_gradient(cin, cout, seed):
    """d loss / d latent equals d loss / d g computed with an explicit kron mask and leaf gates."""
    torch.manual_seed(seed)
    m = DGConv2d(cin, cout, 3, padding=1)
    k = m.num_gates
    gates = torch.randint(0, 2, (k,)).tolist()
    m.set_gates(gates, magnitude=0.05)
    x = torch.randn(2, cin, 6, 6)
    target = torch.randn(2, cout, 6, 6)
    F.mse_loss(m(x), target).backward()

    g = torch.tensor(gates, dtype=torch.float32, requires_grad=True)
    u = soft_kron_mask(g, cout >> k, cin >> k)
    y = F.conv2d(x, m.weight.detach() * u[:, :, None, None], m.bias.detach(), 1, 1)
    F.mse_loss(y, target).backward()
    assert torch.allclose(m.gate_latent.grad, g.grad, rtol=1e-4, atol=1e-7)
    assert g.grad.abs().sum() > 0


@pytest.mark.parametrize("gates", all_patterns(3) + [[1, 0, 1, 1], [0, 0, 1, 0]])
def test_straight_through_gradient_of_expected_macs(gates):
    k = len(gates)
    m = DGConv2d(2**k * 3, 2**k * 5, 3)
    m.set_gates(gates)
    out = (7, 5)
    m.expected_macs(out).backward()
    const = 7 * 5 * 9 * 3 * 5 * 2**k
    g = torch.tensor(gates, dtype=torch.float64)
    analytic = [const * torch.prod(1 + torch.cat([g[:j], g[j + 1:]])).item() for j in range(k)]
    assert m.gate_latent.grad.tolist() == pytest.approx(analytic, rel=1e-6)


def test_freeze_gates_stops_gate_gradient_but_weights_train():
    m = DGConv2d(8, 8, 3, padding=1)
    m.set_gates([1, 0, 1])
    m.freeze_gates()
    assert m.gates_frozen
    latent0, weight0 = m.gate_latent.detach().clone(), m.weight.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 8, 5, 5)
    m(x).square().mean().backward()
    assert m.gate_latent.grad is None
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(m.gate_latent.detach(), latent0)
    assert not torch.equal(m.weight.detach(), weight0)
    # masked-out weights get zero gradient
    mask = kron_mask([1, 0, 1])[:, :, None, None].expand_as(m.weight)
    assert torch.all(m.weight.grad[mask == 0] == 0)
    m.unfreeze_gates()
    assert not m.gates_frozen
    m.zero_grad()
    m(x).square().mean().backward()
    assert m.gate_latent.grad is not None


@pytest.mark.parametrize("bad", [[1, 1], [1, 1, 1, 1], [], [[1, 0], [1, 0]]])
def test_set_gates_wrong_length_names_layer_and_count(bad):
    m = DGConv2d(8, 8, 3)
    m.layer_name = "stage2.block1.conv"
    with pytest.raises(ConfigError) as info:
        m.set_gates(bad)
    msg = str(info.value)
    assert "stage2.block1.conv" in msg
    assert "expected 3 gates" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [[1, 0.5, 1], [2, 0, 1], [-1, 0, 0], [float("nan"), 1, 1]])
def test_set_gates_non_binary_names_layer(bad):
    m = DGConv2d(8, 8, 3)
    m.layer_name = "head.conv"
    before = m.gate_latent.detach().clone()
    with pytest.raises(ConfigError, match="head.conv") as info:
        m.set_gates(bad)
    assert "0 or 1" in str(info.value)
    assert torch.equal(m.gate_latent.detach(), before)  # nothing changed


def test_set_gates_accepts_tensors_and_bools_and_magnitude():
    m = DGConv2d(16, 16, 3)
    m.set_gates(torch.tensor([1, 0, 0, 1]), magnitude=0.25)
    assert m.gate_values().tolist() == [1, 0, 0, 1]
    assert m.gate_latent.tolist() == pytest.approx([0.25, -0.25, -0.25, 0.25])
    m.set_gates([True, True, False, True])
    assert m.gate_values().tolist() == [1, 1, 0, 1]
    assert m.learned_groups == 2


@pytest.mark.parametrize("cin,cout", [(16, 16), (24, 40), (8, 32)])
def test_set_groups_gives_contiguous_groups(cin, cout):
    m = DGConv2d(cin, cout, 3, padding=1)
    for g in [2**j for j in range(m.num_gates + 1)]:
        m.set_groups(g)
        assert m.learned_groups == g
        # same mask as nn.Conv2d(groups=g): block diagonal with contiguous blocks
        blocks = torch.block_diag(*[torch.ones(cout // g, cin // g)] * g)
        assert torch.equal(m.relationship_matrix(), blocks)


@pytest.mark.parametrize("bad", [0, 3, 6, 32, -2])
def test_set_groups_rejects_non_powers_of_two(bad):
    m = DGConv2d(16, 16, 3)  # at most 16 groups
    m.layer_name = "conv_x"
    with pytest.raises(ConfigError, match="conv_x"):
        m.set_groups(bad)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_relax_gates_gives_fractional_masks_and_blocks_export(temperature):
    m = DGConv2d(8, 8, 3, gate_init=0.5)
    m.set_gates([1, 0, 1], magnitude=0.5)
    m.relax_gates(temperature)
    assert not m.gates_are_binary()
    g = m.gate_values()
    assert torch.allclose(g, torch.sigmoid(m.gate_latent.detach() / temperature))
    u = m.relationship_matrix()
    assert torch.any((u > 0) & (u < 1))
    assert torch.allclose(u, soft_kron_mask(g))
    m.layer_name = "features.3"
    with pytest.raises(ExportError, match="features.3"):
        export_layer(m)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), m)
    with pytest.raises(ExportError, match="'1'"):
        export_model(net)
    m.harden_gates()
    assert m.gates_are_binary()
    assert m.learned_groups == 2
    export_layer(m)  # works again


def test_relax_gates_rejects_bad_temperature():
    m = DGConv2d(8, 8, 3)
    with pytest.raises(ConfigError):
        m.relax_gates(0.0)
    with pytest.raises(ConfigError):
        m.relax_gates(-1.0)


# ------------------------------------------------------------------------ 4. cost

COST_SHAPES = [(8, 8, 3), (16, 16, 1), (24, 40, 3), (48, 12, 5), (12, 36, (3, 1))]


@pytest.mark.parametrize("cin,cout,k", COST_SHAPES)
def test_expected_macs_equals_macs_for_binary_gates(cin, cout, k):
    m = DGConv2d(cin, cout, k)
    kh, kw = m.kernel_size
    for gates in all_patterns(m.num_gates):
        m.set_gates(gates)
        for out in [(1, 1), (7, 5), (14, 14)]:
            exact = m.macs(out)
            assert float(m.expected_macs(out).detach()) == exact
            assert exact == int(m.relationship_matrix().sum()) * kh * kw * out[0] * out[1]
            assert exact == cout * cin // m.learned_groups * kh * kw * out[0] * out[1]


@pytest.mark.parametrize("cin,cout,k", COST_SHAPES)
@pytest.mark.parametrize("relaxed", [False, True])
def test_expected_macs_gradient_is_sum_u_gradient(cin, cout, k, relaxed):
    """Eq. 9: the cost's gradient is that of sum(U) x taps x positions, for binary and soft gates."""
    m = DGConv2d(cin, cout, k, gate_init=0.3)
    kh, kw = m.kernel_size
    out = (6, 4)
    for seed in range(4):
        torch.manual_seed(seed)
        m.set_gates(torch.randint(0, 2, (m.num_gates,)), magnitude=0.3)
        if relaxed:
            m.relax_gates(1.0)
        m.zero_grad()
        m.expected_macs(out).backward()
        grad_cost = m.gate_latent.grad.clone()
        m.zero_grad()
        (m.relationship_matrix().sum() * kh * kw * out[0] * out[1]).backward()
        assert torch.allclose(grad_cost, m.gate_latent.grad, rtol=1e-5)
        m.harden_gates()


@pytest.mark.parametrize("gates", [[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0]])
def test_reference_power_form_has_same_value_but_other_gradient(gates):
    """The reference code's r_out r_in 2^(K + sum g) has the value of Eq. 9 but not its gradient."""
    m = DGConv2d(8, 8, 3)
    m.set_gates(gates)
    out = (5, 5)
    taps_pos = 9 * 25
    power = 2 ** (m.num_gates + m.gates().sum()) * m.r_out * m.r_in * taps_pos
    ours = m.expected_macs(out)
    assert float(power.detach()) == pytest.approx(float(ours.detach()))
    (g_power,) = torch.autograd.grad(power, m.gate_latent)
    (g_ours,) = torch.autograd.grad(ours, m.gate_latent)
    assert not torch.allclose(g_power, g_ours)
    # ours is d/dg prod(1+g): value / (1 + g_k); the power form gives value * ln 2 for every gate
    g = torch.tensor(gates, dtype=torch.float32)
    assert torch.allclose(g_ours, float(ours.detach()) / (1 + g))
    assert torch.allclose(g_power, torch.full((3,), float(ours.detach()) * math.log(2)))


@pytest.mark.parametrize("cin,cout,k,bias", [(8, 8, 3, True), (24, 40, 3, False), (48, 12, 1, True)])
def test_num_parameters_counts_kept_weights_and_bias(cin, cout, k, bias):
    m = DGConv2d(cin, cout, k, bias=bias)
    for gates in all_patterns(m.num_gates):
        m.set_gates(gates)
        kept = int((m.masked_weight() != 0).sum())
        assert m.num_parameters() == kept + (cout if bias else 0)
        assert m.num_parameters() == cout * cin // m.learned_groups * k * k + (cout if bias else 0)


# ------------------------------------------------------------------ 5. eval caching

def test_eval_cache_is_reused():
    m = DGConv2d(8, 8, 3, padding=1, bias=False).eval()
    m.set_gates([1, 0, 1])
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y1 = m(x)
        cache1 = m._eval_cache
        w1 = cache1[1]
        y2 = m(x)
        assert m.masked_weight() is w1
    assert m._eval_cache is cache1
    assert m._eval_cache[1] is w1
    assert torch.equal(y1, y2)


def test_train_mode_does_not_cache_and_train_clears_cache():
    m = DGConv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 4, 4)
    m(x)
    assert m._eval_cache is None
    m.eval()
    with torch.no_grad():
        m(x)
    assert m._eval_cache is not None
    m.train()
    assert m._eval_cache is None


def test_eval_cache_invalidated_by_in_place_weight_change():
    m = DGConv2d(8, 8, 3, padding=1, bias=False).eval()
    m.set_gates([0, 1, 1])
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = m(x)
        m.weight.mul_(2)
        y2 = m(x)
    assert torch.allclose(y2, 2 * y, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        m.weight.zero_()
        assert torch.all(m(x) == 0)


def test_eval_cache_invalidated_by_weight_data_assignment():
    m = DGConv2d(8, 8, 3, padding=1, bias=False).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = m(x)
        m.weight.data = m.weight.data * 3
        assert torch.allclose(m(x), 3 * y, rtol=1e-6, atol=1e-6)


def test_eval_cache_invalidated_by_set_gates_and_latent_edit():
    m = DGConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        m(x)
        m.set_gates([0, 0, 0])
        y = m(x)
        ref = F.conv2d(x, m.weight * kron_mask([0, 0, 0])[:, :, None, None], m.bias, 1, 1)
        assert close(y, ref)
        m.gate_latent.neg_()  # all gates on now
        assert close(m(x), F.conv2d(x, m.weight, m.bias, 1, 1))
        m.relax_gates(1.0)
        soft = soft_kron_mask(torch.sigmoid(m.gate_latent))
        assert close(m(x), F.conv2d(x, m.weight * soft[:, :, None, None], m.bias, 1, 1))


def test_eval_cache_invalidated_by_load_state_dict():
    a = DGConv2d(8, 16, 3, padding=1).eval()
    b = DGConv2d(8, 16, 3, padding=1).eval()
    b.set_gates([1, 0, 0])
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ya = a(x)
        a.load_state_dict(b.state_dict())
        assert close(a(x), b(x))
        assert not close(a(x), ya)


def test_eval_forward_without_no_grad_gives_gradients():
    m = DGConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        m(x)  # fills the cache with a tensor that has no graph
    y = m(x)
    assert y.requires_grad
    y.sum().backward()
    assert m.weight.grad is not None and m.gate_latent.grad is not None


def test_eval_mode_two_backward_passes():
    """nn.Conv2d allows forward+backward twice in eval mode (frozen BN fine-tuning, saliency)."""
    m = DGConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 6, 6)
    m(x).sum().backward()
    m(x).sum().backward()  # RuntimeError: Trying to backward through the graph a second time
    assert m.weight.grad is not None


def test_deepcopy_after_eval_forward_with_grad():
    m = DGConv2d(8, 8, 3, padding=1).eval()
    m(torch.randn(1, 8, 4, 4))
    c = copy.deepcopy(m)  # RuntimeError: Only Tensors created explicitly by the user ...
    assert isinstance(c, DGConv2d)


def test_deepcopy_after_no_grad_eval_forward():
    m = DGConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        y = m(x)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.weight.mul_(2)
        assert close(c(x) - c.bias[:, None, None], 2 * (y - m.bias[:, None, None]))
        assert torch.equal(m(x), y)


# -------------------------------------------------------------------- 6. bad input

@pytest.mark.parametrize("shape", [(8, 6, 6), (1, 2, 8, 6, 6), (8,)])
@pytest.mark.parametrize("named", [True, False])
def test_non_4d_input_raises(shape, named):
    m = DGConv2d(8, 16, 3)
    if named:
        m.layer_name = "blocks.0.conv"
    with pytest.raises(ConfigError) as info:
        m(torch.randn(*shape))
    msg = str(info.value)
    assert "4-D" in msg and str(tuple(shape)) in msg
    assert ("blocks.0.conv" in msg) == named
    assert isinstance(info.value, ValueError) and isinstance(info.value, NasGroupingError)


@pytest.mark.parametrize("channels", [3, 4, 16])
def test_wrong_channel_count_names_layer_and_expected_count(channels):
    m = DGConv2d(8, 16, 3)
    m.layer_name = "layer3.1.conv2"
    with pytest.raises(ConfigError) as info:
        m(torch.randn(2, channels, 6, 6))
    msg = str(info.value)
    assert "layer3.1.conv2" in msg
    assert "expected 8 input channels" in msg
    assert f"got {channels}" in msg


@pytest.mark.parametrize("cin,cout", [(3, 16), (16, 3), (5, 7), (1, 1), (0, 8), (8, 0)])
def test_no_shared_power_of_two_raises(cin, cout):
    with pytest.raises(ConfigError, match="no grouping can be learned"):
        DGConv2d(cin, cout, 3)
    with pytest.raises(ValueError):
        DGConv2d(cin, cout, 3)


@pytest.mark.parametrize("cin,cout,groups", [(8, 8, 3), (8, 8, 16), (24, 40, 16), (8, 8, 0), (8, 8, -2), (12, 36, 6)])
def test_bad_initial_groups_raise(cin, cout, groups):
    with pytest.raises(ConfigError, match="power of two"):
        DGConv2d(cin, cout, 3, groups=groups)


@pytest.mark.parametrize("cin,cout,groups", [(8, 8, 8), (24, 40, 8), (12, 36, 4), (16, 16, 2)])
def test_initial_groups(cin, cout, groups):
    m = DGConv2d(cin, cout, 3, groups=groups)
    assert m.learned_groups == groups
    assert m.groups == 1
    ref = nn.Conv2d(cin, cout, 3, groups=groups)
    assert torch.equal(m.relationship_matrix() != 0,
                       torch.block_diag(*[torch.ones(cout // groups, cin // groups)] * groups) != 0)
    assert m.connections() * 9 == ref.weight.numel()


@pytest.mark.parametrize("gate_init", [0.0, -0.1, -1.0])
def test_non_positive_gate_init_raises(gate_init):
    with pytest.raises(ConfigError, match="gate_init"):
        DGConv2d(8, 8, 3, gate_init=gate_init)


def test_gate_init_sets_latent_magnitude():
    m = DGConv2d(16, 16, 3, groups=4, gate_init=0.7)
    assert m.gate_latent.tolist() == pytest.approx([-0.7, -0.7, 0.7, 0.7])


def test_extra_repr_mentions_state():
    m = DGConv2d(8, 8, 3)
    m.set_gates([0, 1, 0])
    assert "learned_groups=4" in repr(m)
    m.relax_gates()
    assert "relaxed" in repr(m)
