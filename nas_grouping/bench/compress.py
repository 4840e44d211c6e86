"""Benchmark of the self-grouping pass: CPU speed-up next to MAC reduction, and digits accuracy at half the MACs.

Latency (:func:`bench_latency`): a dense network is compressed in one shot at each pruned
fraction, in several variants; every model is timed side by side in one run (they take
turns within every repetition), each in its faster memory layout (NCHW or channels-last),
under ``torch.inference_mode``, median of ``repeats``. Beside the variants, ``masked`` is
the reference code's way: the dense network computing ``conv(x, W * M)`` with the mask
multiplied in every call. The goal: a speed-up of at least half the MAC reduction.

Accuracy (:func:`bench_accuracy`): a dense digits network is trained with ``nas-grouping
train``, then compressed with ``nas-grouping compress --budget 0.5``; the summary reports
the accuracy of both. The same two commands are printed, to repeat by hand.

Run ``nas-grouping bench compress`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas_grouping.errors import ConfigError
from nas_grouping.latency.timer import machine_info
from nas_grouping.macs import count_macs
from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear

__all__ = ["VARIANTS", "bench_latency", "bench_accuracy", "format_latency", "masked_reference",
           "pin_fastest_forms"]

#: name -> SelfGroupingConfig settings of the compared variants
VARIANTS: dict[str, dict[str, Any]] = {
    "paper-16": {"clusters": "upto:16", "cluster_sizes": "free", "threshold": "layer"},
    "paper-4": {"clusters": 4, "cluster_sizes": "free", "threshold": "layer"},
    "equal-4": {"clusters": 4, "cluster_sizes": "equal", "threshold": "cluster"},
    "equal-2": {"clusters": 2, "cluster_sizes": "equal", "threshold": "cluster"},
}


class _Masked(nn.Module):
    """The reference code's layer: a dense weight times a 0/1 mask, multiplied in every call."""

    def __init__(self, layer: nn.Module, mask: Tensor) -> None:
        super().__init__()
        self.layer = layer
        shape = mask.shape + (1,) * (layer.weight.dim() - 2)
        self.register_buffer("mask", mask.to(layer.weight.dtype).reshape(shape))

    def forward(self, x: Tensor) -> Tensor:
        w = self.layer.weight * self.mask
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        c = self.layer
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)


def masked_reference(dense: nn.Module, compressed: nn.Module) -> nn.Module:
    """``dense`` with each layer that ``compressed`` pruned computing ``op(x, W * M)`` per call."""
    out = copy.deepcopy(dense)
    for name, layer in compressed.named_modules():
        if isinstance(layer, (DiverseGroupConv2d, DiverseGroupLinear)):
            parent, _, child = name.rpartition(".")
            holder = out.get_submodule(parent) if parent else out
            setattr(holder, child, _Masked(getattr(holder, child), layer.mask()))
    return out


def _network(network: str, width: int, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    from search_spaces import default_input_size, get_space

    torch.manual_seed(seed)
    if network.startswith("torchvision:"):
        return get_space("torchvision", name=network.split(":", 1)[1], dense=True).eval(), (3, 112, 112)
    kwargs = {"width": width} if network in ("resnet20", "resnet56") else {}
    return get_space(network, dense=True, **kwargs).eval(), default_input_size(network)


def bench_latency(*, network: str = "resnet20", width: int = 4, fractions: Sequence[float] = (0.5, 0.75),
                  batch_sizes: Sequence[int] = (1, 32), variants: Sequence[str] | None = None, repeats: int = 10,
                  warmup: int = 3, kmeans_restarts: int = 3, seed: int = 0, threads: int | None = None,
                  pinned: Sequence[str] = ("equal-2",)) -> list[dict[str, Any]]:
    """Latency of dense vs compressed vs masked models, one row per (fraction, batch, model).

    ``pinned`` variants are also timed as ``NAME+forms``: each layer's form pinned to the one
    measured fastest at that batch (:func:`pin_fastest_forms`) instead of the layers' ``auto``
    rule. ``threads`` sets torch's intra-op threads for the measurement (restored after). On a
    machine shared with other work one thread gives repeatable ratios: a parallel region
    waits for its slowest thread, so a preempted thread stalls every kernel.

    Rows: ``network``, ``input_size``, ``fraction``, ``batch``, ``model`` (``dense``, ``masked``
    or a variant), ``macs``, ``mac_reduction`` (dense / model MACs), ``ms`` (median, faster
    layout), ``layout``, ``nchw_ms``, ``channels_last_ms``, ``speedup`` (dense ms / ms),
    ``goal_met`` (speed-up >= mac_reduction / 2), ``threads``, ``load_avg``.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench_latency(network, width, fractions, batch_sizes, variants, pinned, repeats, warmup,
                              kmeans_restarts, seed)
    finally:
        torch.set_num_threads(before)


def pin_fastest_forms(model: nn.Module, input_size: Sequence[int], batch: int, *, repeats: int = 10,
                      warmup: int = 2) -> dict[str, str]:
    """Time every exact form of each exported layer on its own input at ``batch``; pin the fastest
    (``latency.choose_fastest_forms``, in place). Returns {layer: form}."""
    from nas_grouping.latency.measure import choose_fastest_forms

    _, report = choose_fastest_forms(model, input_size, batch=batch, repeats=repeats, warmup=warmup, inplace=True)
    return {name: row["form"] for name, row in report["layers"].items()}


def _bench_latency(network: str, width: int, fractions: Sequence[float], batch_sizes: Sequence[int],
                   variants: Sequence[str] | None, pinned: Sequence[str], repeats: int, warmup: int,
                   kmeans_restarts: int, seed: int) -> list[dict[str, Any]]:
    from nas_grouping.pipeline.compress import measure_latency
    from nas_grouping.self_grouping.grouping import SelfGrouping

    dense, size = _network(network, width, seed)
    dense_macs = count_macs(dense, size)
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = sorted(set(names) - set(VARIANTS)) + sorted(set(pinned) - set(names))
    if unknown:
        raise ConfigError(f"unknown benchmark variant(s) {unknown}; known: {', '.join(VARIANTS)} (pinned ones "
                          "must be among the variants)")
    label = network + (f"(width={width})" if network in ("resnet20", "resnet56") else "")
    rows = []
    for fraction in fractions:
        built: dict[str, nn.Module] = {"dense": dense}
        for name in names:
            sg = SelfGrouping(fraction=fraction, kmeans_restarts=kmeans_restarts, seed=seed, **VARIANTS[name])
            built[name] = sg.apply(dense, size)
        built["masked"] = masked_reference(dense, built[names[0]])
        macs = {name: count_macs(m, size) for name, m in built.items()}
        macs["masked"] = macs[names[0]]  # what the reference code claims; it still runs every dense MAC
        for batch in batch_sizes:
            models = dict(built)
            for name in pinned:
                models[f"{name}+forms"] = copy.deepcopy(built[name])
                pin_fastest_forms(models[f"{name}+forms"], size, batch, repeats=max(3, repeats // 2))
                macs[f"{name}+forms"] = macs[name]
            timed = measure_latency(models, size, [batch], repeats=repeats, warmup=warmup)
            base = next(t for t in timed if t["model"] == "dense")
            for r in timed:
                reduction = dense_macs / macs[r["model"]]
                rows.append({"network": label, "input_size": "x".join(map(str, size)), "fraction": fraction, **r,
                             "macs": macs[r["model"]], "mac_reduction": reduction, "speedup": base["ms"] / r["ms"],
                             "min_speedup": base["min_ms"] / r["min_ms"],
                             "goal_met": None if r["model"] in ("dense", "masked") else
                             base["ms"] / r["ms"] >= reduction / 2, "threads": torch.get_num_threads(),
                             "load_avg": os.getloadavg()[0]})
    return rows


def format_latency(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`bench_latency` rows."""
    header = ["network", "pruned", "batch", "model", "MACs x fewer", "ms (layout)", "speed-up", "(by min)",
              ">= half"]
    lines = [[r["network"] + "@" + r["input_size"], f"{r['fraction']:.2f}", str(r["batch"]), r["model"],
              f"{r['mac_reduction']:.2f}x", f"{r['ms']:.2f} ({'cl' if r['layout'] == 'channels_last' else 'nchw'})",
              f"{r['speedup']:.2f}x", f"{r['min_speedup']:.2f}x",
              "-" if r["goal_met"] is None else ("yes" if r["goal_met"] else "no")]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*line) for line in lines)]
    if rows:
        out.append(f"threads={rows[0]['threads']}, load average {min(r['load_avg'] for r in rows):.1f}-"
                   f"{max(r['load_avg'] for r in rows):.1f}; speed-up = dense / model median ms of interleaved "
                   "calls ('by min': fastest calls); each model in its faster layout (cl = channels-last); "
                   "masked = dense weights times masks in every call (the reference code)")
    return "\n".join(out)


def _flags(settings: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())


def bench_accuracy(*, epochs: int = 15, finetune_epochs: int = 5, budget: float = 0.5,
                   variants: Sequence[str] = ("paper-16", "equal-2"), widths: Sequence[int] | None = None,
                   seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Dense digits network vs the same network self-grouped to ``budget`` of its MACs and fine-tuned.

    Trains once, compresses once per variant. Returns the commands it ran (``commands``), the
    dense run's accuracy and MACs, and per variant the compress summary's accuracies (before,
    after pruning, after fine-tuning), MACs and whether the budget was met.
    """
    from nas_grouping.report import read_json

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"unknown benchmark variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="nas-grouping-bench-"))
    kwargs = "" if widths is None else f" --space-kwargs '{{\"widths\": {list(widths)}}}'"
    commands = [f"nas-grouping train --space digits_convnet{kwargs} --epochs {epochs} --finetune-epochs 0 "
                f"--seed {seed} --progress false --out {folder / 'dense'}"]
    for name in variants:
        commands.append(f"nas-grouping compress --model {folder / 'dense'} --budget {budget} "
                        f"{_flags(VARIANTS[name])} --epochs {finetune_epochs} --seed {seed} --latency-batches 1,32 "
                        f"--progress false --out {folder / name}")
    start = time.perf_counter()
    for command in commands:
        # the command as a user runs it, in its own process (the benchmark sits beside the CLI, not under it)
        rc = subprocess.run([sys.executable, "-m", "nas_grouping.cli", *shlex.split(command)[1:]],
                            stdout=subprocess.DEVNULL).returncode
        if rc != 0:
            raise RuntimeError(f"`{command}` failed with exit status {rc}")
    dense = read_json(folder / "dense" / "summary.json")
    result: dict[str, Any] = {"commands": commands, "dense_val_acc": dense["val_acc"], "dense_macs": dense["macs"],
                              "variants": {}}
    for name in variants:
        s = read_json(folder / name / "summary.json")
        result["variants"][name] = {k: s[k] for k in ("val_acc_before", "val_acc_pruned", "val_acc_after",
                                                      "macs_after", "macs_fraction", "budget_met", "speedup")}
    result.update(wall_time_s=time.perf_counter() - start, **machine_info())
    return result
