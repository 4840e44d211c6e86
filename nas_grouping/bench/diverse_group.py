"""Latency of the diverse group convolution's forms against dense, on this machine.

For ResNet-like 3x3 layers, at each pruned fraction the filters are clustered at random
into ``clusters`` groups (uneven sizes, as k-means gives) and every group keeps a random
(1 - fraction) share of the input channels. Measured side by side in one run (the forms
take turns within every repetition, so drift of a shared machine hits all alike), under
``torch.inference_mode``, after warm-up; the median is reported:

- ``dense``: ``nn.Conv2d`` in the faster of NCHW and channels-last (both are recorded);
- ``masked``: the reference code's way, ``conv2d(x, W * M)`` with the mask multiplied in
  every call;
- ``grouped`` / ``per_group`` / ``dense_form``: :class:`DiverseGroupConv2d` in each form
  (the layer's dense form keeps W * M cached, so it is the masked dense conv without the
  multiply);
- ``default``: ``DiverseGroupConv2d`` with its default ``form="auto"`` (timed as such),
  and the form it picked for that call.

``mac_ratio`` is dense MACs / kept MACs (the ideal speed-up), ``grouped_mac_ratio``
dense MACs / what the padded grouped conv really executes.

Run ``python -m nas_grouping.bench.diverse_group`` to print the table.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nas_grouping.errors import ConfigError
from nas_grouping.latency.timer import sample_ms
from nas_grouping.ops.diverse_group import FORMS, DiverseGroupConv2d

__all__ = ["DEFAULT_SHAPES", "bench_diverse_group", "format_table", "random_groups"]

#: (in_channels, out_channels, spatial size) of the default 3x3 layers.
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((64, 64, 32), (128, 128, 28), (256, 256, 14))


def random_groups(
    in_channels: int, out_channels: int, clusters: int, fraction: float, generator: torch.Generator
) -> list[tuple[list[int], list[int]]]:
    """A random SG-CNN-like grouping: filters clustered at random (uneven, non-empty groups),
    each group reading a random ``1 - fraction`` share of the input channels (at least one)."""
    if not 1 <= clusters <= out_channels:
        raise ConfigError(f"clusters must be between 1 and out_channels={out_channels}, got {clusters}")
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"fraction (pruned share of connections) must be in [0, 1), got {fraction}")
    labels = torch.randint(clusters, (out_channels,), generator=generator)
    labels[torch.randperm(out_channels, generator=generator)[:clusters]] = torch.arange(clusters)
    keep = max(1, round((1.0 - fraction) * in_channels))
    groups = []
    for g in range(clusters):
        filters = (labels == g).nonzero().flatten().tolist()
        inputs = torch.randperm(in_channels, generator=generator)[:keep].sort().values.tolist()
        groups.append((filters, inputs))
    return groups


def _time_ms(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) latency in ms of each function, measured side by side."""
    return {k: (statistics.median(v), min(v)) for k, v in sample_ms(fns, warmup=warmup, repeats=repeats).items()}

def bench_diverse_group(
    *,
    shapes: Sequence[tuple[int, int, int]] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    fractions: Sequence[float] = (0.5, 0.75),
    clusters: int = 4,
    repeats: int = 15,
    warmup: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Measure dense, masked dense and every diverse-group form; one row per configuration.

    Args:
        shapes: (in_channels, out_channels, H=W) of 3x3, stride-1, padding-1 layers;
            default :data:`DEFAULT_SHAPES` (about a minute on 2 cores).
        batch_sizes, fractions: batch sizes and pruned shares of connections to try.
        clusters: number of filter groups.
        repeats, warmup: timed and untimed calls per form.

    Returns:
        Dicts with the configuration, ``threads`` (``torch.get_num_threads()``), latencies
        in ms (``dense_nchw_ms``, ``dense_cl_ms``, ``dense_ms`` = the faster, ``dense_layout``,
        ``masked_ms``, ``grouped_ms``, ``per_group_ms``, ``dense_form_ms``, ``default_ms`` = the
        layer with ``form="auto"``), ``default_form`` (what "auto" ran), ``mac_ratio``,
        ``grouped_mac_ratio``, ``max_abs_error`` (default layer vs the masked dense conv),
        ``speedup`` (dense_ms / default_ms), ``min_ms`` (the fastest call of each, a
        cross-check when the machine is busy) and ``load_avg`` (1-minute load average after
        the measurement: other work on the machine).
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with torch.inference_mode():
        for c_in, c_out, size in shapes:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            conv_cl = nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
            conv_cl.load_state_dict(conv.state_dict())
            for fraction in fractions:
                groups = random_groups(c_in, c_out, clusters, fraction, gen)
                mask = torch.zeros(c_out, c_in, dtype=torch.bool)
                for f, s in groups:
                    mask[torch.tensor(f)[:, None], torch.tensor(s)[None, :]] = True
                layers = {form: DiverseGroupConv2d.from_masked(conv, mask, [f for f, _ in groups], form=form)
                          for form in FORMS}
                auto = DiverseGroupConv2d.from_masked(conv, mask, [f for f, _ in groups])
                mask4 = mask[:, :, None, None].to(conv.weight.dtype)
                for batch in batch_sizes:
                    x = torch.randn(batch, c_in, size, size, generator=gen)
                    x_cl = x.contiguous(memory_format=torch.channels_last)
                    fns = {
                        "dense_nchw": lambda: conv(x),
                        "dense_cl": lambda: conv_cl(x_cl),
                        "masked": lambda: F.conv2d(x, conv.weight * mask4, conv.bias, 1, 1),
                        **{form: (lambda m=m: m(x)) for form, m in layers.items()},
                        "auto": lambda: auto(x),
                    }
                    timed = _time_ms(fns, warmup, repeats)
                    ms = {k: med for k, (med, _) in timed.items()}
                    reference = F.conv2d(x, conv.weight * mask4, conv.bias, 1, 1)
                    err = float((auto(x) - reference).abs().max())
                    dense_ms = min(ms["dense_nchw"], ms["dense_cl"])
                    default_form = auto.resolve_form((size, size), batch)
                    default_ms = ms["auto"]
                    rows.append({
                        "in_channels": c_in, "out_channels": c_out, "size": size, "batch": batch,
                        "fraction": fraction, "clusters": clusters, "threads": torch.get_num_threads(),
                        "group_sizes": [len(f) for f, _ in groups],
                        "dense_nchw_ms": ms["dense_nchw"], "dense_cl_ms": ms["dense_cl"], "dense_ms": dense_ms,
                        "dense_layout": "nchw" if ms["dense_nchw"] <= ms["dense_cl"] else "channels_last",
                        "masked_ms": ms["masked"], "grouped_ms": ms["grouped"], "per_group_ms": ms["per_group"],
                        "dense_form_ms": ms["dense"], "default_form": default_form, "default_ms": default_ms,
                        "mac_ratio": (c_in * c_out) / auto.kept_connections(),
                        "grouped_mac_ratio": (c_in * c_out) / auto.executed_connections("grouped"),
                        "max_abs_error": err, "speedup": dense_ms / default_ms,
                        "load_avg": os.getloadavg()[0],
                        "min_ms": {("dense_form" if k == "dense" else k): round(best, 4)
                                   for k, (_, best) in timed.items()},
                    })
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of :func:`bench_diverse_group` rows (latencies in ms)."""
    header = ["layer", "batch", "pruned", "MACx", "grpMACx", "dense(layout)", "masked", "grouped",
              "per_group", "dense_form", "default(form)", "speedup"]
    lines = []
    for r in rows:
        layout = "nchw" if r["dense_layout"] == "nchw" else "cl"
        lines.append([
            f"{r['in_channels']}->{r['out_channels']}@{r['size']}", str(r["batch"]), f"{r['fraction']:.2f}",
            f"{r['mac_ratio']:.2f}", f"{r['grouped_mac_ratio']:.2f}", f"{r['dense_ms']:.3f}({layout})",
            f"{r['masked_ms']:.3f}", f"{r['grouped_ms']:.3f}", f"{r['per_group_ms']:.3f}",
            f"{r['dense_form_ms']:.3f}", f"{r['default_ms']:.3f}({r['default_form']})", f"{r['speedup']:.2f}x",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    if not rows:
        return "\n".join(out)
    threads = sorted({r["threads"] for r in rows})
    out.append(f"threads={threads}, clusters={sorted({r['clusters'] for r in rows})}; latencies are medians in ms; "
               "MACx = dense/kept MACs, grpMACx = dense/executed by the padded grouped conv; "
               "speedup = best dense / default; "
               f"load average {min(r['load_avg'] for r in rows):.1f}-{max(r['load_avg'] for r in rows):.1f}")
    return "\n".join(out)


if __name__ == "__main__":
    start = time.perf_counter()
    table = format_table(bench_diverse_group())
    print(table)
    print(f"torch {torch.__version__}, {time.perf_counter() - start:.1f} s")
