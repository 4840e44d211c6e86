"""Channels and groups by measured latency: the hybrid of channel pruning and DGConv grouping.

Grouping keeps every tensor's width, so on narrow CPU layers it saves MACs but little
time; removing channels makes every tensor smaller. ``HybridCompression`` takes a dense
model and a latency budget (a share of the dense model's measured time, or milliseconds)
within a MAC budget, and tries three models on this machine:

- *groups alone*: the model converted to DGConv, its gates projected to the budgets by
  the measured loop (``search.project_to_measured_latency``: a profiled table steers, whole-
  model measurements correct);
- *pruned channels*: the least channel-pruning ratio whose measured latency meets the
  budget within the MAC budget (``ChannelPruning.prune_to_latency``);
- *pruned channels and groups*: when channels alone miss, the pruned network converted to
  DGConv and projected by the measured loop from its own time.

Of those that meet the latency budget the one with the most MACs (the least taken away)
is kept, else the fastest, timed side by side. The result is exported: gathers folded,
each grouped layer in its fastest exact form, the model in its faster memory layout.
Weights are the dense model's (pruned by L1 magnitude, gates chosen by gradients of the
given batches): fine-tune the result before judging its accuracy.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from nas_grouping.budget import MacBudget, ModelCost, parse_latency_budget
from nas_grouping.channels.pruning import ChannelPruning
from nas_grouping.config import setting
from nas_grouping.convert import convert_to_dgconv, dgconv_layers
from nas_grouping.errors import ConfigError, RunExistsError
from nas_grouping.export.records import RECIPE_ATTR
from nas_grouping.export.model import export_model, load_model, model_folder, save_model, saved_input_size
from nas_grouping.files import check_run_folder, claim_run_folder
from nas_grouping.graph.fold import count_gathers
from nas_grouping.latency.measure import (LatencyCost, MeasuredLatency, choose_fastest_forms, fastest_layouts,
                                          profile_layers)
from nas_grouping.latency.timer import enough_repeats
from nas_grouping.macs import check_input_size, count_macs, count_parameters, format_macs, mac_counts, parse_input_size
from nas_grouping.report import write_json
from nas_grouping.runtime import Runtime
from nas_grouping.search.loop import project_to_budget, project_to_measured_latency

_log = logging.getLogger(__name__)

__all__ = ["HybridCompression", "HybridResult", "HybridConfig", "run_hybrid", "format_hybrid_summary", "gates_all_on",
           "project_gates", "gate_batches", "project_gates_to_latency", "export_fastest"]


def gates_all_on(searchable: nn.Module) -> nn.Module:
    """A copy of ``searchable`` with every gate on (dense), where a search's projection starts."""
    model = copy.deepcopy(searchable)
    for _, layer in dgconv_layers(model):
        layer.set_groups(1)
    return model


def gate_batches(model: nn.Module, input_size: Sequence[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One seeded random batch for gate gradients (at most 64x64: for networks that pool globally). Among gates of
    equal cost the choice it leads to is arbitrary: pass batches of real data where accuracy matters."""
    g = torch.Generator().manual_seed(seed)
    size = check_input_size(input_size)
    spatial = [min(s, 64) for s in size[1:]]
    x = torch.randn(2, size[0], *spatial, generator=g)
    with torch.no_grad():
        classes = copy.deepcopy(model).eval()(x[:1]).shape[1]
    return [(x, torch.randint(0, classes, (2,), generator=g))]


def _bound(cost: LatencyCost, model: nn.Module) -> LatencyCost:
    """``cost`` (a table's per-layer times) reading the gates of ``model``, a copy of the one it was made for."""
    view = copy.copy(cost)
    view.layers = [(n, model.get_submodule(n), v) for n, _, v in cost.layers]
    return view


def project_gates(searchable: nn.Module, input_size: Sequence[int], budget_macs: int,
                  batches: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """A copy of ``searchable`` with all gates on, projected to the MAC budget."""
    model = gates_all_on(searchable)
    project_to_budget(model, ModelCost(model, input_size), budget_macs, batches, Runtime(torch.device("cpu")))
    return model.eval()


def project_gates_to_latency(searchable: nn.Module, input_size: Sequence[int], budget_macs: int,
                             batches: list[tuple[torch.Tensor, torch.Tensor]], cost: LatencyCost, budget_ms: float,
                             measure: MeasuredLatency, reference_ms: float | None = None
                             ) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``searchable``, all gates on, projected to the MAC budget and to ``budget_ms`` *measured*: the table
    steers the projection, whole-model measurements correct its target. Returns the model and what the loop saw."""
    model = gates_all_on(searchable)
    loop = project_to_measured_latency(model, ModelCost(model, input_size), budget_macs, batches,
                                       Runtime(torch.device("cpu")), _bound(cost, model), budget_ms, measure,
                                       reference_ms=reference_ms if reference_ms is not None else measure.reference_ms)
    info = {"table_dense_ms": cost.dense_ms, "budget_ms": budget_ms, "predicted_ms": loop["predicted_ms"],
            "loop_measured_ms": loop["measured_ms"], "loop_tries": len(loop["tries"]), "met": loop["met"]}
    if not loop["met"]:
        info["note"] = (f"{budget_ms:.3f} ms was not met in {len(loop['tries'])} measured tries within the MAC "
                        f"budget; the fastest: {loop['measured_ms']:.3f} ms (table {loop['predicted_ms']:.3f} ms)")
    return model.eval(), info


def export_fastest(model: nn.Module, input_size: Sequence[int], batch: int) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` (DGConv layers or none) exported: gathers folded, every grouped layer in its fastest exact form and
    the model in its faster layout at ``batch``; with what was chosen."""
    exported, forms = choose_fastest_forms(export_model(model), input_size, batch=batch)
    return exported, {"groups": [layer.learned_groups for _, layer in dgconv_layers(model)],
                      "dense_form_layers": sum(1 for v in forms["layers"].values() if v["form"] == "dense"),
                      "channel_gathers": count_gathers(exported), "layout": forms["layout"]}


@dataclass
class HybridResult:
    """The exported model, which candidate it is, and what was measured on the way."""

    model: nn.Module
    choice: str
    info: dict[str, Any] = field(default_factory=dict)


class HybridCompression:
    """Channels and groups by measured latency on this machine, for one dense model at one batch size.

    Args:
        model: the dense model (plain ``nn.Conv2d`` layers; any traceable network).
        input_size: one sample's shape, e.g. (3, 32, 32).
        batch: the batch size the latency budget holds at.
        round_to: pruned widths are multiples of this (8 suits CPU kernels).
        repeats: timed repetitions per measurement (raised toward a second of calls).
        seed: seed of the random gate batch when none is given.
        measure: the whole-model timer to share with other work at this batch (default: one for ``model``).
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int], *, batch: int = 1, round_to: int = 8,
                 repeats: int = 5, seed: int = 0, measure: MeasuredLatency | None = None) -> None:
        if any(True for _ in dgconv_layers(model)):
            raise ConfigError("HybridCompression takes a dense model (plain convolutions); export a searched one first")
        self.dense = copy.deepcopy(model).eval()
        self.input_size = check_input_size(input_size)
        self.batch, self.repeats, self.seed = batch, repeats, seed
        self.channels = ChannelPruning(self.dense, self.input_size, round_to=round_to)
        self.measure = measure or MeasuredLatency(self.dense, self.input_size, batch=batch, repeats=repeats, warmup=1)
        self._searchable: nn.Module | None = None
        self._cost: LatencyCost | None = None

    @property
    def dense_ms(self) -> float:
        """The dense model's measured latency (ms) at ``batch``: what budget shares are shares of."""
        return self.measure.reference_ms

    def _grouping(self) -> tuple[nn.Module, LatencyCost]:
        if self._searchable is None:
            self._searchable = convert_to_dgconv(self.dense).eval()
            self._cost = LatencyCost(self._searchable, profile_layers(
                self._searchable, self.input_size, batch=self.batch, repeats=self.repeats, warmup=1))
        return self._searchable, self._cost

    def groups_alone(self, budget_macs: int, budget_ms: float,
                     batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                     ) -> tuple[nn.Module, dict[str, Any]]:
        """The dense model's convs as DGConv, gates projected to both budgets by the measured loop (not exported)."""
        searchable, cost = self._grouping()
        batches = batches or gate_batches(searchable, self.input_size, self.seed)
        return project_gates_to_latency(searchable, self.input_size, budget_macs, batches, cost, budget_ms,
                                        self.measure)

    def run(self, *, latency_budget: float | str, budget: float | int | None = None,
            batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
            groups_alone: tuple[nn.Module, float] | None = None) -> HybridResult:
        """Compress to ``latency_budget`` (a share of the dense latency in (0, 1] or ``"2.5ms"``) within ``budget``
        (a share of the dense MACs or MACs; default: the same share as the latency, or none for milliseconds), and
        export the chosen model in its fastest forms.

        ``groups_alone`` passes an already projected DGConv model with its measured ms instead of projecting one.
        """
        dense_macs = count_macs(self.dense, self.input_size)
        budget_ms = parse_latency_budget(latency_budget, self.dense_ms)
        if budget is None:
            budget = min(budget_ms / self.dense_ms, 1.0)
        budget_macs = MacBudget.parse(budget).resolve(dense_macs)
        model, info = self.choose(budget_ms, budget_macs, batches=batches, groups_alone=groups_alone)
        exported, forms = export_fastest(model, self.input_size, self.batch)
        info.update(forms, dense_ms=self.dense_ms, budget_macs=budget_macs)
        return HybridResult(exported, info["hybrid_choice"], info)

    def choose(self, budget_ms: float, budget_macs: int, *, batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               groups_alone: tuple[nn.Module, float] | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """The chosen candidate (DGConv layers, not exported) for ``budget_ms`` measured within ``budget_macs``,
        with what was measured."""
        if groups_alone is None:
            gated, ginfo = self.groups_alone(budget_macs, budget_ms, batches)
            groups_alone = (gated, ginfo["loop_measured_ms"])
        pruned, ratio, report = self.channels.prune_to_latency(budget_ms, self.measure, budget_macs=budget_macs)
        searchable = convert_to_dgconv(pruned).eval()
        candidates = {"groups alone": groups_alone,
                      "pruned channels": (gates_all_on(searchable), report["measured_ms"])}
        info: dict[str, Any] = {"channel_ratio": ratio, "channel_tries": len(report["tries"]), "loop_tries": 0}
        if not report["met"]:
            cost = LatencyCost(searchable, profile_layers(searchable, self.input_size, batch=self.batch,
                                                          repeats=self.repeats, warmup=1))
            gated, loop = project_gates_to_latency(
                searchable, self.input_size, budget_macs,
                batches or gate_batches(searchable, self.input_size, self.seed), cost, budget_ms, self.measure,
                reference_ms=report["measured_ms"])
            info.update(loop_tries=loop["loop_tries"], predicted_ms=loop["predicted_ms"])
            candidates["pruned channels and groups"] = (gated, loop["loop_measured_ms"])
        met = {k: v for k, v in candidates.items() if v[1] <= budget_ms}
        if met:
            choice = max(met, key=lambda k: count_macs(met[k][0], self.input_size))
        else:
            times = fastest_layouts({k: self.measure.export(m) for k, (m, _) in candidates.items()}, self.input_size,
                                    batch=self.batch, repeats=self.measure.repeats, warmup=self.measure.warmup)
            choice = min(times, key=lambda k: times[k][1])
            info["note"] = (f"the latency budget ({budget_ms:.3f} ms measured) was not met; the fastest side by side "
                            f"of {', '.join(candidates)}: {choice}")
        model, measured = candidates[choice]
        if choice == "groups alone":
            info["channel_ratio"] = 0.0
        info.update(hybrid_choice=choice, loop_measured_ms=measured, budget_ms=budget_ms, met=bool(met))
        return model.eval(), info


@dataclass
class HybridConfig:
    """`nas-grouping hybrid`: a saved model, the latency and MAC budgets, the batch size, and where to write."""

    model: str | None = setting(None, "a saved model folder (save_model), or a run folder holding model/")
    latency_budget: str | None = setting(None, "latency budget: a share of the dense model's measured latency in "
                                         "(0, 1] (0.5) or milliseconds (2.5ms)")
    budget: Any = setting(None, "MAC budget beside it: a share of the model's MACs (<= 1) or MACs (12M); default: "
                          "the latency share", raw=True)
    input_size: Any = setting(None, "one sample's shape C,H,W (default: the model's search space's own)")
    batch: int = setting(1, "batch size at which the latency budget holds")
    round_to: int = setting(8, "pruned widths are multiples of this")
    repeats: int = setting(5, "timed repetitions per measurement (raised toward a second of calls)")
    seed: int = setting(0, "seed of the random batch that ranks gates of equal cost")
    out: str = setting("runs/hybrid", "run folder (the exported model and summary.json)")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("hybrid needs --model: a saved model folder (save_model) or a run folder holding model/")
        if self.latency_budget is None:
            raise ConfigError("hybrid needs --latency-budget: a share of the dense latency (0.5) or milliseconds "
                              "(2.5ms)")
        self.latency_budget = str(self.latency_budget)
        parse_latency_budget(self.latency_budget, 1.0)  # the form; resolved against the measured model
        if self.budget is not None:
            MacBudget.parse(self.budget)
        size = parse_input_size(self.input_size)
        self.input_size = None if size is None else list(size)
        for name in ("batch", "round_to", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def run_hybrid(cfg: HybridConfig) -> HybridResult:
    """The `hybrid` job: load the model, compress it by measurement, save the export and its summary in ``cfg.out``.

    Raises:
        RunExistsError: ``cfg.out`` already holds a finished hybrid run.
        ExportError / ConfigError: no model at ``cfg.model``; no input size known for it.
    """
    out = check_run_folder(cfg.out, "hybrid")
    if (out / "summary.json").is_file():
        raise RunExistsError(f"--out {out} already holds a finished hybrid run: choose another --out")
    folder = model_folder(cfg.model)
    model = load_model(folder)
    size = saved_input_size(model, cfg.input_size, folder=folder)
    claim_run_folder(out, "hybrid")
    _log.info("hybrid: %s at batch %d, input %s: latency budget %s, MAC budget %s", folder, cfg.batch, size,
              cfg.latency_budget, cfg.budget if cfg.budget is not None else "the latency share")
    hybrid = HybridCompression(model, size, batch=cfg.batch, round_to=cfg.round_to, repeats=cfg.repeats,
                               seed=cfg.seed)
    result = hybrid.run(latency_budget=cfg.latency_budget, budget=cfg.budget)
    dense_macs = count_macs(hybrid.dense, size)
    macs, executed = mac_counts(result.model, size, batch=cfg.batch)
    final = fastest_layouts({"dense": hybrid.dense, "hybrid": result.model}, size, batch=cfg.batch,
                            repeats=enough_repeats(hybrid.dense_ms, cfg.repeats), warmup=2)
    summary = {"job": "hybrid", "source": str(folder), "input_size": list(size), "batch": cfg.batch,
               "choice": result.choice, "dense_macs": dense_macs, "macs": macs, "macs_fraction": macs / dense_macs,
               "executed_macs": executed,
               "parameters": count_parameters(result.model), "dense_parameters": count_parameters(hybrid.dense),
               "dense_ms": final["dense"][1], "ms": final["hybrid"][1], "layout": final["hybrid"][0],
               "speedup": final["dense"][1] / final["hybrid"][1], "latency_budget_ms": result.info["budget_ms"],
               "latency_budget_met": bool(result.info["met"]), "fine_tuned": False,
               "info": {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool, list))}}
    save_model(result.model, out / "model", recipe=getattr(model, RECIPE_ATTR, None),
               extra={"macs": macs, "job": "hybrid", "input_size": list(size)})
    write_json(out / "summary.json", summary)
    return result


def format_hybrid_summary(s: dict[str, Any]) -> str:
    """The summary of a hybrid run as the command prints it."""
    met = "met" if s["latency_budget_met"] else "NOT met"
    return "\n".join([
        f"hybrid of {s['source']} at batch {s['batch']}: {s['choice']}",
        f"  {format_macs(s['macs'], s.get('executed_macs'), s['dense_macs'])}; parameters "
        f"{s['parameters']:,} of {s['dense_parameters']:,}",
        f"  measured {s['ms']:.3f} ms vs dense {s['dense_ms']:.3f} ms side by side ({s['speedup']:.2f}x, "
        f"{s['layout']}); latency budget {s['latency_budget_ms']:.3f} ms {met}",
        "  weights are the input model's, pruned and regrouped without training: fine-tune before judging accuracy",
    ])
