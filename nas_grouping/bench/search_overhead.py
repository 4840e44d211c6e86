"""Search overhead: wall time of one search epoch relative to one dense epoch of the same network.

Both epochs run through the same ``train_epoch`` on the same data and batches,
interleaved, so the ratio is fair on a noisy machine. Goal: at most 1.2x.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import TensorDataset

from nas_grouping.budget import AdditiveRegularizer, ModelCost
from nas_grouping.convert import arch_parameters, weight_parameters
from nas_grouping.data import DataConfig, load_datasets
from nas_grouping.errors import ConfigError
from nas_grouping.latency.timer import machine_info
from nas_grouping.runtime import setup_runtime
from nas_grouping.training import epoch_loader, seed_everything, train_epoch

__all__ = ["bench_search_overhead"]


def _synthetic(input_size: tuple[int, int, int], n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *input_size, generator=g), torch.randint(0, 10, (n,), generator=g))


def bench_search_overhead(*, space: str = "resnet20", data: str = "digits", rounds: int = 3, batch_size: int = 64,
                          channels_last: bool = False, seed: int = 0) -> dict:
    """Median epoch times of dense training and of the search phase (gates + regularizer).

    ``data``: "digits" (the bundled 8x8 images) or "cifar-shape" (512 random 3x32x32
    samples: timing only, no download needed).
    """
    from search_spaces import get_space

    rt = setup_runtime("cpu", "32", channels_last)
    if data == "digits":
        train, size = load_datasets(DataConfig(batch_size=batch_size)).train, (1, 8, 8)
    elif data == "cifar-shape":
        train, size = _synthetic((3, 32, 32), 512, seed), (3, 32, 32)
    else:
        raise ConfigError(f"data must be digits or cifar-shape, got {data!r}")
    seed_everything(seed)
    dense = rt.prepare(get_space(space, num_classes=10, in_channels=size[0], dense=True))
    searched = rt.prepare(get_space(space, num_classes=10, in_channels=size[0]))
    cost = ModelCost(searched, size)
    budget = cost.dense_macs // 2
    reg = AdditiveRegularizer(2.0)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)
    opt_w = torch.optim.SGD(weight_parameters(searched), lr=0.01, momentum=0.9)
    opt_g = torch.optim.Adam(arch_parameters(searched), lr=1e-3)
    times: dict[str, list[float]] = {"dense": [], "search": []}
    for r in range(rounds + 1):
        for name in ("dense", "search"):
            loader = epoch_loader(train, rt, batch_size=batch_size, train=True, seed=seed, epoch=r)
            start = time.perf_counter()
            if name == "dense":
                train_epoch(dense, loader, rt, weight_optimizer=opt_d)
            else:
                train_epoch(searched, loader, rt, weight_optimizer=opt_w, gate_optimizer=opt_g,
                            loss_hook=lambda task: reg(task, cost.expected_macs(), budget))
            if r > 0:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"space": space, "data": data, "batch_size": batch_size, "channels_last": channels_last,
            "dense_epoch_s": med["dense"], "search_epoch_s": med["search"],
            "overhead": med["search"] / med["dense"], "rounds": rounds, **machine_info()}
