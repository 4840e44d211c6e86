"""Benchmark of the DGConv2d operator, side by side in one run.

Training step (forward + backward + SGD step) of DGConv2d relative to nn.Conv2d
of the same shape, and inference latency of the exported layer at each group
count relative to the dense conv in its fastest memory layout, next to the MAC
ratio. Goal from the design: a training step at most 1.10x dense; exported
latency falling with G.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nas_grouping.export.model import export_layer
from nas_grouping.latency.timer import machine_info, median_ms
from nas_grouping.ops.dgconv import DGConv2d

__all__ = ["bench_dgconv", "format_rows"]

#: (channels, spatial size) of ResNet-like 3x3 layers
DEFAULT_SHAPES = ((64, 56), (256, 14))


def _train_step(module: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer):
    def step():
        opt.zero_grad(set_to_none=True)
        module(x).square().mean().backward()
        opt.step()
    return step


def bench_dgconv(*, shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES, batch: int = 32,
                 groups: Sequence[int] = (1, 2, 4, 8, 16), repeats: int = 10, warmup: int = 3,
                 seed: int = 0) -> list[dict]:
    """Rows of measurements (one per shape and group count); ratios are dense time / other time."""
    torch.manual_seed(seed)
    rows = []
    for channels, size in shapes:
        x = torch.randn(batch, channels, size, size)
        dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        dg = DGConv2d.from_conv(dense)
        opt_d = torch.optim.SGD(dense.parameters(), lr=1e-3)
        opt_g = torch.optim.SGD(dg.parameters(), lr=1e-3)
        train = median_ms({"dense": _train_step(dense, x, opt_d), "dgconv": _train_step(dg, x, opt_g)},
                          warmup=warmup, repeats=repeats)
        dense_cl = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            base = median_ms({"nchw": lambda: dense(x), "cl": lambda: dense_cl(x_cl)}, warmup=warmup, repeats=repeats)
        best_dense = min(base.values())
        for g in groups:
            if g > dg.max_groups:
                continue
            k = g.bit_length() - 1
            dg.set_gates([1] * (dg.num_gates - k) + [0] * k)  # off gates on the low bits: needs permutations
            permuted = export_layer(dg).eval()
            permuted_cl = export_layer(dg).eval().to(memory_format=torch.channels_last)
            contiguous = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=g).eval()
            contiguous_cl = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=g).to(
                memory_format=torch.channels_last).eval()
            with torch.inference_mode():
                t = median_ms({"permuted": lambda: permuted(x), "permuted_cl": lambda: permuted_cl(x_cl),
                               "grouped": lambda: contiguous(x),
                               "grouped_cl": lambda: contiguous_cl(x_cl)}, warmup=warmup, repeats=repeats)
            rows.append({
                "layer": f"{channels}->{channels} 3x3 @{size}x{size}", "batch": batch, "groups": g,
                "train_ms_dense": train["dense"], "train_ms_dgconv": train["dgconv"],
                "train_ratio": train["dgconv"] / train["dense"],
                "dense_ms_best": best_dense, "dense_layout": min(base, key=base.get),
                "exported_ms": min(t["permuted"], t["permuted_cl"]),
                "exported_layout": "cl" if t["permuted_cl"] < t["permuted"] else "nchw",
                "grouped_ms": t["grouped"], "grouped_cl_ms": t["grouped_cl"],
                "speedup_exported": best_dense / min(t["permuted"], t["permuted_cl"]),
                "speedup_grouped_best": best_dense / min(t["grouped"], t["grouped_cl"]),
                "mac_reduction": float(g),
            })
    for r in rows:
        r.update(machine_info())
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    head = (f"{'layer':24s} {'G':>3s} {'train dg/dense':>14s} {'dense best ms':>13s} {'exported ms':>11s} "
            f"{'speed-up':>8s} {'no-permutation':>14s} {'MAC red.':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layer']:24s} {r['groups']:3d} {r['train_ratio']:13.2f}x {r['dense_ms_best']:10.2f} "
                     f"{r['dense_layout']:>2s} {r['exported_ms']:8.2f} {r['exported_layout']:>4s} {r['speedup_exported']:5.2f}x "
                     f"{r['speedup_grouped_best']:13.2f}x {r['mac_reduction']:7.0f}x")
    if rows:
        lines.append(f"batch {rows[0]['batch']}, torch {rows[0]['torch']}, {rows[0]['threads']} threads, "
                     "medians of interleaved repetitions; speed-up = dense in its fastest layout / exported layer in its\n"
                     "fastest layout (gates off on the low bits, so both channel permutations run); no-permutation =\n"
                     "the same groups with contiguous channels (an upper bound for the exported layer)")
    return "\n".join(lines)
