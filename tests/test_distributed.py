"""The search under torchrun (DDP, gloo on the CPU), and DDP's gradient equivalence for gates and weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nas_grouping import DGConv2d
from nas_grouping.budget import AdditiveRegularizer, ModelCost

ROOT = Path(__file__).resolve().parents[1]
SMALL = '{"widths": [8, 8, 16, 16, 16, 16]}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), DGConv2d(8, 16, 3, padding=1), nn.ReLU(),
                         DGConv2d(16, 16, 3, padding=1, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _loss(model: nn.Module, cost: ModelCost, x, y) -> torch.Tensor:
    return AdditiveRegularizer(1.0)(F.cross_entropy(model(x), y), cost.expected_macs(), cost.dense_macs // 3)


def _rank_grads(rank: int, world: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _tiny()
    cost = ModelCost(model, (1, 8, 8))
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _data()
    half = x.shape[0] // world
    _loss(ddp, cost, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
    torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_on_half_batches_give_the_whole_batch_gradient(tmp_path):
    model = _tiny()
    cost = ModelCost(model, (1, 8, 8))
    x, y = _data()
    _loss(model, cost, x, y).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    assert all(expected[n].abs().sum() > 0 for n, _ in model.named_parameters() if n.endswith("gate_latent"))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_grads, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    results = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)}
    for rank, grads in results.items():
        for name, g in grads.items():
            assert torch.allclose(g, expected[name], atol=1e-6, rtol=1e-4), (rank, name)


def _torchrun_search(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`nas-grouping search` on the small digits net under torchrun with 2 CPU processes; checks it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "nas_grouping.cli", "search", "--device", "cpu",
           "--space", "digits_convnet", "--space-kwargs", SMALL, "--warmup-epochs", "1", "--finetune-epochs", "1",
           "--progress", "false", "--batch-size", "64", "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_search_two_processes_writes_once_and_ranks_agree(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun_search(out, "--epochs", "3")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree_on_groups"] and summary["budget_met"]
    assert proc.stdout.count("validation accuracy") == 1  # only rank 0 reports
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "checkpoint.pt", "config.json", "history.csv", "latency_layers.csv", "latency_layers.json",
        "latency_layers.png", "layers.csv", "model", "run.json", "search.png", "summary.json"]
    # resume the 2-process run in one process, with a longer fine-tuning phase refused (other settings)
    from nas_grouping.config import SearchConfig
    from nas_grouping.errors import ConfigError
    from nas_grouping.search.loop import load_search_config, search

    cfg = load_search_config(out)
    assert isinstance(cfg, SearchConfig)
    with pytest.raises(ConfigError, match="already holds a run"):
        search(cfg)


@pytest.mark.slow
def test_torchrun_search_with_a_measured_latency_budget(tmp_path):
    """Rank 0 profiles and measures; the others get the numbers by broadcast and make the same gate choices."""
    out = tmp_path / "run"
    _torchrun_search(out, "--epochs", "2", "--budget", "0.8", "--latency-budget", "0.9", "--latency-measured", "true",
                     "--measure-latency", "false")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree_on_groups"] and summary["budget_met"]
    loop = summary["latency_measured_loop"]
    assert loop["tries"] and loop["met"] == (loop["measured_ms"] <= loop["budget_ms"])
