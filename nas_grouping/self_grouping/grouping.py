"""SG-CNN self-grouping as a compression pass: a trained model in, a really smaller and faster model out.

Guo, Wu, Kittler, Feng, "Self-grouping Convolutional Neural Networks", Neural Networks 2020
(arXiv 2009.13803). Per prunable layer: an importance vector per filter (one entry per input
channel), k-means over the filters, then centroid-based pruning of the least important
connections, so each cluster keeps its own input channels. Unlike the public code, which
multiplies dense weights by masks, every pruned layer becomes a
:class:`~nas_grouping.ops.diverse_group.DiverseGroupConv2d` / ``DiverseGroupLinear`` that
stores and multiplies only the kept weights.

    >>> sg = SelfGrouping(SelfGroupingConfig(budget=0.5))
    >>> print(sg.plan(model, (3, 32, 32)).describe())     # what each layer gets, what is skipped
    >>> small = sg.apply(model, (3, 32, 32))                # one-shot, no fine-tuning
    >>> result = sg.run(model, load_datasets(DataConfig()))  # progressive schedule + fine-tuning

Fractions are shares of a layer's *existing* connections (a grouped conv starts from its
groups), and a budget is a share of the input model's MACs. The plan's MACs are exact upper
bounds: pruning stops at the first (group, channel) pair that reaches a layer's target, so a
layer never keeps more than planned.

The defaults follow the paper (plain k-means, one threshold per layer), which gives groups of
uneven sizes and widths; on a CPU those run little faster than dense. ``cluster_sizes="equal"``
with ``threshold="cluster"`` keeps the clustering and the per-group input choice data-driven
but makes every group the same shape, so a layer runs as one grouped kernel
(``nas-grouping bench compress`` measures both). Fine-tuning trains the diverse group layers
themselves: every forward form is exact and differentiable, so exactly the kept weights train.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn

from nas_grouping.budget import MacBudget
from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.export.model import replace_layer
from nas_grouping.importance import IMPORTANCES, Importance, MagnitudeImportance, make_importance
from nas_grouping.macs import check_input_size, layer_macs
from nas_grouping.self_grouping._cluster import Pruning, balance_labels, centroid_prune, kmeans_labels
from nas_grouping.self_grouping._layers import Prunable, layer_candidates
from nas_grouping.specs import match_layer, resolve_clusters

#: what a measured latency fit adds to ``GroupingPlan.latency`` (reused as is on resume and on other ranks)
MEASURED_KEYS = ("budget_ms", "table_target_ms", "measured_budget_ms", "reference_ms", "measured_ms", "measured_met",
                 "measured_tries")

if TYPE_CHECKING:
    import pandas as pd

    from nas_grouping.config import SelfGroupingConfig
    from nas_grouping.data import Datasets
    from nas_grouping.latency.measure import LatencyTable
    from nas_grouping.runtime import Runtime

__all__ = ["SelfGrouping", "self_group", "GroupingPlan", "LayerPlan", "LayerOutcome", "SelfGroupingResult",
           "grouping_outcomes"]

#: attribute of a compressed model holding the per-layer outcomes of its last pruning step
OUTCOMES_ATTR = "nas_grouping_self_grouping"
_EPS = 1e-9


@dataclass(frozen=True)
class LayerPlan:
    """What the pass does with one conv/linear layer: prune it to ``fraction``, or skip it and why."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    prune: bool
    reason: str
    connections: int = 0           # existing (kept) connections of the input layer
    macs: int = 0                  # MACs per sample of the input layer
    clusters: int | None = None
    fraction: float | None = None  # pruned share of the existing connections, after the cap
    cap: float | None = None
    predicted_ms: float | None = None  # the latency table's time at ``fraction`` (latency budgets)

    def keep_at(self, share: float = 1.0) -> int:
        """Most connections kept after pruning ``share`` of the way to ``fraction`` (progressive steps)."""
        if not self.prune:
            return self.connections
        return int(math.floor((1.0 - (self.fraction or 0.0) * share) * self.connections + _EPS))

    @property
    def macs_after(self) -> int:
        """MACs per sample at the target (an upper bound: pruning may remove a few connections more)."""
        if not self.prune or self.connections == 0:
            return self.macs
        return self.keep_at() * (self.macs // self.connections)


@dataclass
class GroupingPlan:
    """The pass's plan for one model: every conv/linear layer, the MACs before and (at most) after."""

    layers: list[LayerPlan]
    input_size: tuple[int, ...]
    macs: int
    budget_macs: int | None = None
    global_fraction: float | None = None
    latency: dict[str, Any] | None = None  # budget, predicted, input model's ms (latency budgets)

    @property
    def prunable(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.prune]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if not lp.prune]

    @property
    def macs_after(self) -> int:
        """MACs per sample after the pass, at most (layers that are not conv/linear included)."""
        return self.macs - sum(lp.macs - lp.macs_after for lp in self.prunable)

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame([{**dataclasses.asdict(lp), "kernel_size": "x".join(map(str, lp.kernel_size)) or "-",
                              "macs_after": lp.macs_after} for lp in self.layers])

    def describe(self) -> str:
        lines = [f"self-grouping plan at input {self.input_size}: {self.macs:,} -> at most {self.macs_after:,} MACs "
                 f"({self.macs_after / max(self.macs, 1):.1%})"
                 + (f", budget {self.budget_macs:,} (global fraction {self.global_fraction:.3f})"
                    if self.budget_macs is not None else "")]
        if self.latency is not None:
            lat = self.latency
            lines.append(f"latency at batch {lat['batch']} ({lat['layout']}, table from {lat['device']}): input "
                         f"{lat['input_ms']:.3f} ms -> predicted {lat['predicted_ms']:.3f} ms, budget "
                         f"{lat['budget_ms']:.3f} ms ({lat['base_ms']:.3f} ms outside the prunable layers)")
            if "measured_ms" in lat:
                lines.append(f"measured at batch {lat['batch']} (one-shot, magnitude importance): input "
                             f"{lat['reference_ms']:.3f} ms -> {lat['measured_ms']:.3f} ms, budget "
                             f"{lat['measured_budget_ms']:.3f} ms {'met' if lat['measured_met'] else 'NOT met'} "
                             f"after {len(lat['measured_tries'])} measured tries")
        for lp in self.layers:
            if lp.prune:
                lines.append(f"  {lp.name or '<model>'}: {lp.kind} {lp.in_channels}->{lp.out_channels}, "
                             f"{lp.clusters} clusters, prune {lp.fraction:.1%} of {lp.connections} connections, "
                             f"{lp.macs:,} -> {lp.macs_after:,} MACs"
                             + (f", {lp.predicted_ms:.3f} ms predicted" if lp.predicted_ms is not None else ""))
            else:
                lines.append(f"  {lp.name or '<model>'}: skipped ({lp.reason})")
        return "\n".join(lines)


@dataclass(frozen=True)
class LayerOutcome:
    """What pruning gave one layer: its clusters, groups (filters x input channels each), kept connections."""

    name: str
    clusters: int
    group_sizes: tuple[int, ...]
    group_inputs: tuple[int, ...]
    kept: int
    connections_before: int
    threshold: float


@dataclass
class SelfGroupingResult:
    """What :meth:`SelfGrouping.run` returns: the compressed model, its plan, per-layer outcomes, history."""

    model: nn.Module
    plan: GroupingPlan
    outcomes: list[LayerOutcome]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None

    def val_acc(self, phase: str) -> float | None:
        """Validation accuracy of the last history row of ``phase`` ("input", "pruned", "local", "global")."""
        rows = [r for r in self.history if r["phase"] == phase and r.get("val_acc") is not None]
        return rows[-1]["val_acc"] if rows else None


def grouping_outcomes(model: nn.Module) -> list[LayerOutcome]:
    """The per-layer outcomes recorded on a model returned by the pass (empty for other models)."""
    return list(getattr(model, OUTCOMES_ATTR, None) or [])


def _execution_order(model: nn.Module, size: tuple[int, ...], names: Sequence[str]) -> list[str]:
    """Names of ``names``' modules in the order a forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name in names:
        module = model.get_submodule(name) if name else model

        def hook(mod, args, _name=name):
            if _name not in order:
                order.append(_name)
        handles.append(module.register_forward_pre_hook(hook))
    flags = {m: m.training for m in model.modules()}
    try:
        ref = next(model.parameters(), None)
        x = torch.zeros(1, *size, device=ref.device if ref is not None else None,
                        dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
        model.eval()
        with torch.no_grad():
            try:
                model(x)
            except (RuntimeError, ValueError, AssertionError) as exc:  # torch._assert raises the last
                raise ConfigError(f"self-grouping: a forward pass of one sample of size {size} failed: {exc}. "
                                  "Check input_size (channels, height, width, without the batch).") from exc
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
    return order


class SelfGrouping:
    """The SG-CNN self-grouping pass, configured once, applicable to any model.

    Args:
        config: the settings (see :class:`~nas_grouping.config.SelfGroupingConfig`).
        importance: a registered name (overrides the config's) or an
            :class:`~nas_grouping.importance.Importance` object; the config then names
            the object's registered name, if it has one.
        **overrides: fields of the config to replace, e.g. ``SelfGrouping(budget=0.5)``.
    """

    def __init__(self, config: "SelfGroupingConfig | None" = None, *, importance: "str | Importance | None" = None,
                 **overrides: Any) -> None:
        from nas_grouping.config import SelfGroupingConfig

        if config is not None and not isinstance(config, SelfGroupingConfig):
            raise TypeError(f"config must be a SelfGroupingConfig, got {type(config).__name__}")
        config = config or SelfGroupingConfig()
        if isinstance(importance, Importance):
            if IMPORTANCES.get(importance.name) is type(importance):
                overrides["importance"] = importance.name
        elif importance is not None:
            overrides["importance"] = importance
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        #: what scores the connections: the object given, else the config's name resolved
        self.importance: Importance = importance if isinstance(importance, Importance) \
            else make_importance(self.config.importance)

    def __repr__(self) -> str:
        return f"SelfGrouping({self.config!r})"

    # ------------------------------------------------------------------ plan
    def plan(self, model: nn.Module, input_size: Sequence[int], *, latency_table: "LatencyTable | None" = None,
             measured: dict[str, Any] | None = None) -> GroupingPlan:
        """What every conv/linear layer of ``model`` would get, with MACs; no clustering, no data.

        With a latency budget the fractions are fitted to a latency table: ``latency_table``,
        else the config's ``latency_table`` file, else one profiled now on this machine. With
        ``latency_measured`` each try is also measured; ``measured`` (the ``latency`` of such a
        plan) reuses that fit without measuring again (resume, other DDP ranks).

        Raises:
            ConfigError: no prunable layer; more clusters than filters; a forward that fails.
            BudgetError: a budget below what the prunable layers can reach at their caps.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        cfg = self.config
        size = check_input_size(input_size)
        candidates = list(layer_candidates(model))
        if not candidates:
            raise ConfigError(f"self-grouping: {type(model).__name__} has no convolution or linear layer to prune")
        order = _execution_order(model, size, [n for n, _, _ in candidates])
        rows = layer_macs(model, size)
        total = sum(r.macs for r in rows)
        target = cfg.target_fraction
        layers: list[LayerPlan] = []
        for name, module, why in candidates:
            layer = Prunable(name, module)
            base = dict(name=name, kind=type(module).__name__, in_channels=layer.in_channels,
                        out_channels=layer.out_channels, kernel_size=layer.kernel_size,
                        macs=sum(r.macs for r in rows if not name or r.name == name or r.name.startswith(name + ".")))
            reason = self._skip_reason(name, why, order)
            fraction = target
            if reason is None and isinstance(target, dict):
                hit = match_layer(name, target)
                reason = "no fraction pattern matches" if hit is None else None
                fraction = None if hit is None else hit[1]
            connections = int(layer.mask().sum()) if reason is None else 0
            if reason is None and connections == 0:
                reason = "no connection left to prune"
            if reason is not None:
                layers.append(LayerPlan(**base, prune=False, reason=reason))
                continue
            cap = cfg.linear_max_fraction if layer.is_linear else cfg.max_fraction
            clusters = resolve_clusters(cfg.clusters, name, layer.out_channels)
            layers.append(LayerPlan(**base, prune=True, reason="pruned", connections=connections, clusters=clusters,
                                    fraction=None if fraction is None else min(fraction, cap), cap=cap))
        if not any(lp.prune for lp in layers):
            detail = "; ".join(f"{lp.name or '<model>'}: {lp.reason}" for lp in layers)
            raise ConfigError(f"self-grouping: no prunable layer in {type(model).__name__} ({detail}). Prunable are "
                              "nn.Conv2d (regular, grouped, 1x1), exported group convs and nn.Linear; check exclude "
                              "and skip_first")
        plan = GroupingPlan(layers=layers, input_size=size, macs=total)
        if cfg.budget is not None:
            plan = self._fit_budget(plan)
        if cfg.latency_budget is not None:
            plan = self._fit_latency(plan, model, size, latency_table, measured)
        return plan

    def _fit_latency(self, plan: GroupingPlan, model: nn.Module, size: tuple[int, ...],
                     table: "LatencyTable | None", measured: dict[str, Any] | None = None) -> GroupingPlan:
        from nas_grouping.latency.measure import LatencyTable
        from nas_grouping.self_grouping.latency import fit_latency, profile_self_grouping

        cfg = self.config
        if table is None and cfg.latency_table:
            table = LatencyTable.load(cfg.latency_table)
        if table is None:
            table = profile_self_grouping(model, size, cfg, batch=cfg.latency_batch)
        if int(table.meta.get("batch", 0)) != cfg.latency_batch:
            raise ConfigError(f"the latency table was measured at batch {table.meta.get('batch')}, the budget is at "
                              f"latency_batch={cfg.latency_batch}: profile at that batch or set latency_batch")
        if list(table.meta.get("input_size", [])) != list(size):
            raise ConfigError(f"the latency table was measured at input {table.meta.get('input_size')}, the model "
                              f"runs at {list(size)}: profile again")
        if cfg.latency_measured:
            return self._fit_measured(plan, model, size, table, measured)
        return fit_latency(plan, table, cfg.latency_budget, config=cfg)

    def _fit_measured(self, plan: GroupingPlan, model: nn.Module, size: tuple[int, ...],
                      table: "LatencyTable", reuse: dict[str, Any] | None = None) -> GroupingPlan:
        """The table's fractions for the table target whose one-shot result, measured on this machine
        against ``model``, meets the latency budget (``latency.meet_measured_budget``); targets under
        the table's fastest give its fastest plan (measured, "stuck"). ``reuse``: the ``latency`` of
        a plan measured before (a resumed run, the other DDP ranks): its target is fitted again from
        the same table, nothing is measured."""
        from nas_grouping.self_grouping.latency import fastest_ms, fit_latency

        cfg = self.config
        fastest = fastest_ms(plan, table, config=cfg)

        def fitted_at(target: float | None) -> GroupingPlan:
            at = math.inf if target is None else max(target, fastest * (1 + 1e-9))
            return fit_latency(plan, table, f"{at}ms", config=cfg)

        if reuse is not None:
            fit, fitted = reuse, fitted_at(reuse["table_target_ms"])
        else:
            fit, fitted = self._measure_fit(model, size, table, fastest, fitted_at)
        return dataclasses.replace(fitted, latency={**fitted.latency, **{k: fit[k] for k in MEASURED_KEYS}})

    def _measure_fit(self, model: nn.Module, size: tuple[int, ...], table: "LatencyTable", fastest: float,
                     fitted_at: Callable[[float | None], GroupingPlan]) -> tuple[dict[str, Any], GroupingPlan]:
        """Build and measure tries of ``fitted_at(target)``; the measured fit (``MEASURED_KEYS``) and its plan."""
        from nas_grouping.latency.measure import MeasuredLatency, meet_measured_budget, parse_latency_budget

        cfg = self.config
        probe = SelfGrouping(cfg, importance=MagnitudeImportance())  # no data at plan time
        measure = MeasuredLatency(model, size, batch=cfg.latency_batch)
        budget_ms = parse_latency_budget(cfg.latency_budget, measure.reference_ms)

        def attempt(target: float | None) -> dict[str, Any]:
            fitted = fitted_at(target)
            built = probe.build(model, probe.decide(model, fitted))
            predicted = fitted.latency["predicted_ms"]
            return {"measured_ms": measure(built), "predicted_ms": predicted, "stuck": target is not None and
                    target <= fastest, "_reached": predicted, "_plan": fitted}

        best, tried = meet_measured_budget(attempt, budget_ms, table_dense_ms=float(table.meta["model_ms"]),
                                           reference_ms=measure.reference_ms, floor=0.0)
        fit = {"budget_ms": budget_ms * float(table.meta["model_ms"]) / measure.reference_ms,
               "table_target_ms": best["table_target_ms"], "measured_budget_ms": budget_ms,
               "reference_ms": measure.reference_ms, "measured_ms": best["measured_ms"], "measured_met": best["met"],
               "measured_tries": tried}
        return fit, best["_plan"]

    def _skip_reason(self, name: str, why: str | None, order: list[str]) -> str | None:
        pattern = next((p for p in self.config.exclude if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            return f"excluded by pattern {pattern!r}"
        if why is not None:
            return why
        if name not in order:
            return "not used in forward"
        if self.config.skip_first and name == order[0]:
            return "first layer (reads the model input; skip_first)"
        return None

    def _fit_budget(self, plan: GroupingPlan) -> GroupingPlan:
        """One global fraction, capped per layer, found by bisection so the MACs meet the budget."""
        budget = MacBudget.parse(self.config.budget)
        budget_macs = budget.resolve(plan.macs)

        def with_fraction(f: float) -> GroupingPlan:
            layers = [dataclasses.replace(lp, fraction=min(f, lp.cap)) if lp.prune else lp for lp in plan.layers]
            return dataclasses.replace(plan, layers=layers, budget_macs=budget_macs, global_fraction=f)

        top = max(lp.cap for lp in plan.prunable)
        lowest = with_fraction(top)
        if lowest.macs_after > budget_macs:
            fixed = plan.macs - sum(lp.macs for lp in plan.prunable)
            raise BudgetError(
                f"a budget of {budget_macs:,} MACs ({budget_macs / plan.macs:.1%} of the input model's "
                f"{plan.macs:,}) cannot be met: with every prunable layer at its cap (convolutions "
                f"{self.config.max_fraction:.0%}, linear {self.config.linear_max_fraction:.0%} pruned) the model "
                f"still costs {lowest.macs_after:,} MACs ({lowest.macs_after / plan.macs:.1%}), {fixed:,} of them in "
                f"the {len(plan.skipped)} skipped layer(s) and layers that are not conv/linear. Raise the budget to "
                f"at least {lowest.macs_after / plan.macs:.3f}, raise max_fraction / linear_max_fraction, or "
                "exclude fewer layers."
            )
        if with_fraction(0.0).macs_after <= budget_macs:
            return with_fraction(0.0)
        lo, hi = 0.0, top
        for _ in range(60):
            mid = (lo + hi) / 2
            if with_fraction(mid).macs_after <= budget_macs:
                hi = mid
            else:
                lo = mid
        return with_fraction(hi)

    # ----------------------------------------------------------------- prune
    def decide(self, model: nn.Module, plan: GroupingPlan, *, share: float = 1.0,
               calibration: Iterable | None = None, step: int = 0) -> dict[str, Pruning]:
        """Importance, k-means and centroid pruning for every planned layer of ``model`` (unchanged).

        ``share`` scales each layer's target fraction (the progressive schedule); ``model`` may
        already be a pruned version of the planned one (same layer names). ``step`` (0 for the
        first) varies the k-means seeds between the steps of a schedule.
        """
        cfg = self.config
        layers = [Prunable(lp.name, model.get_submodule(lp.name) if lp.name else model) for lp in plan.prunable]
        scores = self.importance(model, layers, calibration)
        decisions = {}
        for index, (lp, layer) in enumerate(zip(plan.prunable, layers)):
            if lp.clusters > layer.out_channels:
                raise ConfigError(f"layer {lp.name!r}: {lp.clusters} clusters but only {layer.out_channels} filters")
            labels = kmeans_labels(scores[lp.name], lp.clusters, seed=(cfg.seed + 7919 * step + index) % 2**31,
                                   restarts=cfg.kmeans_restarts, init=cfg.kmeans_init)
            if cfg.cluster_sizes == "equal":
                labels = balance_labels(scores[lp.name], labels, lp.clusters)
            decisions[lp.name] = centroid_prune(scores[lp.name], layer.mask(), labels, lp.keep_at(share),
                                                mode=cfg.threshold)
        return decisions

    def build(self, model: nn.Module, decisions: dict[str, Pruning]) -> nn.Module:
        """A deep copy of ``model`` with each decided layer replaced by its diverse group layer."""
        target = copy.deepcopy(model)
        outcomes = []
        for name, d in decisions.items():
            layer = Prunable(name, target.get_submodule(name) if name else target)
            before = int(layer.mask().sum())
            new = layer.build(d.mask, d.groups)
            outcomes.append(LayerOutcome(
                name=name, clusters=d.clusters, group_sizes=tuple(len(f) for f, _ in new.groups),
                group_inputs=tuple(len(s) for _, s in new.groups), kept=new.kept_connections(),
                connections_before=before, threshold=d.threshold))
            if not name:
                target = new
            else:
                replace_layer(target, name, new)
        setattr(target, OUTCOMES_ATTR, outcomes)
        return target

    def apply(self, model: nn.Module, input_size: Sequence[int], *, calibration: Iterable | None = None,
              plan: GroupingPlan | None = None) -> nn.Module:
        """One-shot self-grouping (no fine-tuning): a new compressed module; ``model`` is left untouched.

        Args:
            calibration: batches of (inputs, targets) for an importance that needs them (``"taylor"``).
            plan: a plan made by :meth:`plan` for this model (made here when None).
        """
        plan = plan if plan is not None else self.plan(model, input_size)
        return self.build(model, self.decide(model, plan, calibration=calibration))

    # ------------------------------------------------------------------- run
    def run(self, model: nn.Module, data: "Datasets", *, batch_size: int = 64, rt: "Runtime | None" = None,
            out: str | Path | None = None, resume: bool = False, plan: GroupingPlan | None = None,
            teacher: nn.Module | None = None) -> SelfGroupingResult:
        """The progressive schedule with fine-tuning on ``data`` (train and val splits).

        Every step re-clusters the current weights and prunes every planned layer ``j/steps`` of
        the way to its target; "local+global" then trains only the just-pruned layers for
        ``local_epochs``, and every scheme but "none" trains all weights. With ``out`` the state
        is checkpointed atomically after every pruning and epoch, and ``resume=True`` continues it.
        With ``distill`` > 0 fine-tuning also follows ``teacher``'s outputs (default: ``model`` as given).
        """
        from nas_grouping.self_grouping._finetune import run_schedule

        return run_schedule(self, model, data, batch_size=batch_size, rt=rt, out=out, resume=resume, plan=plan,
                            teacher=teacher)


def self_group(model: nn.Module, config: "SelfGroupingConfig | None" = None, *,
               input_size: Sequence[int] | None = None, data: "Datasets | None" = None, batch_size: int = 64,
               **overrides: Any) -> nn.Module:
    """Self-group ``model`` in one call and return the compressed module (``model`` is untouched).

    Without ``data`` the pass prunes in one shot (magnitude importance, no fine-tuning) and
    needs ``input_size``; with ``data`` (from :func:`~nas_grouping.data.load_datasets`) it runs
    the full schedule with fine-tuning, and the input size comes from the data.
    """
    sg = SelfGrouping(config, **overrides)
    if data is None:
        if input_size is None:
            raise ConfigError("self_group: give input_size=(C, H, W), or data= to fine-tune")
        return sg.apply(model, input_size)
    return sg.run(model, data, batch_size=batch_size).model
