"""Speed at equal budgets: our MAC-budget export, our latency-budget export and Torch-Pruning's channel
pruning, against the dense model in its fastest memory layout, measured side by side in one run.

For each network (a CIFAR ResNet-56 at 32x32, a ResNet-50 at 224x224; random weights: this
is about latency), each MAC budget (a share of the dense MACs) and each batch size:

- ``ours-macs``: the DGConv network's gates projected to the MAC budget
  (``search.project_to_budget`` from all gates on, as the search ends), exported, and
  every exported layer given its fastest exact form and the model its faster layout on
  this machine at that batch (``latency.choose_fastest_forms``);
- ``ours-latency``: the same with a latency budget beside the MAC budget: the same share
  of the dense model's measured latency as of the MACs (1/2 of the MACs, 1/2 of the
  time). A table profiled at that batch (``latency.profile_layers``) steers the
  projection and whole-model measurements correct its target
  (``search.project_to_measured_latency``); when no try meets it, the fastest is kept
  and the row says so;
- ``ours-hybrid``: channel pruning, and grouping where that is not enough, at the same
  latency and MAC budgets. The dense network is channel-pruned
  (``channel_pruning.ChannelPruning``: L1 magnitude, coupled channels together, widths
  multiples of 8) at the least ratio whose measured latency meets the budget within
  the MAC budget (``prune_to_latency``); if none does, the fastest tried is converted to
  DGConv and its gates projected as above (its own table and starting time). Of these and
  ``ours-latency`` the one that meets the latency budget with the most MACs is kept, else
  the fastest, timed side by side (``hybrid_choice`` says which);
- ``torch-pruning``: the dense network channel-pruned by Torch-Pruning (L1 magnitude,
  the classifier kept) at the largest ratio within the same MAC budget.

Gate gradients come from one seeded random batch (at most 64x64: the networks pool
globally), so among gates of equal cost the choice is arbitrary, as it would be for any
method on random weights; the costs are what is measured. Every model of one network and
batch is timed in both layouts, all taking turns within every repetition; each counts in
its faster layout. MACs are counted by ``count_macs`` on the final models.

Torch-Pruning is not a dependency of nas-grouping: ``make bench-speed`` installs it into
the benchmark's own folder. Run ``nas-grouping bench speed`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from nas_grouping.channels.pruning import least_ratio
from nas_grouping.config import parse_list_settings, setting
from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.latency.measure import LatencyCost, MeasuredLatency, fastest_layouts, profile_layers
from nas_grouping.latency.timer import machine_info
from nas_grouping.macs import count_macs
from nas_grouping.pipeline.hybrid import (HybridCompression, export_fastest, gate_batches, project_gates,
                                          project_gates_to_latency)

__all__ = ["SpeedConfig", "run_speed", "format_speed", "NETWORKS", "torch_pruning_prune"]

#: network -> (space name, builder keyword arguments, input size)
NETWORKS: dict[str, tuple[str, dict[str, Any], tuple[int, int, int]]] = {
    "resnet56": ("resnet56", {"num_classes": 10}, (3, 32, 32)),
    "resnet50": ("torchvision", {"name": "resnet50", "num_classes": 1000}, (3, 224, 224)),
}
METHODS = ("ours-macs", "ours-latency", "ours-hybrid", "torch-pruning")


@dataclass
class SpeedConfig:
    """`nas-grouping bench speed`: which networks, budgets and batch sizes, and how long to time."""

    networks: Any = setting(["resnet56", "resnet50"], "networks, comma-separated: " + ", ".join(NETWORKS))
    budgets: Any = setting([0.5, 0.25], "MAC budgets as shares of the dense MACs, comma-separated")
    batches: Any = setting([1, 32], "batch sizes, comma-separated")
    repeats: int = setting(10, "timed repetitions of every model (median kept)")
    warmup: int = setting(2, "untimed calls of every model first")
    profile_repeats: int = setting(5, "repetitions per candidate when profiling the latency table")
    seed: int = setting(0, "seed of the weights and the gate-gradient batch")
    quick: bool = setting(False, "a smoke run: resnet56 only, batches 1 and 4, 2 repetitions")
    out: str | None = setting(None, "also write the rows as CSV here")

    def __post_init__(self) -> None:
        parse_list_settings(self, (("networks", str), ("budgets", float), ("batches", int)))
        if self.quick:
            self.networks, self.batches, self.repeats, self.warmup, self.profile_repeats = (
                ["resnet56"], [1, 4], 2, 1, 2)
        unknown = [n for n in self.networks if n not in NETWORKS]
        if unknown or not self.networks:
            raise ConfigError(f"networks: unknown {unknown}; choose from {', '.join(NETWORKS)}")
        if not self.budgets or any(not 0 < b < 1 for b in self.budgets):
            raise ConfigError(f"budgets must be shares of the dense MACs in (0, 1), got {self.budgets}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ConfigError(f"batches must be >= 1, got {self.batches}")
        if self.repeats < 1 or self.warmup < 0 or self.profile_repeats < 1:
            raise ConfigError("repeats and profile_repeats must be >= 1, warmup >= 0")


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise ConfigError("the speed benchmark compares with Torch-Pruning, which is not a dependency of "
                          "nas-grouping: run `make bench-speed` (installs it into .bench-env/ and runs this), or "
                          "`pip install torch-pruning` into the benchmark's own environment") from None
    return torch_pruning


def torch_pruning_prune(dense: torch.nn.Module, input_size: tuple[int, ...], budget_macs: int,
                        importance: str = "l1") -> tuple[torch.nn.Module, float]:
    """Torch-Pruning's channel pruning of ``dense`` (``importance``: l1 magnitude, or group_norm, DepGraph's) at
    the largest uniform ratio within ``budget_macs`` (bisection on the ratio); the classifier is kept. Returns the
    model and the ratio."""
    tp = _torch_pruning()
    if importance not in ("l1", "group_norm"):
        raise ConfigError(f"Torch-Pruning importance must be l1 or group_norm, got {importance!r}")
    example = torch.randn(1, *input_size)
    classifier = [m for m in dense.modules() if isinstance(m, torch.nn.Linear)][-1:]

    def prune(ratio: float) -> torch.nn.Module:
        model = copy.deepcopy(dense).eval()
        names = {id(m): n for n, m in dense.named_modules()}
        ignored = [model.get_submodule(names[id(m)]) for m in classifier]
        group_norm = getattr(tp.importance, "GroupMagnitudeImportance", None) or tp.importance.GroupNormImportance
        scorer = tp.importance.MagnitudeImportance(p=1) if importance == "l1" else group_norm(p=2)
        pruner = tp.pruner.MetaPruner(model, example, importance=scorer, pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        return model

    most = 0.9  # near 1 Torch-Pruning skips groups it would empty, so MACs stop falling
    if count_macs(prune(most), input_size) > budget_macs:
        raise BudgetError(f"Torch-Pruning cannot reach {budget_macs:,} MACs even at ratio {most}")
    ratio = least_ratio(lambda r: count_macs(prune(r), input_size) <= budget_macs, most, 10)
    return prune(ratio).eval(), ratio


def run_speed(cfg: SpeedConfig) -> pd.DataFrame:
    """Build every model, time them side by side per network and batch, and return one row per model."""
    from search_spaces import get_space

    tp = _torch_pruning()
    rows: list[dict[str, Any]] = []
    jobs = [(n, b) for n in cfg.networks for b in cfg.batches]
    bar = tqdm(total=len(jobs) * (1 + 3 * len(cfg.budgets)) + len(cfg.networks) * len(cfg.budgets),
               desc="bench speed", leave=False)
    for net in cfg.networks:
        space, kwargs, size = NETWORKS[net]
        torch.manual_seed(cfg.seed)
        searchable = get_space(space, **kwargs).eval()
        dense = get_space(space, dense=True, **kwargs).eval()
        dense.load_state_dict({k: v for k, v in searchable.state_dict().items() if k in dense.state_dict()},
                              strict=False)
        dense_macs = count_macs(dense, size)
        pruned, macs_only = {}, {}
        batches = gate_batches(searchable, size, cfg.seed)
        for budget in cfg.budgets:
            pruned[budget] = torch_pruning_prune(dense, size, int(budget * dense_macs))
            macs_only[budget] = project_gates(searchable, size, int(budget * dense_macs), batches)
            bar.update()
        for batch in cfg.batches:
            cost = LatencyCost(searchable, profile_layers(searchable, size, batch=batch, repeats=cfg.profile_repeats,
                                                          warmup=1))
            measure = MeasuredLatency(dense, size, batch=batch, repeats=cfg.profile_repeats, warmup=1)
            hybrid = HybridCompression(dense, size, batch=batch, round_to=8, repeats=cfg.profile_repeats,
                                       seed=cfg.seed, measure=measure)
            models: dict[str, torch.nn.Module] = {"dense": dense}
            meta: dict[str, dict[str, Any]] = {"dense": {"method": "dense", "budget": 1.0}}
            for budget in cfg.budgets:
                budget_macs = int(budget * dense_macs)
                gated, info = project_gates_to_latency(searchable, size, budget_macs, batches, cost,
                                                       budget * measure.reference_ms, measure)
                if "note" in info:
                    info["note"] = f"{budget:g} of the dense latency: " + info["note"]
                result = hybrid.run(latency_budget=budget, budget=budget_macs,
                                    groups_alone=(gated, info["loop_measured_ms"]))
                for method, chosen, extra in (("ours-macs", macs_only[budget], {}), ("ours-latency", gated, info)):
                    model, forms = export_fastest(chosen, size, batch)
                    models[f"{method}@{budget}"] = model
                    meta[f"{method}@{budget}"] = {"method": method, "budget": budget, **extra, **forms}
                models[f"ours-hybrid@{budget}"] = result.model
                meta[f"ours-hybrid@{budget}"] = {"method": "ours-hybrid", "budget": budget, **result.info}
                bar.update(3)
                model, ratio = pruned[budget]
                models[f"torch-pruning@{budget}"] = model
                meta[f"torch-pruning@{budget}"] = {"method": "torch-pruning", "budget": budget, "ratio": ratio}
            times = fastest_layouts(models, size, batch=batch, repeats=cfg.repeats, warmup=cfg.warmup)
            bar.update()
            dense_ms = times["dense"][1]
            for name, model in models.items():
                layout, ms = times[name]
                macs = count_macs(model, size)
                m = meta[name]
                rows.append({
                    "network": net, "input": "x".join(map(str, size)), "batch": batch, "budget": m["budget"],
                    "method": m["method"], "macs": macs, "mac_reduction": dense_macs / macs,
                    "budget_met": macs <= int(m["budget"] * dense_macs) or m["method"] == "dense",
                    "ms": ms, "layout": layout, "speedup": dense_ms / ms,
                    "speedup_per_mac_reduction": (dense_ms / ms) / (dense_macs / macs),
                    "latency_budget_ms": m.get("budget_ms"), "predicted_ms": m.get("predicted_ms"),
                    "table_dense_ms": m.get("table_dense_ms"), "loop_measured_ms": m.get("loop_measured_ms"),
                    "loop_tries": m.get("loop_tries"), "pruning_ratio": m.get("ratio", m.get("channel_ratio")),
                    "hybrid_choice": m.get("hybrid_choice"),
                    "dense_form_layers": m.get("dense_form_layers"), "channel_gathers": m.get("channel_gathers"),
                    "note": m.get("note", ""),
                })
    bar.close()
    df = pd.DataFrame(rows)
    df.attrs.update(machine_info())
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version (the module's __version__ string can lag behind it)
        df.attrs["torch_pruning"] = version("torch-pruning")
    except PackageNotFoundError:
        df.attrs["torch_pruning"] = getattr(tp, "__version__", "?")
    if cfg.out:
        df.to_csv(cfg.out, index=False)
    return df


def format_speed(df: pd.DataFrame) -> str:
    """A Markdown table of the rows, with the machine it was measured on."""
    lines = [f"measured on {df.attrs.get('device')}, {df.attrs.get('threads')} threads, torch {df.attrs.get('torch')}, "
             f"Torch-Pruning {df.attrs.get('torch_pruning')}; speed-up against dense in its faster layout"
             + ("; freed memory kept in the process (keep_freed_memory)" if df.attrs.get("freed_memory_kept") else ""),
             "", "| network | batch | MAC budget | method | MACs (x fewer) | ms (layout) | speed-up | speed-up / MAC "
             "reduction |", "|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        budget = "dense" if r.method == "dense" else f"1/{round(1 / r.budget)}" if math.isclose(
            1 / r.budget, round(1 / r.budget)) else f"{r.budget:g}"
        lines.append(f"| {r.network} | {r.batch} | {budget} | {r.method} | {r.macs / 1e6:,.1f}M ({r.mac_reduction:.2f}x)"
                     f" | {r.ms:.2f} ({'CL' if r.layout == 'channels_last' else 'NCHW'}) | {r.speedup:.2f}x | "
                     f"{r.speedup_per_mac_reduction:.2f} |")
    notes = [f"{r.network} b{r.batch} {r.method}@{r.budget:g}: " + "; ".join(filter(None, (
        f"{r.hybrid_choice} (channel ratio {r.pruning_ratio:.2f})" if r.method == "ours-hybrid" else "", r.note)))
        for r in df.itertuples() if r.note or r.method == "ours-hybrid"]
    return "\n".join(lines + ([""] + notes if notes else []))
