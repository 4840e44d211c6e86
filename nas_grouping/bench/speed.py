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

from nas_grouping.config import _f
from nas_grouping.channels.pruning import ChannelPruning, least_ratio
from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.graph.fold import count_gathers
from nas_grouping.latency.measure import LatencyCost, MeasuredLatency, choose_fastest_forms, fastest_layouts, profile_layers
from nas_grouping.macs import count_macs
from nas_grouping.latency.timer import machine_info

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

    networks: Any = _f(["resnet56", "resnet50"], "networks, comma-separated: " + ", ".join(NETWORKS))
    budgets: Any = _f([0.5, 0.25], "MAC budgets as shares of the dense MACs, comma-separated")
    batches: Any = _f([1, 32], "batch sizes, comma-separated")
    repeats: int = _f(10, "timed repetitions of every model (median kept)")
    warmup: int = _f(2, "untimed calls of every model first")
    profile_repeats: int = _f(5, "repetitions per candidate when profiling the latency table")
    seed: int = _f(0, "seed of the weights and the gate-gradient batch")
    quick: bool = _f(False, "a smoke run: resnet56 only, batches 1 and 4, 2 repetitions")
    out: str | None = _f(None, "also write the rows as CSV here")

    def __post_init__(self) -> None:
        for name, cast in (("networks", str), ("budgets", float), ("batches", int)):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = [cast(v.strip()) for v in value.split(",") if v.strip()]
                except ValueError:
                    raise ConfigError(f"{name}: expected a comma-separated list, got {value!r}") from None
            setattr(self, name, list(value))
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


def torch_pruning_prune(dense: torch.nn.Module, input_size: tuple[int, ...], budget_macs: int
                        ) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning's L1-magnitude channel pruning of ``dense`` at the largest uniform ratio within
    ``budget_macs`` (bisection on the ratio); the classifier is kept. Returns the model and the ratio."""
    tp = _torch_pruning()
    example = torch.randn(1, *input_size)
    classifier = [m for m in dense.modules() if isinstance(m, torch.nn.Linear)][-1:]

    def prune(ratio: float) -> torch.nn.Module:
        model = copy.deepcopy(dense).eval()
        names = {id(m): n for n, m in dense.named_modules()}
        ignored = [model.get_submodule(names[id(m)]) for m in classifier]
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        return model

    most = 0.9  # near 1 Torch-Pruning skips groups it would empty, so MACs stop falling
    if count_macs(prune(most), input_size) > budget_macs:
        raise BudgetError(f"Torch-Pruning cannot reach {budget_macs:,} MACs even at ratio {most}")
    ratio = least_ratio(lambda r: count_macs(prune(r), input_size) <= budget_macs, most, 10)
    return prune(ratio).eval(), ratio


def _bound(cost: LatencyCost, model: torch.nn.Module) -> LatencyCost:
    """``cost`` (a table's per-layer times) reading the gates of ``model``, a copy of the one it was made for."""
    view = copy.copy(cost)
    view.layers = [(n, model.get_submodule(n), v) for n, _, v in cost.layers]
    return view


def _all_on(searchable: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``searchable`` with every gate on (dense), where a search's projection starts."""
    from nas_grouping.convert import dgconv_layers

    model = copy.deepcopy(searchable)
    for _, layer in dgconv_layers(model):
        layer.set_groups(1)
    return model


def _project(searchable: torch.nn.Module, input_size: tuple[int, ...], budget_macs: int, batches: list
             ) -> torch.nn.Module:
    """A copy of ``searchable`` with all gates on, projected to the MAC budget."""
    from nas_grouping.budget import ModelCost
    from nas_grouping.runtime import Runtime
    from nas_grouping.search.loop import project_to_budget

    model = _all_on(searchable)
    project_to_budget(model, ModelCost(model, input_size), budget_macs, batches, Runtime(torch.device("cpu")))
    return model.eval()


def _grad_batches(searchable: torch.nn.Module, input_size: tuple[int, ...], seed: int) -> list:
    """One seeded random batch for the gate gradients, at most 64x64 (the networks pool globally)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, input_size[0], min(input_size[1], 64), min(input_size[2], 64), generator=g)
    with torch.no_grad():
        classes = searchable.eval()(x[:1]).shape[1]
    return [(x, torch.randint(0, classes, (2,), generator=g))]


def _with_latency_budget(searchable: torch.nn.Module, input_size: tuple[int, ...], budget_macs: int, batches: list,
                         cost: LatencyCost, fraction: float, measure: MeasuredLatency
                         ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Gates projected to the MAC budget and ``fraction`` of the dense model's *measured* latency:
    the table steers the projection, whole-model measurements correct its target
    (``search.project_to_measured_latency``)."""
    from nas_grouping.budget import ModelCost
    from nas_grouping.runtime import Runtime
    from nas_grouping.search.loop import project_to_measured_latency

    model = _all_on(searchable)
    budget_ms = fraction * measure.reference_ms
    loop = project_to_measured_latency(model, ModelCost(model, input_size), budget_macs, batches,
                                       Runtime(torch.device("cpu")), _bound(cost, model), budget_ms, measure,
                                       reference_ms=measure.reference_ms)
    info = {"table_dense_ms": cost.dense_ms, "budget_ms": budget_ms, "predicted_ms": loop["predicted_ms"],
            "loop_measured_ms": loop["measured_ms"], "loop_tries": len(loop["tries"])}
    if not loop["met"]:
        info["note"] = (f"{fraction:g} of the dense latency ({budget_ms:.3f} ms measured) was not met in "
                        f"{len(loop['tries'])} measured tries with the MAC budget; the fastest: "
                        f"{loop['measured_ms']:.3f} ms (table {loop['predicted_ms']:.3f} ms)")
    return model.eval(), info


def _hybrid(channels: ChannelPruning, input_size: tuple[int, ...], budget_macs: int, batch: int, fraction: float,
            measure: MeasuredLatency, profile_repeats: int, seed: int, grouped: torch.nn.Module, grouped_ms: float
            ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Channel pruning, then grouping if that is not enough, at ``fraction`` of the dense model's measured
    latency and within ``budget_macs``.

    The channel ratio is found by measurement (``ChannelPruning.prune_to_latency``). If it
    misses the budget, the pruned network is converted to DGConv and its gates projected by
    the measured loop, starting from its own measured time. Of these and ``grouped``
    (``ours-latency``'s model, measured ``grouped_ms`` by the same ``measure``), the one that
    meets the budget with the most MACs is chosen; if none does, they are timed side by side
    (the loops' single timings are too noisy to rank close candidates) and the fastest wins.
    """
    from nas_grouping.budget import ModelCost
    from nas_grouping.convert import convert_to_dgconv
    from nas_grouping.runtime import Runtime
    from nas_grouping.search.loop import project_to_measured_latency

    budget_ms = fraction * measure.reference_ms
    pruned, ratio, report = channels.prune_to_latency(budget_ms, measure, budget_macs=budget_macs)
    searchable = convert_to_dgconv(pruned).eval()
    candidates = {"groups alone": (grouped, grouped_ms), "pruned channels": (_all_on(searchable),
                                                                             report["measured_ms"])}
    info: dict[str, Any] = {"channel_ratio": ratio, "channel_tries": len(report["tries"]), "loop_tries": 0}
    if not report["met"]:
        cost = LatencyCost(searchable, profile_layers(searchable, input_size, batch=batch, repeats=profile_repeats,
                                                      warmup=1))
        gated = _all_on(searchable)
        loop = project_to_measured_latency(gated, ModelCost(gated, input_size), budget_macs,
                                           _grad_batches(searchable, input_size, seed), Runtime(torch.device("cpu")),
                                           _bound(cost, gated), budget_ms, measure, reference_ms=report["measured_ms"])
        info.update(loop_tries=len(loop["tries"]), predicted_ms=loop["predicted_ms"])
        candidates["pruned channels and groups"] = (gated, loop["measured_ms"])
    met = {k: v for k, v in candidates.items() if v[1] <= budget_ms}
    if met:
        choice = max(met, key=lambda k: count_macs(met[k][0], input_size))
    else:
        times = fastest_layouts({k: measure.export(m) for k, (m, _) in candidates.items()}, input_size, batch=batch,
                                repeats=measure.repeats, warmup=measure.warmup)
        choice = min(times, key=lambda k: times[k][1])
        info["note"] = (f"{fraction:g} of the dense latency ({budget_ms:.3f} ms measured) was not met; the fastest "
                        f"side by side of {', '.join(candidates)}: {choice}")
    model, measured = candidates[choice]
    if choice == "groups alone":
        info["channel_ratio"] = 0.0
    info.update(hybrid_choice=choice, loop_measured_ms=measured, budget_ms=budget_ms)
    return model.eval(), info


def _export_fastest(model: torch.nn.Module, input_size: tuple[int, ...], batch: int
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    from nas_grouping.convert import dgconv_layers
    from nas_grouping.export.model import export_model

    exported, forms = choose_fastest_forms(export_model(model), input_size, batch=batch)
    return exported, {"groups": [layer.learned_groups for _, layer in dgconv_layers(model)],
                      "dense_form_layers": sum(1 for v in forms["layers"].values() if v["form"] == "dense"),
                      "channel_gathers": count_gathers(exported)}


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
        batches = _grad_batches(searchable, size, cfg.seed)
        channels = ChannelPruning(dense, size, round_to=8)
        for budget in cfg.budgets:
            pruned[budget] = torch_pruning_prune(dense, size, int(budget * dense_macs))
            macs_only[budget] = _project(searchable, size, int(budget * dense_macs), batches)
            bar.update()
        for batch in cfg.batches:
            cost = LatencyCost(searchable, profile_layers(searchable, size, batch=batch, repeats=cfg.profile_repeats,
                                                          warmup=1))
            measure = MeasuredLatency(dense, size, batch=batch, repeats=cfg.profile_repeats, warmup=1)
            models: dict[str, torch.nn.Module] = {"dense": dense}
            meta: dict[str, dict[str, Any]] = {"dense": {"method": "dense", "budget": 1.0}}
            for budget in cfg.budgets:
                budget_macs = int(budget * dense_macs)
                gated, info = _with_latency_budget(searchable, size, budget_macs, batches, cost, budget, measure)
                hybrid, hinfo = _hybrid(channels, size, budget_macs, batch, budget, measure, cfg.profile_repeats,
                                        cfg.seed, gated, info["loop_measured_ms"])
                for method, chosen, extra in (("ours-macs", macs_only[budget], {}), ("ours-latency", gated, info),
                                              ("ours-hybrid", hybrid, hinfo)):
                    model, forms = _export_fastest(chosen, size, batch)
                    models[f"{method}@{budget}"] = model
                    meta[f"{method}@{budget}"] = {"method": method, "budget": budget, **extra, **forms}
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
