"""Measured latency: the fastest exact form of exported layers, and per-layer latency tables.

Fewer MACs is not the goal, a faster model is. On CPUs a grouped convolution on
a narrow layer can be slower than the dense one, and the memory layout alone can
change a layer's time several times over (see the project's notes). So the
exporter times the exact forms of each exported layer (grouped conv between
channel gathers, or one dense conv on the block-structured weight) in the
model's faster layout, on the machine it runs on, and keeps the fastest; the
choice is recorded in the saved architecture. ``profile_layers`` measures each
searchable layer at every candidate group count, with contiguous and permuted
groups apart, and saves a table keyed by device, torch version, threads and shapes.

Timing practice: warm-up, interleaved repetitions, median, thread count recorded;
freed memory kept in the process (``keep_freed_memory``) for steady CPU timings.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from nas_grouping.budget import parse_latency_budget
from nas_grouping.convert import dgconv_layers
from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.export.model import export_model, replace_layer
from nas_grouping.export.records import LAYOUT_ATTR, records_of
from nas_grouping.files import atomic_write
from nas_grouping.latency.timer import enough_repeats, freed_memory_kept, keep_freed_memory, median_ms, sample_ms
from nas_grouping.macs import check_input_size
from nas_grouping.ops.dgconv import DGConv2d
from nas_grouping.ops.group_conv import PermutedGroupConv2d

__all__ = ["gate_pattern", "keep_freed_memory", "device_name", "measured_on", "table_meta", "sample_models",
           "fastest_layouts", "measure_ms", "choose_fastest_forms", "latency_report", "LatencyTable", "profile_layers",
           "LatencyCost", "MeasuredLatency", "meet_measured_budget", "parse_latency_budget", "LatencyDeviceWarning"]

#: the memory layouts every model is timed in; it counts in the faster one
LAYOUTS = ("nchw", "channels_last")
#: group patterns of a DGConv2d's binary gates: gates off on the outermost channel bits give
#: contiguous groups (a plain grouped conv); any other off set needs channel gathers
CONTIGUOUS, PERMUTED = "contiguous", "permuted"
PATTERNS = (CONTIGUOUS, PERMUTED)


def gate_pattern(gates: Sequence[float] | Tensor) -> str:
    """"contiguous" when the binary gates that are off are the first ones (outermost bits), else "permuted"."""
    g = [float(v) > 0.5 for v in gates]
    off = g.count(False)
    return CONTIGUOUS if not any(g[:off]) else PERMUTED


class LatencyDeviceWarning(UserWarning):
    """A latency table measured on another device, torch version or thread count."""


def device_name(device: torch.device | str = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu:{platform.processor() or platform.machine()}"


def measured_on(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a time was measured: device name, thread count, torch version (what a table is keyed by)."""
    return {"device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__}


def set_layout(model: nn.Module, layout: str) -> nn.Module:
    """``model`` in the memory layout ``layout`` (nchw or channels_last), in place."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return model.to(memory_format=fmt)


def example_input(input_size: Sequence[int], batch: int, layout: str, like: nn.Module) -> Tensor:
    """A seeded random batch in ``layout`` on the device of ``like``'s parameters."""
    ref = next(like.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    x = torch.randn(batch, *input_size, device=device, generator=torch.Generator(device=device).manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and x.dim() == 4 else x


def as_deployed(model: nn.Module, input_size: Sequence[int], batch: int) -> nn.Module:
    """What a user deploys: our inference layers as the standard modules of their forms (no per-call
    Python work), so that timings are those of the exported model; search models (DGConv2d) stay as they are."""
    from nas_grouping.export.deploy import deployable
    from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear

    kinds = {type(m) for m in model.modules()}
    if DGConv2d in kinds or not kinds & {PermutedGroupConv2d, DiverseGroupConv2d, DiverseGroupLinear}:
        return model
    return deployable(model, input_size, batch=batch)


def sample_models(models: dict[str, nn.Module], input_size: Sequence[int], *, batch: int = 1,
                  layouts: Sequence[str] = LAYOUTS, repeats: int = 10, warmup: int = 3
                  ) -> dict[tuple[str, str], list[float]]:
    """Wall times (ms) of every model in every layout, keyed (name, layout), each as deployed
    (:func:`as_deployed`); all take turns, so a noisy neighbour slows them alike (``timer.sample_ms``)."""
    size = check_input_size(input_size)
    fns = {}
    for name, model in models.items():
        shipped = as_deployed(model, size, batch)
        for layout in layouts:
            m = set_layout(copy.deepcopy(shipped).eval(), layout)  # outside inference mode: parameters stay normal
            fns[name, layout] = (lambda m=m, x=example_input(size, batch, layout, m): m(x))
    with torch.inference_mode():
        return sample_ms(fns, warmup=warmup, repeats=repeats)


def fastest_layouts(models: dict[str, nn.Module], input_size: Sequence[int], *, batch: int = 1, repeats: int = 10,
                    warmup: int = 3) -> dict[str, tuple[str, float]]:
    """(faster layout, its median ms) of every model, all models in both layouts measured side by side."""
    t = {k: statistics.median(v) for k, v in sample_models(models, input_size, batch=batch, repeats=repeats,
                                                             warmup=warmup).items()}
    best = {name: min(LAYOUTS, key=lambda lay: t[name, lay]) for name in models}
    return {name: (layout, t[name, layout]) for name, layout in best.items()}


def measure_ms(model: nn.Module, input_size: Sequence[int], *, batch: int = 1, layouts: Sequence[str] = ("nchw",),
               repeats: int = 10, warmup: int = 3) -> dict[str, float]:
    """Median inference latency (ms) of ``model`` in each memory layout, measured side by side."""
    samples = sample_models({"model": model}, input_size, batch=batch, layouts=layouts, repeats=repeats,
                            warmup=warmup)
    return {layout: statistics.median(v) for (_, layout), v in samples.items()}


def input_layout(model: nn.Module, input_size: Sequence[int], batch: int, repeats: int, warmup: int) -> str:
    """The memory layout in which the whole ``model`` runs faster at ``batch``."""
    return fastest_layouts({"model": model}, input_size, batch=batch, repeats=repeats, warmup=warmup)["model"][0]


def _with_forms(layer: nn.Module) -> tuple[nn.Module, tuple[str, ...]] | None:
    """The layer (wrapped if needed) and its exact forms, for layers whose form can be chosen."""
    from nas_grouping.ops.diverse_group import FORMS as DIVERSE_FORMS, DiverseGroupConv2d, DiverseGroupLinear
    from nas_grouping.ops.group_conv import FORMS as GROUP_FORMS

    if isinstance(layer, PermutedGroupConv2d):
        return layer, GROUP_FORMS
    if type(layer) is nn.Conv2d and layer.groups > 1:
        return PermutedGroupConv2d.from_conv(layer), GROUP_FORMS
    if isinstance(layer, (DiverseGroupConv2d, DiverseGroupLinear)):
        return layer, DIVERSE_FORMS
    return None


def _exported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers whose form can be chosen: the layers that differ from the base network (what ``save_model`` records)."""
    records, _ = records_of(model)
    return [(name, model.get_submodule(name)) for name in records
            if _with_forms(model.get_submodule(name)) is not None]


def layer_inputs(model: nn.Module, names: list[str], input_size: Sequence[int], batch: int,
                 layout: str) -> dict[str, Tensor]:
    """The input each named layer sees in one forward pass of an example batch."""
    inputs: dict[str, Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach())) for n in names]
    try:
        with torch.inference_mode():
            model(example_input(input_size, batch, layout, model))
    finally:
        for h in handles:
            h.remove()
    return inputs


def choose_fastest_forms(model: nn.Module, input_size: Sequence[int], *, batch: int = 1, repeats: int = 20,
                         warmup: int = 3, inplace: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Pick, on this machine, the faster memory layout for the whole model and the fastest exact
    form of every exported layer (group convs: grouped or dense-on-block-weight; diverse-group
    layers: grouped, per_group or dense).

    Returns the model (forms set, layout applied, recorded for ``save_model``) and a report with
    every timing. Outputs are unchanged up to float rounding: every form is exact.
    """
    size = check_input_size(input_size)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    whole = measure_ms(target, size, batch=batch, layouts=LAYOUTS, repeats=repeats,
                       warmup=warmup)
    layout = min(whole, key=whole.get)
    set_layout(target, layout)
    layers = _exported_layers(target)
    inputs = layer_inputs(target, [n for n, _ in layers], size, batch, layout)
    report: dict[str, Any] = {"batch": batch, "layout": layout, "model_ms": whole, "layers": {},
                              **measured_on(next(target.parameters()).device)}
    for name, layer in layers:
        if name not in inputs:
            continue
        candidate, forms = _with_forms(layer)
        x = inputs[name]
        copies = {}
        for form in forms:
            copies[form] = copy.deepcopy(candidate)
            copies[form].form = form
        with torch.inference_mode():
            t = median_ms({f: (lambda m=m: m(x)) for f, m in copies.items()}, warmup=warmup, repeats=repeats)
        best = min(t, key=t.get)
        report["layers"][name] = {**{f"{f}_ms": ms for f, ms in t.items()}, "form": best,
                                  "groups": getattr(candidate, "groups", None) if not isinstance(
                                      getattr(candidate, "groups", None), tuple) else len(candidate.groups)}
        if candidate is layer or best != "grouped" or not isinstance(candidate, PermutedGroupConv2d):
            candidate.form = best
            replace_layer(target, name, candidate)
    setattr(target, LAYOUT_ATTR, layout)
    return target, report


def _steady_ms(time_with: Callable[[int], float], repeats: int) -> tuple[float, int]:
    """A time measured with at least ``repeats`` repetitions, raised toward a second of calls
    (``enough_repeats``) after a first measurement; returns it and the repetitions used."""
    first = time_with(repeats)
    enough = enough_repeats(first, repeats)
    return (time_with(enough) if enough > repeats else first), enough


class MeasuredLatency:
    """The measured whole-model latency (ms) of a DGConv model's export, at one batch size on this machine.

    Each call exports the model (gathers folded, fastest exact forms and layout chosen) and
    times it side by side with ``reference`` (the dense model), each in its faster layout; the
    time is scaled by the reference's first measurement (``reference_ms``), so drift of the
    machine between calls cancels and a budget that is a share of ``reference_ms`` is met
    exactly when the measured ratio is. ``repeats`` is raised toward about a second of calls
    (at most 50), for the whole models and the per-layer form choice alike. A table predicts;
    this is what counts (``search.project_to_measured_latency`` closes the loop with it).
    """

    def __init__(self, reference: nn.Module, input_size: Sequence[int], *, batch: int = 1, repeats: int = 5,
                 warmup: int = 2) -> None:
        self.reference = copy.deepcopy(reference).eval()
        self.input_size = check_input_size(input_size)
        self.batch, self.repeats, self.warmup = batch, repeats, warmup
        self._reference_ms: float | None = None
        self.calls = 0

    def _time(self, models: dict[str, nn.Module]) -> dict[str, float]:
        t = fastest_layouts(models, self.input_size, batch=self.batch, repeats=self.repeats, warmup=self.warmup)
        return {name: ms for name, (_, ms) in t.items()}

    @property
    def reference_ms(self) -> float:
        """The reference's time, with repetitions raised toward a second of calls (``enough_repeats``)."""
        if self._reference_ms is None:
            self._reference_ms, self.repeats = _steady_ms(
                lambda repeats: fastest_layouts({"reference": self.reference}, self.input_size, batch=self.batch,
                                                repeats=repeats, warmup=self.warmup)["reference"][1], self.repeats)
        return self._reference_ms

    def export(self, model: nn.Module) -> nn.Module:
        """The exported model as it would be shipped: folded, fastest forms and layout at this batch."""
        exported = export_model(model).eval()
        return choose_fastest_forms(exported, self.input_size, batch=self.batch, repeats=self.repeats,
                                    warmup=self.warmup, inplace=True)[0]

    def __call__(self, model: nn.Module) -> float:
        reference_ms = self.reference_ms
        t = self._time({"reference": self.reference, "model": self.export(model)})
        self.calls += 1
        return t["model"] * reference_ms / t["reference"]


def meet_measured_budget(attempt: Callable[[float | None], dict[str, Any]], budget_ms: float, *,
                         table_dense_ms: float, reference_ms: float, floor: float, tries: int = 4,
                         tolerance: float = 0.05) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The table target whose result, *measured*, meets ``budget_ms``: the secant method on measurements.

    ``attempt(target)`` makes a model for a table target (ms in the table's units) and returns
    a dict with ``measured_ms``, ``_reached`` (the table's time of what it made) and ``stuck``
    (the table had nothing faster), or raises ``BudgetError`` when another budget forbids that
    target; ``attempt(None)`` makes the model without a latency target (the fallback when no
    target succeeds). Keys starting with ``_`` (the caller's state) stay on the chosen try only.
    The first target is ``budget_ms`` in table units (by the dense times); the next ones
    interpolate between the closest measured points on both sides of the budget, the dense
    model (``table_dense_ms``, ``reference_ms``) included, or extrapolate from the two fastest;
    a target at or under ``floor`` (raised by conflicts and stuck tries), or one after two tries
    on the same side of the budget, is replaced by halving the bracket. Stops within
    ``tolerance`` under the budget, when a stuck try misses it, or after ``tries``. Returns the
    chosen try (the least pruned that met the budget, else the fastest) and every try.
    """
    tried: list[dict[str, Any]] = []
    points = [(table_dense_ms, reference_ms)]  # (table target, measured ms)
    target = max(budget_ms * table_dense_ms / reference_ms, floor)
    for _ in range(tries):
        try:
            result = {"table_target_ms": target, **attempt(target)}
        except BudgetError:
            floor = max(floor, target)
        else:
            result["met"] = result["measured_ms"] <= budget_ms
            tried.append(result)
            points.append((result["_reached"] if result["stuck"] else target, result["measured_ms"]))
            if budget_ms * (1 - tolerance) <= result["measured_ms"] <= budget_ms:
                break
            if result["stuck"]:
                floor = max(floor, result["_reached"])
                if not result["met"]:
                    break  # nothing faster is within reach of the table
        lows = [p for p in points if p[1] <= budget_ms]
        highs = [p for p in points if p[1] > budget_ms]
        if not highs:
            break  # even the dense model meets the budget
        (t0, m0), (t1, m1) = (max(lows), min(highs)) if lows else sorted(points)[:2] if len(points) > 1 \
            else (points[0], points[0])
        nxt = t0 + (budget_ms - m0) * (t1 - t0) / (m1 - m0) if t1 != t0 and m1 > m0 else math.nan
        one_sided = len(tried) >= 2 and tried[-1]["met"] == tried[-2]["met"]  # a curved response: bisect once
        if not nxt > floor or (one_sided and lows):  # (also under what the table or another budget allows)
            nxt = (max([floor] + [t for t, _ in lows]) + min(highs)[0]) / 2
        if math.isclose(nxt, target, rel_tol=1e-3):
            break
        target = nxt
    if not tried:  # every target conflicted with another budget: that budget alone
        result = {"table_target_ms": None, **attempt(None)}
        result["met"] = result["measured_ms"] <= budget_ms
        tried.append(result)
    met = [t for t in tried if t["met"]]
    best = max(met, key=lambda t: t["measured_ms"]) if met else min(tried, key=lambda t: t["measured_ms"])
    return best, [{k: v for k, v in t.items() if not k.startswith("_")} for t in tried]


def latency_report(dense: nn.Module, exported: nn.Module, input_size: Sequence[int], *,
                   batches: Sequence[int] = (1, 32), repeats: int = 10) -> dict[str, Any]:
    """Measured latency of the dense and the exported model, side by side, each in its fastest layout."""
    out: dict[str, Any] = measured_on(next(exported.parameters()).device)
    for batch in batches:
        t = fastest_layouts({"dense": dense, "exported": exported}, input_size, batch=batch, repeats=repeats)
        (d_layout, d), (e_layout, e) = t["dense"], t["exported"]
        out[f"batch_{batch}"] = {"dense_ms": d, "dense_layout": d_layout, "exported_ms": e,
                                 "exported_layout": e_layout, "speedup": d / e}
    return out


@dataclass
class LatencyTable:
    """Measured latency (ms) of layers at candidate group counts, with where it was measured."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def lookup(self, layer: str, groups: int, form: str | None = None, pattern: str = PERMUTED) -> float:
        """The table's latency of ``layer`` at ``groups`` (the faster form unless ``form`` is given).

        ``pattern`` is "permuted" (groups that need channel gathers) or "contiguous" (plain
        ``nn.Conv2d(groups=G)``); tables without contiguous rows (older ones) answer with the
        permuted time, an upper bound.
        """
        if pattern not in PATTERNS:
            raise ConfigError(f"latency table lookup: pattern must be one of {PATTERNS}, got {pattern!r}")

        def hits(p: str) -> list[float]:
            return [r["ms"] for r in self.rows if r["layer"] == layer and r["groups"] == groups
                    and (form is None or r["form"] == form)
                    and (groups == 1 or r.get("pattern", PERMUTED) == p)]

        found = hits(pattern) or (hits(PERMUTED) if pattern == CONTIGUOUS else [])
        if not found:
            raise ConfigError(f"latency table has no row for layer {layer!r} at groups={groups}"
                              + (f", form {form}" if form else "") + "; profile this model again")
        return min(found)

    def curve(self, layer: str, key: str) -> list[tuple[float, float]]:
        """(``key`` value, fastest ms over forms) of ``layer``'s rows, sorted; ``key`` is groups or fraction."""
        best: dict[float, float] = {}
        for r in self.rows:
            if r["layer"] == layer and key in r:
                best[r[key]] = min(best.get(r[key], math.inf), r["ms"])
        return sorted(best.items())

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (JSON with meta and rows) and a CSV of the rows beside it."""
        import pandas as pd

        path = Path(path)
        text = json.dumps({"meta": self.meta, "rows": self.rows}, indent=1)
        atomic_write(path, lambda f: f.write(text.encode()))
        pd.DataFrame(self.rows).to_csv(path.with_suffix(".csv"), index=False)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> "LatencyTable":
        """Read a table; warn when it was measured on another device, torch version or thread count."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no latency table at {path.resolve()}; make one with `nas-grouping profile`")
        try:
            data = json.loads(path.read_text())
            table = cls(meta=data["meta"], rows=data["rows"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a latency table written by nas-grouping: {exc}") from exc
        here = measured_on(device)
        differs = {k: (table.meta.get(k), v) for k, v in here.items() if table.meta.get(k) != v}
        if differs:
            detail = ", ".join(f"{k}: table {a!r}, here {b!r}" for k, (a, b) in differs.items())
            warnings.warn(f"latency table {path} was measured elsewhere ({detail}); its numbers may not hold "
                          "here: profile again on this machine", LatencyDeviceWarning, stacklevel=2)
        return table


def profile_layers(model: nn.Module, input_size: Sequence[int], *, batch: int = 1, repeats: int = 10,
                   warmup: int = 3, layout: str | None = None) -> LatencyTable:
    """Latency of every DGConv2d layer of ``model`` at every group count it can take, in each
    group pattern and exact form.

    For G > 1 the grouped form is timed twice: with contiguous groups (gates off on the
    outermost channel bits: a plain grouped conv) and with permuted ones (off on the innermost
    bits: the grouped conv between two channel gathers, the general case). The dense form runs
    the same dense convolution whatever G and the pattern, so it is timed once per layer and its
    time is given to every G. All candidates of a layer are timed side by side on the tensor the
    layer sees. ``layout`` defaults to the faster one for the dense model.
    """
    size = check_input_size(input_size)
    model = copy.deepcopy(model).eval()
    if layout is None:
        layout = input_layout(model, size, batch, repeats, warmup)
    set_layout(model, layout)
    layers = dgconv_layers(model)
    if not layers:
        raise ConfigError("profile_layers: the model has no DGConv2d layer to profile")
    inputs = layer_inputs(model, [n for n, _ in layers], size, batch, layout)
    from nas_grouping.export.model import export_layer

    def candidate(probe: DGConv2d, gates: list[int], form: str) -> nn.Module:
        probe.set_gates(gates)
        exported = export_layer(probe).eval()
        c = exported if isinstance(exported, PermutedGroupConv2d) else PermutedGroupConv2d.from_conv(exported)
        c.form = form
        return set_layout(c, layout)

    rows = []
    for name, layer in layers:
        x = inputs[name]
        probe, k = copy.deepcopy(layer), layer.num_gates
        shape = {"layer": name, "in_channels": layer.in_channels, "out_channels": layer.out_channels,
                 "kernel": "x".join(map(str, layer.kernel_size)), "stride": layer.stride[0],
                 "input_hw": "x".join(map(str, x.shape[2:]))}
        runs: dict[tuple[int, str, str], nn.Module] = {(1, CONTIGUOUS, "grouped"): candidate(probe, [1] * k, "grouped")}
        for off in range(1, k + 1):
            runs[(2**off, CONTIGUOUS, "grouped")] = candidate(probe, [0] * off + [1] * (k - off), "grouped")
            runs[(2**off, PERMUTED, "grouped")] = candidate(probe, [1] * (k - off) + [0] * off, "grouped")
        runs[(0, "", "dense")] = candidate(probe, [0] * k, "dense")
        with torch.inference_mode():
            t = median_ms({key: (lambda c=c: c(x)) for key, c in runs.items()}, warmup=warmup, repeats=repeats)
        dense_form = t.pop((0, "", "dense"))
        for (groups, pattern, form), ms in t.items():
            rows.append({**shape, "groups": groups, "pattern": pattern, "form": form, "ms": ms})
            rows.append({**shape, "groups": groups, "pattern": pattern, "form": "dense", "ms": dense_form})
    dense = copy.deepcopy(model)
    for _, layer in dgconv_layers(dense):
        layer.set_groups(1)
    whole = export_model(dense)
    model_ms, _ = _steady_ms(lambda n: measure_ms(whole, size, batch=batch, layouts=(layout,), repeats=n,
                                                  warmup=warmup)[layout], repeats)
    meta = table_meta(model, size, batch=batch, layout=layout, repeats=repeats, warmup=warmup, model_ms=model_ms)
    return LatencyTable(meta=meta, rows=rows)


def table_meta(model: nn.Module, input_size: Sequence[int], *, batch: int, layout: str, repeats: int, warmup: int,
               model_ms: float) -> dict[str, Any]:
    """The ``meta`` of a profiled latency table: where and how it was measured, and the whole model's time."""
    return {**measured_on(next(model.parameters()).device), "freed_memory_kept": freed_memory_kept(),
            "batch": batch, "input_size": list(input_size),
            "layout": layout, "repeats": repeats, "warmup": warmup, "statistic": "median", "model_ms": model_ms}


class LatencyCost:
    """Predicted latency (ms) of a model with DGConv2d layers, from a measured table, differentiable in the gates.

    Each layer's latency is the table's (faster form) value at its group count
    G = 2^n, n = number of gates off, for its group pattern: contiguous groups (the
    gates off are the first ones: a plain grouped conv) or permuted ones (channel
    gathers). The expected latency is the permuted curve interpolated linearly in
    n = sum(1 - g), so a gate's gradient is the latency that turning one more gate off
    saves, plus, for each m, (contiguous - permuted time at 2^m groups) times the
    probability that exactly the first m gates are off (gates read as independent
    probabilities): exact at binary gates, and it rewards turning the outer gates off first.
    The part of the model that is not searched costs ``base_ms`` = the table's whole dense
    model minus its dense searchable layers.
    """

    def __init__(self, model: nn.Module, table: LatencyTable) -> None:
        #: (name, layer, times): times[0] the permuted, times[1] the contiguous curve over n = 0..K
        self.layers: list[tuple[str, DGConv2d, Tensor]] = []
        for name, layer in dgconv_layers(model):
            values = [[table.lookup(name, 2**n, pattern=p) for n in range(layer.num_gates + 1)]
                      for p in (PERMUTED, CONTIGUOUS)]
            self.layers.append((name, layer, torch.tensor(values, dtype=torch.float64)))
        if "model_ms" not in table.meta:
            raise ConfigError("the latency table has no whole-model time (model_ms); profile the model again")
        self.base_ms = max(0.0, float(table.meta["model_ms"]) - sum(float(v[0, 0]) for _, _, v in self.layers))
        self.batch = int(table.meta.get("batch", 1))

    @staticmethod
    def _at(values: Tensor, n_off: Tensor) -> Tensor:
        k = values.numel() - 1
        n = int(min(max(float(n_off.detach()), 0.0), k - 1)) if k > 0 else 0
        values = values.to(n_off.dtype)
        if k == 0:
            return values[0] + 0 * n_off
        return values[n] + (n_off - n) * (values[n + 1] - values[n])

    @staticmethod
    def _layer_expected(values: Tensor, g: Tensor) -> Tensor:
        values = values.to(g.dtype)
        term = LatencyCost._at(values[0], (1 - g).sum())
        for m in range(1, g.numel() + 1):
            prefix = torch.prod(1 - g[:m]) * torch.prod(g[m:])
            term = term + prefix * (values[1, m] - values[0, m])
        return term

    def expected_ms(self) -> Tensor:
        terms = [self._layer_expected(v, layer.gates()) for _, layer, v in self.layers]
        return self.base_ms + torch.stack(terms).sum() if terms else torch.tensor(self.base_ms)

    @staticmethod
    def layer_ms(values: Tensor, gates: Sequence[float] | Tensor) -> float:
        """The table's time of one layer (``values`` of ``self.layers``) at binary ``gates``."""
        off = sum(1 for v in gates if float(v) < 0.5)
        return float(values[1 if gate_pattern(gates) == CONTIGUOUS else 0, off])

    def current_ms(self) -> float:
        return self.base_ms + sum(self.layer_ms(v, layer.gate_values()) for _, layer, v in self.layers)

    @property
    def dense_ms(self) -> float:
        return self.base_ms + sum(float(v[0, 0]) for _, _, v in self.layers)

    @property
    def minimum_ms(self) -> float:
        return self.base_ms + sum(float(v.min()) for _, _, v in self.layers)

    def check_budget(self, budget_ms: float) -> None:
        if budget_ms < self.minimum_ms:
            raise BudgetError(
                f"a latency budget of {budget_ms:.3f} ms cannot be met: the fastest group count of every "
                f"layer still gives {self.minimum_ms:.3f} ms (dense {self.dense_ms:.3f} ms, of which "
                f"{self.base_ms:.3f} ms in layers that are not searched), at batch {self.batch}"
            )
