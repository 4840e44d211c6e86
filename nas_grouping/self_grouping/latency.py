"""Latency budgets for the self-grouping pass: a measured table of each layer at each pruned fraction,
and the per-layer fractions that meet a budget.

The table times, on this machine, the layer the pass itself would build at each fraction
(magnitude importance, the pass's own k-means and pruning rule, so the group shapes are the
real ones), in its fastest exact form, on the tensor the layer sees in the model, in the
model's faster memory layout. The whole input model is timed too: what is not in a
prunable layer (BN, ReLU, adds, skipped layers) is a fixed base the budget must leave room for.

The fit starts from the plan's fractions (a MAC budget's, a fixed fraction, or none) and
raises, one step at a time, the fraction of the layer that buys the most latency per MAC
removed, until the predicted latency meets the budget; then steps that turned out not to be
needed are given back. Layers whose grouped forms never run faster than the input layer
(narrow layers on a CPU) are left alone: that is the point of budgeting latency.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.importance import magnitude_importance
from nas_grouping.latency.measure import (LatencyTable, input_layout, layer_inputs, measure_ms, parse_latency_budget,
                                          set_layout, table_meta)
from nas_grouping.latency.timer import median_ms
from nas_grouping.macs import check_input_size
from nas_grouping.ops.diverse_group import FORMS
from nas_grouping.self_grouping._cluster import balance_labels, centroid_prune, kmeans_labels
from nas_grouping.self_grouping._layers import Prunable

if TYPE_CHECKING:
    from nas_grouping.config import SelfGroupingConfig
    from nas_grouping.self_grouping.grouping import GroupingPlan

__all__ = ["profile_self_grouping", "fit_latency", "fastest_ms", "DEFAULT_FRACTIONS", "PASS_NAME"]

#: pruned fractions profiled per layer (each layer's cap is added)
DEFAULT_FRACTIONS = (0.25, 0.5, 0.625, 0.75, 0.875, 0.9375)
#: ``meta["pass"]`` of a self-grouping latency table
PASS_NAME = "self-grouping"
_SETTINGS = ("clusters", "cluster_sizes", "threshold", "kmeans_init", "kmeans_restarts", "seed", "exclude",
             "skip_first", "max_fraction", "linear_max_fraction")


def _settings(cfg: "SelfGroupingConfig") -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in _SETTINGS}


def profile_self_grouping(model: nn.Module, input_size: Sequence[int], config: "SelfGroupingConfig | None" = None,
                          *, batch: int = 1, fractions: Sequence[float] = DEFAULT_FRACTIONS, repeats: int = 10,
                          warmup: int = 3, layout: str | None = None) -> LatencyTable:
    """Latency of every layer the pass would prune, at each pruned fraction, in its fastest exact form.

    Rows: ``layer``, shapes, ``fraction`` (0 = the input layer, form ``input``), ``clusters``,
    ``form``, ``ms``; ``meta`` holds the device, torch version, threads, batch, layout, the
    whole input model's ``model_ms`` and the pass settings the shapes depend on.
    """
    from nas_grouping.config import SelfGroupingConfig
    from nas_grouping.self_grouping.grouping import SelfGrouping

    cfg = config or SelfGroupingConfig()
    size = check_input_size(input_size)
    grid = sorted({float(f) for f in fractions})
    if not grid or any(not 0 < f < 1 for f in grid):
        raise ConfigError(f"profile fractions must lie in (0, 1), got {list(fractions)}")
    plain = dataclasses.replace(cfg, budget=None, fraction=None, latency_budget=None, latency_table=None,
                                latency_measured=False)
    plan = SelfGrouping(plain).plan(model, size)
    model = copy.deepcopy(model).eval()
    if layout is None:
        layout = input_layout(model, size, batch, repeats, warmup)
    set_layout(model, layout)
    inputs = layer_inputs(model, [lp.name for lp in plan.prunable], size, batch, layout)
    rows: list[dict[str, Any]] = []
    for index, lp in enumerate(plan.prunable):
        if lp.name not in inputs:
            continue
        layer = Prunable(lp.name, model.get_submodule(lp.name) if lp.name else model)
        scores = magnitude_importance(layer)
        labels = kmeans_labels(scores, lp.clusters, seed=(cfg.seed + index) % 2**31, restarts=cfg.kmeans_restarts,
                               init=cfg.kmeans_init)
        if cfg.cluster_sizes == "equal":
            labels = balance_labels(scores, labels, lp.clusters)
        x = inputs[lp.name]
        candidates: dict[tuple[float, str], nn.Module] = {(0.0, "input"): copy.deepcopy(layer.module)}
        for f in sorted({f for f in grid if f < lp.cap} | {lp.cap}):
            keep = int(math.floor((1.0 - f) * lp.connections + 1e-9))
            d = centroid_prune(scores, layer.mask(), labels, keep, mode=cfg.threshold)
            built = layer.build(d.mask, d.groups).eval()
            for form in FORMS:
                c = copy.deepcopy(built)
                c.form = form
                candidates[f, form] = set_layout(c, layout)
        with torch.inference_mode():
            t = median_ms({k: (lambda m=m: m(x)) for k, m in candidates.items()}, warmup=warmup, repeats=repeats)
        shape = {"layer": lp.name, "kind": lp.kind, "in_channels": lp.in_channels, "out_channels": lp.out_channels,
                 "kernel": "x".join(map(str, lp.kernel_size)) or "-", "input_shape": "x".join(map(str, x.shape[1:])),
                 "clusters": lp.clusters}
        rows += [{**shape, "fraction": f, "form": form, "ms": ms} for (f, form), ms in t.items()]
    model_ms = measure_ms(model, size, batch=batch, layouts=(layout,), repeats=repeats, warmup=warmup)[layout]
    meta = {"pass": PASS_NAME, **table_meta(model, size, batch=batch, layout=layout, repeats=repeats, warmup=warmup,
                                            model_ms=model_ms), "settings": _settings(cfg)}
    return LatencyTable(meta=meta, rows=rows)


def _interp(curve: list[tuple[float, float]], f: float) -> float:
    """The table's ms at fraction ``f``, linear between profiled fractions."""
    for (f0, t0), (f1, t1) in zip(curve, curve[1:]):
        if f0 <= f <= f1:
            return t0 + (t1 - t0) * (f - f0) / (f1 - f0) if f1 > f0 else t0
    return curve[-1][1] if f > curve[-1][0] else curve[0][1]


def _curves(plan: "GroupingPlan", table: LatencyTable, config: "SelfGroupingConfig | None"
            ) -> tuple[dict[str, list[tuple[float, float]]], float, float]:
    """Per prunable layer, the table's (fraction, ms) up to its cap; the input model's ms; the base outside them."""
    if table.meta.get("pass") != PASS_NAME:
        raise ConfigError("this latency table was not made for the self-grouping pass; make one with "
                          "`nas-grouping profile --pass self-grouping` (or leave latency_table unset to profile now)")
    if config is not None and table.meta.get("settings", {}).get("clusters") not in (None, config.clusters):
        raise ConfigError(f"the latency table was profiled with clusters={table.meta['settings']['clusters']!r}, "
                          f"the pass uses {config.clusters!r}: profile again with the pass's settings")
    curves: dict[str, list[tuple[float, float]]] = {}
    for lp in plan.prunable:
        curve = table.curve(lp.name, "fraction")
        if not curve or curve[0][0] != 0:
            raise ConfigError(f"the latency table has no rows for layer {lp.name!r}: it was made for another model; "
                              "profile this model again")
        curves[lp.name] = [(f, t) for f, t in curve if f <= lp.cap + 1e-12]
    input_ms = float(table.meta["model_ms"])
    return curves, input_ms, max(0.0, input_ms - sum(c[0][1] for c in curves.values()))


def fastest_ms(plan: "GroupingPlan", table: LatencyTable, *, config: "SelfGroupingConfig | None" = None) -> float:
    """The table's time of ``plan`` with every prunable layer at its fastest fraction at or above the plan's."""
    curves, _, base = _curves(plan, table, config)
    start = {lp.name: float(lp.fraction or 0.0) for lp in plan.prunable}
    return base + sum(min(t for f, t in c if f >= start[n] - 1e-12) for n, c in curves.items())


def fit_latency(plan: "GroupingPlan", table: LatencyTable, budget: str | float, *,
                config: "SelfGroupingConfig | None" = None) -> "GroupingPlan":
    """Raise per-layer fractions of ``plan`` until the table predicts ``budget`` (ms, or a share of the
    input model's measured latency) is met; record the prediction on the plan and its layers.

    Raises:
        ConfigError: a table of another pass or another model (a prunable layer it lacks).
        BudgetError: even every layer at its fastest profiled fraction misses the budget.
    """
    curves, input_ms, base = _curves(plan, table, config)
    budget_ms = parse_latency_budget(budget, input_ms)
    macs = {lp.name: lp.macs for lp in plan.prunable}
    frac = {lp.name: float(lp.fraction or 0.0) for lp in plan.prunable}

    def total() -> float:
        return base + sum(_interp(curves[n], f) for n, f in frac.items())

    steps = []
    while total() > budget_ms:
        options = []
        for name, f in frac.items():
            now = _interp(curves[name], f)
            for g, t in curves[name]:
                if g > f + 1e-12 and now - t > 0:
                    options.append(((now - t) / max(macs[name] * (g - f), 1e-9), name, g))
        if not options:
            fastest = fastest_ms(plan, table, config=config)
            raise BudgetError(
                f"a latency budget of {budget_ms:.3f} ms at batch {table.meta.get('batch')} cannot be met: with "
                f"every prunable layer at its fastest profiled fraction the model is predicted at {fastest:.3f} ms "
                f"(input model {input_ms:.3f} ms, of which {base:.3f} ms outside the prunable layers: BN, "
                "activations, adds, skipped layers). Raise the budget or prune more layers (exclude fewer, "
                "skip_first off).")
        _, name, g = max(options)
        steps.append((name, frac[name]))
        frac[name] = g
    for name, before in reversed(steps):  # give back steps the budget did not need
        now = frac[name]
        frac[name] = before
        if total() > budget_ms:
            frac[name] = now
    layers = [lp if not lp.prune else
              dataclasses.replace(lp, prune=False, reason="left as it is: the latency budget holds without pruning it",
                                  fraction=None, predicted_ms=curves[lp.name][0][1]) if frac[lp.name] == 0 else
              dataclasses.replace(lp, fraction=frac[lp.name], predicted_ms=_interp(curves[lp.name], frac[lp.name]))
              for lp in plan.layers]
    latency = {"budget_ms": budget_ms, "predicted_ms": total(), "input_ms": input_ms, "base_ms": base,
               "batch": table.meta.get("batch"), "layout": table.meta.get("layout"), "device": table.meta.get("device")}
    return dataclasses.replace(plan, layers=layers, latency=latency)
