"""Devices, mixed precision and torch.compile: the operator stays exact and the loop stays the same."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas_grouping import ConfigError, DGConv2d, export_model
from nas_grouping.config import SearchConfig
from nas_grouping.data import DataConfig
from nas_grouping.runtime import resolve_device, setup_runtime
from nas_grouping.search.loop import search


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), DGConv2d(16, 32, 3, padding=1), nn.ReLU(),
                         DGConv2d(32, 32, 3, padding=1, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def test_device_flag_is_validated():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="precision"):
        setup_runtime("cpu", "8")
    with pytest.raises(ConfigError, match="needs a GPU"):
        setup_runtime("cpu", "16")


def test_mask_and_cost_stay_exact_under_bf16_autocast():
    net = _net()
    layer = net[2]
    layer.set_gates([1, 0, 1, 0])
    x = torch.randn(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = layer.relationship_matrix()
        cost = layer.expected_macs((8, 8))
        y = net(x)
    assert u.dtype == torch.float32 and set(u.unique().tolist()) == {0.0, 1.0}
    assert float(cost.detach()) == layer.macs((8, 8))
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), net(x), atol=5e-2, rtol=5e-2)


def test_bf16_search_exports_the_same_float32_kind_of_model(tmp_path):
    cfg = SearchConfig(space="digits_convnet", space_kwargs={"widths": [8, 8, 16, 16, 16, 16]}, epochs=2,
                       warmup_epochs=1, finetune_epochs=0, precision="bf16", progress=False, out=str(tmp_path / "r"),
                       data=DataConfig(batch_size=128))
    result = search(cfg)
    assert result.summary["budget_met"]
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    eager = _net()
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for model in (eager, compiled):
        F.cross_entropy(model(x), y).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_src.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    assert eager[2].gate_latent.grad.abs().sum() > 0
    # the compiled model exports to the same real group convs
    with torch.no_grad():
        for layer in (eager[2], compiled_src[2]):
            layer.set_gates([0, 1, 1, 0])
    a, b = export_model(eager).eval(), export_model(compiled_src).eval()
    with torch.no_grad():
        assert torch.allclose(a(x), b(x))


def test_no_graph_break_in_the_operator():
    explain = torch._dynamo.explain(_net())(torch.randn(2, 1, 8, 8))
    assert explain.graph_break_count == 0


def test_on_main_returns_rank_0s_result_and_raises_its_error():
    from nas_grouping.errors import BudgetError

    rt = setup_runtime("cpu", "32", False)
    assert rt.on_main(lambda: {"share": 0.5}, "a measurement") == {"share": 0.5}

    def fails():
        raise BudgetError("cannot be met")

    with pytest.raises(BudgetError, match="cannot be met"):  # rank 0 keeps the error itself
        rt.on_main(fails, "a measurement")
