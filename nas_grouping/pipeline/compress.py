"""`nas-grouping compress`: self-group a saved model on a data set, fine-tune it, and write a run folder.

The model comes from a folder written by ``save_model`` (a search run folder works too:
its ``model/`` is used), or from a torchvision model name / registered space name plus a
state dict. The run folder holds ``config.json``, ``checkpoint.pt`` (resumable),
``history.csv``, ``layers.csv`` (per layer: clusters, group sizes, kept connections,
MACs before/after the pass, or why it was skipped), ``channels.json`` (with ``--channels``:
the share of coupled channels removed before the pass, and how ``auto`` found it),
``latency_layers.csv/json/png`` (per layer: input vs compressed latency at each batch, the
latency table's prediction), ``summary.json`` (accuracy before, after pruning and after
fine-tuning; MACs; CPU latency of both models) and ``model/``, the
compressed model, loadable with ``load_model``.

Search then compress is two calls: ``nas-grouping search --out runs/s`` then
``nas-grouping compress --model runs/s --budget 0.5``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from nas_grouping.budget import MacBudget
from nas_grouping.channels.pruning import ChannelPruning
from nas_grouping.config import CompressConfig, SelfGroupingConfig, check_same_settings, config_to_dict, with_defaults
from nas_grouping.data import load_datasets
from nas_grouping.errors import ConfigError, ExportError, RunExistsError
from nas_grouping.export.model import load_model, save_model
from nas_grouping.export.records import RECIPE_ATTR
from nas_grouping.files import check_run_folder, claim_run_folder
from nas_grouping.latency.layers import WHOLE, layer_latency, summary_from_layers, write_layer_latency
from nas_grouping.latency.measure import (LAYOUTS, LatencyTable, MeasuredLatency, choose_fastest_forms,
                                          parse_latency_budget, sample_models)
from nas_grouping.macs import count_macs, count_parameters, format_macs, layer_macs, mac_counts
from nas_grouping.report import read_json, write_json
from nas_grouping.runtime import Runtime, setup_runtime
from nas_grouping.self_grouping.grouping import GroupingPlan, LayerOutcome, SelfGrouping, SelfGroupingResult
from nas_grouping.self_grouping.latency import profile_self_grouping
from nas_grouping.training import epoch_loader, evaluate

__all__ = ["compress", "CompressResult", "load_source_model", "measure_latency", "layer_table", "format_summary"]

logger = logging.getLogger(__name__)

#: CompressConfig fields that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset({"out", "device", "precision", "channels_last", "latency_batches", "latency_repeats"})


@dataclass
class CompressResult:
    """What ``compress`` returns: both models, the per-layer table, the history and the summary it wrote."""

    model: nn.Module
    original: nn.Module
    summary: dict[str, Any]
    layers: pd.DataFrame
    history: list[dict[str, Any]]
    run_dir: Path


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"state dict {file.resolve()} does not exist; pass the file written by "
                          "torch.save(model.state_dict(), path)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ExportError(f"{file} is not a readable state dict ({type(exc).__name__}: {exc}); expected a file "
                          "written by torch.save(model.state_dict(), path)") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{file} holds a {type(state).__name__}, not a state dict of tensors (nor a checkpoint "
                          "with one under 'model' or 'state_dict')")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_source_model(cfg: CompressConfig, *, num_classes: int, in_channels: int) -> tuple[nn.Module, dict[str, Any]]:
    """The model to compress (in eval mode, on the CPU) and facts about where it came from.

    Raises:
        ExportError: no saved model in the folder, an unreadable or mismatched state dict.
        ConfigError: an unknown architecture name; a search run made on another data set.
    """
    info: dict[str, Any] = {}
    if cfg.model is not None:
        folder = Path(cfg.model)
        if (folder / "architecture.json").is_file():
            model = load_model(folder)
        elif (folder / "model" / "architecture.json").is_file():
            model = load_model(folder / "model")
            if (folder / "config.json").is_file():
                run_cfg = read_json(folder / "config.json")
                run_data = (run_cfg.get("data") or {}).get("dataset") if isinstance(run_cfg, dict) else None
                info["run_dataset"] = run_data
                if run_data is not None and run_data != cfg.data.dataset:
                    raise ConfigError(f"{folder} was trained on {run_data!r} but the data set is "
                                      f"{cfg.data.dataset!r}; pass --dataset {run_data} (and its --data-dir)")
        else:
            raise ExportError(f"no saved model at {folder.resolve()}: expected architecture.json and weights.pt "
                              "there (save_model), or a search run folder holding model/")
        info["source"] = str(folder)
    else:
        from search_spaces import get_space, list_spaces

        kwargs = {"num_classes": num_classes, "in_channels": in_channels, **cfg.arch_kwargs}
        if cfg.arch in list_spaces():
            model = get_space(cfg.arch, dense=True, **kwargs)
        else:
            model = get_space("torchvision", name=cfg.arch, dense=True, **kwargs)
        state = _read_state_dict(cfg.state_dict)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ExportError(f"{cfg.state_dict} does not fit {cfg.arch} built for {num_classes} classes and "
                              f"{in_channels} input channels: {str(exc).splitlines()[0]} ... Check --arch, "
                              "--arch-kwargs and the data set.") from exc
        info["source"] = f"{cfg.arch} + {cfg.state_dict}"
    return model.cpu().eval(), info


def _check_outputs(model: nn.Module, input_size: Sequence[int], num_classes: int) -> None:
    with torch.no_grad():
        try:
            out = model(torch.zeros(1, *input_size))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"the model does not run on the data set's inputs of size {tuple(input_size)}: "
                              f"{exc}") from exc
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ConfigError(f"the model outputs shape {tuple(out.shape)} but the data set has {num_classes} classes")


def measure_latency(models: dict[str, nn.Module], input_size: Sequence[int], batch_sizes: Sequence[int], *,
                    repeats: int = 10, warmup: int = 3) -> list[dict[str, Any]]:
    """CPU inference latency (median ms) of each model in NCHW and channels-last, taking turns.

    One row per (batch, model) with ``nchw_ms``, ``channels_last_ms``, ``ms`` (the faster)
    and ``layout``: a fair comparison puts each model in its fastest layout. ``min_ms`` is the
    fastest single call in that layout, a cross-check when other work shares the machine.
    """
    rows = []
    cpu = {name: copy.deepcopy(model).cpu() for name, model in models.items()}
    for batch in batch_sizes:
        samples = sample_models(cpu, input_size, batch=batch, repeats=repeats, warmup=warmup)
        for name in models:
            nchw, cl = (statistics.median(samples[name, layout]) for layout in LAYOUTS)
            layout = "nchw" if nchw <= cl else "channels_last"
            rows.append({"batch": batch, "model": name, "nchw_ms": nchw, "channels_last_ms": cl,
                         "ms": min(nchw, cl), "layout": layout, "min_ms": min(samples[name, layout])})
    return rows


def _layer_macs_by(model: nn.Module, input_size: Sequence[int], names: Sequence[str]
                   ) -> dict[str, tuple[int, int]]:
    """(structural, executed) MACs under each name, from one counting pass."""
    rows = layer_macs(model, input_size)
    sums = {}
    for n in names:
        inside = [r for r in rows if not n or r.name == n or r.name.startswith(n + ".")]
        sums[n] = (sum(r.macs for r in inside), sum(r.executed_macs for r in inside))
    return sums


def layer_table(plan: GroupingPlan, outcomes: Sequence[LayerOutcome], before: nn.Module, after: nn.Module,
                input_size: Sequence[int]) -> pd.DataFrame:
    """One row per conv/linear layer of the plan: what was done (or why not), groups, connections, MACs."""
    names = [lp.name for lp in plan.layers]
    macs_before = _layer_macs_by(before, input_size, names)
    macs_after = _layer_macs_by(after, input_size, names)
    by_name = {o.name: o for o in outcomes}
    rows = []
    for lp in plan.layers:
        o = by_name.get(lp.name)
        layer_after = after.get_submodule(lp.name) if lp.name else after
        rows.append({
            "layer": lp.name, "kind": lp.kind, "kind_after": type(layer_after).__name__,
            "in_channels": lp.in_channels, "out_channels": lp.out_channels,
            "kernel": "x".join(map(str, lp.kernel_size)) or "-", "pruned": lp.prune, "reason": lp.reason,
            "clusters": lp.clusters, "clusters_found": o.clusters if o else None,
            "groups": len(o.group_sizes) if o else None,
            "group_sizes": " ".join(f"{f}x{s}" for f, s in zip(o.group_sizes, o.group_inputs)) if o else None,
            "connections_before": lp.connections if lp.prune else None,
            "kept_connections": o.kept if o else None,
            "target_fraction": lp.fraction,
            "pruned_fraction": (1 - o.kept / lp.connections) if o and lp.connections else None,
            "macs_before": macs_before[lp.name][0], "macs_after": macs_after[lp.name][0],
            "executed_macs_after": macs_after[lp.name][1],
        })
    df = pd.DataFrame(rows)
    for column in ("clusters", "clusters_found", "groups", "connections_before", "kept_connections"):
        df[column] = df[column].astype("Int64")
    df["macs_ratio"] = df["macs_after"] / df["macs_before"].where(df["macs_before"] > 0)
    return df


def format_summary(s: dict[str, Any]) -> str:
    """A few readable lines of a compress summary."""
    def acc(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [
        f"accuracy: before {acc(s['val_acc_before'])}, after pruning {acc(s['val_acc_pruned'])}, "
        f"after fine-tuning {acc(s['val_acc_after'])}",
        format_macs(s["macs_after"], s.get("executed_macs_after"), s["macs_before"], of="the input's")
        + f" ({s['mac_reduction']:.2f}x fewer)"
        + (f"; budget {s['budget_macs']:,}: {'met' if s['budget_met'] else 'NOT met'}"
           if s.get("budget_macs") is not None else ""),
        f"parameters {s['params_before']:,} -> {s['params_after']:,}; {len(s['pruned_layers'])} layers pruned, "
        f"{len(s['skipped_layers'])} skipped",
    ]
    if s.get("channel_pruning"):
        c = s["channel_pruning"]
        lines.insert(1, f"channel pruning: {c['share']:.3f} of every set of coupled channels removed "
                        f"({c['macs_after_channels']:,} MACs/sample), accuracy {acc(s['val_acc_channels'])} before "
                        "self-grouping")
    if s.get("latency_budget_ms") is not None:
        lines.append(f"latency budget {s['latency_budget_ms']:.3f} ms at batch {s['latency_batch']}: predicted "
                     f"{s['latency_predicted_ms']:.3f} ms, measured {s['latency_measured_ms']:.3f} ms (prediction "
                     f"error {s['latency_prediction_error']:+.0%}): "
                     + ("met" if s["latency_budget_met_measured"] else "NOT met as measured"))
    for row in s.get("speedup", []):
        lines.append(f"CPU latency at batch {row['batch']}: {row['input_ms']:.3f} ms ({row['input_layout']}) -> "
                     f"{row['compressed_ms']:.3f} ms ({row['compressed_layout']}), speed-up {row['speedup']:.2f}x")
    slower = [row["batch"] for row in s.get("speedup", []) if row["speedup"] < 1]
    if slower and (s.get("cluster_sizes"), s.get("threshold")) != ("equal", "cluster"):
        lines.append(f"hint: not faster at batch {', '.join(map(str, slower))}. Groups of uneven sizes and widths make "
                     "the diverse group kernels pad or split (and layers under ~64 channels are overhead-bound on "
                     "CPUs); --cluster-sizes equal --threshold cluster --clusters 2 give uniform groups that run as "
                     "one grouped kernel (`nas-grouping bench compress` compares them)")
    return "\n".join(lines)


def _accuracy(model: nn.Module, ds: Any, rt: Runtime) -> float | None:
    """Validation accuracy of ``model`` as it is (the input model, when channel pruning changes it first)."""
    if not len(ds.val):
        return None
    loader = epoch_loader(ds.val, rt, batch_size=256, train=False, seed=0, epoch=0)
    return evaluate(copy.deepcopy(model).to(rt.device), loader, rt)["acc"]


def _check_resume(out: Path, cfg: CompressConfig) -> None:
    """The saved settings of the run folder must match ``cfg`` but for the ones a resumption may change."""
    saved = read_json(out / "config.json") if (out / "config.json").is_file() else None
    if saved is None:
        return
    saved = with_defaults(CompressConfig, saved)
    now = config_to_dict(cfg)
    for values in (saved, now):
        if isinstance(values.get("grouping"), dict):
            values["grouping"] = {k: v for k, v in values["grouping"].items() if k != "progress"}
    check_same_settings(saved, now, allowed=RESUMABLE_CHANGES, where=out)


def _check_checkpoint(out: Path, cfg: CompressConfig, resume: bool) -> None:
    """With ``resume``, a checkpoint made with the same settings must be there; without it, none may be."""
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise ConfigError(f"no checkpoint in {out.resolve()}: nothing to resume; run without --resume")
        _check_resume(out, cfg)
    elif (out / "checkpoint.pt").exists():
        raise RunExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")


def _prune_channels(cfg: CompressConfig, original: nn.Module, input_size: Sequence[int], rt: Runtime, out: Path,
                    resume: bool) -> tuple[nn.Module, SelfGroupingConfig, dict[str, Any] | None]:
    """Channel pruning before the pass (``cfg.channels``): the narrowed model, the self-grouping settings with
    budget shares made absolute against the input model (so they stay shares of it), and what was done.

    The input model's latency (with a latency budget) and the share ``auto`` finds are measured once,
    on rank 0, broadcast, and kept in ``channels.json`` so that ``--resume`` prunes the same channels.
    """
    grouping = cfg.grouping
    if cfg.channels is None:
        return original, grouping, None
    pruning = ChannelPruning(original, input_size)
    saved = out / "channels.json"
    if resume and saved.is_file():
        record = read_json(saved)
    else:
        def measured() -> dict[str, Any]:
            record = _channel_record(cfg, pruning, original, input_size)
            out.mkdir(parents=True, exist_ok=True)
            write_json(saved, record)
            return record

        record = rt.on_main(measured, "channel pruning")
    narrowed = pruning.prune(record["share"])
    changes: dict[str, Any] = {}
    if grouping.budget is not None:
        changes["budget"] = MacBudget.parse(grouping.budget).resolve(count_macs(original, input_size))
    if record["input_ms"] is not None:
        changes["latency_budget"] = f"{parse_latency_budget(grouping.latency_budget, record['input_ms'])}ms"
    info = {"share": record["share"], "sets": len(pruning.prunable()), "input_ms": record["input_ms"],
            "macs_after_channels": count_macs(narrowed, input_size), "search": record["search"]}
    return narrowed, dataclasses.replace(grouping, **changes), info


def _channel_record(cfg: CompressConfig, pruning: ChannelPruning, original: nn.Module,
                    input_size: Sequence[int]) -> dict[str, Any]:
    """The share of channels to remove (``auto``: found by measurement) and the input model's measured time,
    which a latency budget is judged against."""
    grouping = cfg.grouping
    record: dict[str, Any] = {"share": cfg.channels, "input_ms": None, "search": None}
    lat = grouping.latency_budget
    if lat is None:
        return record
    measure = MeasuredLatency(original, input_size, batch=grouping.latency_batch)
    record["input_ms"] = measure.reference_ms
    if cfg.channels == "auto":  # the latency alone: the MAC budget is left to the pass that follows
        logger.info("[nas-grouping] finding the share of channels whose measured latency meets the budget ...")
        budget_ms = parse_latency_budget(lat, record["input_ms"])
        _, share, search = pruning.prune_to_latency(budget_ms, measure)
        record.update(share=share, search={**search, "budget_ms": budget_ms})
    return record


def _latency_table(grouping: SelfGroupingConfig, model: nn.Module, input_size: Sequence[int], rt: Runtime, out: Path,
                   resume: bool) -> "LatencyTable | None":
    """The self-grouping latency table of a latency budget: the run's own on resume (so the plan is the same),
    else the configured file, else profiled now by the main process and shared through the run folder."""
    if grouping.latency_budget is None:
        return None
    saved = out / "latency_table.json"
    if resume and saved.is_file():
        return LatencyTable.load(saved)
    if grouping.latency_table:
        return LatencyTable.load(grouping.latency_table)
    if rt.is_main:
        logger.info("[nas-grouping] profiling each prunable layer's latency at batch %d on this machine ...",
                    grouping.latency_batch)
        out.mkdir(parents=True, exist_ok=True)
        profile_self_grouping(model, input_size, grouping, batch=grouping.latency_batch).save(saved)
    rt.barrier()
    return LatencyTable.load(saved)


def _measured_fit(sg: SelfGrouping, model: nn.Module, input_size: Sequence[int], table: LatencyTable | None,
                  rt, out: Path, resume: bool) -> dict[str, Any] | None:
    """A measured latency fit (``latency_measured``) made once: on rank 0, broadcast, and kept in the run
    folder (``latency_measured.json``) so a resumed run plans the same layers without measuring again."""
    from nas_grouping.self_grouping.grouping import MEASURED_KEYS

    cfg = sg.config
    if cfg.latency_budget is None or not cfg.latency_measured:
        return None
    saved = out / "latency_measured.json"
    if resume and saved.is_file():
        return read_json(saved)

    def measured() -> dict[str, Any]:
        lat = sg.plan(model, input_size, latency_table=table).latency
        fit = {k: lat[k] for k in MEASURED_KEYS}
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved, fit)
        return fit

    return rt.on_main(measured, "the measured latency fit")


def _latency_summary(plan: GroupingPlan, per_layer: pd.DataFrame | None, input_ms: float | None = None
                     ) -> dict[str, Any]:
    """The plan's predicted latency beside the compressed model's measured one (latency budgets), the
    measurement being the per-layer report's whole-model row at the plan's batch. ``input_ms``: the
    input model's measured time when the pass got a channel-pruned model (its budget is of the input's)."""
    if plan.latency is None or per_layer is None:
        return {}
    lat = plan.latency
    at = summary_from_layers(per_layer)[f"batch_{lat['batch']}"]
    measured = at["exported_ms"]
    out = {"latency_budget_ms": lat["budget_ms"], "latency_predicted_ms": lat["predicted_ms"],
           "latency_measured_ms": measured, "latency_prediction_error": (lat["predicted_ms"] - measured) / measured,
           "latency_input_ms_table": lat["input_ms"], "latency_batch": lat["batch"],
           "latency_budget_met_predicted": lat["predicted_ms"] <= lat["budget_ms"],
           "latency_budget_met_measured": measured <= lat["budget_ms"]}
    if "measured_budget_ms" in lat:  # a measured budget: the user's is the measured one, judged by the ratio to
        # the input model timed beside the compressed one (this report's clock may differ from the loop's)
        ratio_met = measured / at["dense_ms"] <= lat["measured_budget_ms"] / (input_ms or lat["reference_ms"])
        out.update(latency_budget_ms=lat["measured_budget_ms"], latency_table_budget_ms=lat["budget_ms"],
                   latency_budget_met_measured=ratio_met,
                   latency_measured_loop={k: lat[k] for k in ("reference_ms", "measured_ms", "measured_met",
                                                              "measured_tries", "table_target_ms")})
    return out


@dataclass
class _CompressRun:
    """The state a compression carries from stage to stage (settings, runtime, data, models, plan, paths)."""

    cfg: CompressConfig
    resume: bool
    rt: Runtime
    out: Path
    ds: Any
    input_size: tuple[int, ...]
    original: nn.Module
    source: dict[str, Any]
    narrowed: nn.Module
    channels: dict[str, Any] | None
    sg: SelfGrouping
    plan: GroupingPlan
    start_time: float


@dataclass
class _Measured:
    """The compressed model on the CPU (in its fastest forms) and what was measured of it beside the input model."""

    model: nn.Module
    forms: dict[str, Any] | None
    per_layer: pd.DataFrame | None
    macs_before: int
    macs_after: int
    executed_macs_after: int
    layers: pd.DataFrame
    latency: list[dict[str, Any]]
    speedup: list[dict[str, Any]]


def compress(cfg: CompressConfig, *, resume: bool = False) -> CompressResult:
    """Self-group the model of ``cfg`` on its data set, fine-tune, and write the run folder ``cfg.out``.

    Raises:
        BudgetError: a budget the prunable layers cannot reach (before any training).
        ConfigError / DataError / ExportError: bad settings, data or model files (before any training).
    """
    start_time = time.perf_counter()
    run = _prepare(cfg, resume, start_time)
    if run.rt.is_main:
        _start(run)
    result = _group(run)
    measured = _measure(run, result)
    summary = _summarize(run, result, measured)
    if run.rt.is_main:
        _write_run(run, result, measured, summary)
    run.rt.barrier()
    return CompressResult(model=measured.model, original=run.original, summary=summary, layers=measured.layers,
                          history=result.history, run_dir=run.out)


def _prepare(cfg: CompressConfig, resume: bool, start_time: float) -> _CompressRun:
    """Runtime, data, the input model, channel pruning and the plan: every check that needs no training."""
    if not isinstance(cfg, CompressConfig):
        raise TypeError(f"cfg must be a CompressConfig, got {type(cfg).__name__}")
    rt = setup_runtime(cfg.device, cfg.precision, cfg.channels_last)
    out = Path(cfg.out)
    rt.on_main(lambda: check_run_folder(out, "compress"), "checking the run folder")
    ds = load_datasets(cfg.data)
    input_size = (ds.in_channels, *ds.input_size)
    original, source = load_source_model(cfg, num_classes=ds.num_classes, in_channels=ds.in_channels)
    _check_outputs(original, input_size, ds.num_classes)
    _check_checkpoint(out, cfg, resume)
    narrowed, grouping, channels = _prune_channels(cfg, original, input_size, rt, out, resume)
    sg = SelfGrouping(grouping)
    plan = _plan(sg, narrowed, input_size, rt, out, resume)
    return _CompressRun(cfg=cfg, resume=resume, rt=rt, out=out, ds=ds, input_size=input_size, original=original,
                        source=source, narrowed=narrowed, channels=channels, sg=sg, plan=plan, start_time=start_time)


def _plan(sg: SelfGrouping, model: nn.Module, input_size: Sequence[int], rt: Runtime, out: Path,
          resume: bool) -> GroupingPlan:
    """The pass's plan for ``model``, with the latency table and measured fit a latency budget needs."""
    table = _latency_table(sg.config, model, input_size, rt, out, resume)
    return sg.plan(model, input_size, latency_table=table,
                   measured=_measured_fit(sg, model, input_size, table, rt, out, resume))


def _start(run: _CompressRun) -> None:
    """On rank 0: claim the run folder, record the settings and data split, and say what runs."""
    claim_run_folder(run.out, "compress")
    write_json(run.out / "config.json", config_to_dict(run.cfg))
    if run.ds.split is not None:
        write_json(run.out / "data_split.json", run.ds.split)
    _announce(run)


def _announce(run: _CompressRun) -> None:
    """The log lines that open a run: the channels pruned (with ``--channels``), then the plan."""
    cfg, channels, plan = run.cfg, run.channels, run.plan
    if channels is not None:
        logger.info(f"[nas-grouping] channel pruning: {channels['share']:.3f} of every set of coupled channels "
                    f"removed, {count_macs(run.original, run.input_size):,} -> {channels['macs_after_channels']:,} "
                    "MACs/sample" + ("" if not channels["search"] else
                                     f"; measured {channels['search']['measured_ms']:.3f} ms against a budget of "
                                     f"{channels['search']['budget_ms']:.3f} ms: "
                                     + ("met" if channels["search"]["met"] else "NOT met (the fastest share tried)")))
    logger.info(f"[nas-grouping] compress {run.source['source']} on {run.ds.name}: {plan.macs:,} MACs/sample, "
                + (f"budget {plan.budget_macs:,} (global fraction {plan.global_fraction:.3f})"
                   if plan.budget_macs is not None else
                   "fractions per layer" if plan.latency else f"fraction {cfg.grouping.target_fraction}")
                + (f", latency budget {plan.latency['budget_ms']:.3f} ms at batch {plan.latency['batch']} "
                   f"(predicted {plan.latency['predicted_ms']:.3f} ms)" if plan.latency else "")
                + f", {len(plan.prunable)} layers to prune, {len(plan.skipped)} skipped, device {run.rt.device}")


def _group(run: _CompressRun) -> SelfGroupingResult:
    """The self-grouping pass and its fine-tuning, checkpointed in the run folder (continued with ``resume``)."""
    return run.sg.run(run.narrowed, run.ds, batch_size=run.cfg.data.batch_size, rt=run.rt, out=run.out,
                      resume=run.resume, plan=run.plan, teacher=run.original)


def _measure(run: _CompressRun, result: SelfGroupingResult) -> _Measured:
    """MACs, the per-layer table and CPU latency of the compressed model beside the input model."""
    cfg, input_size = run.cfg, run.input_size
    compressed, forms, per_layer = _fastest_forms(run, result.model)
    macs_before = count_macs(run.original, input_size)
    macs_after, executed_after = mac_counts(compressed, input_size)
    layers = layer_table(run.plan, result.outcomes, run.narrowed, compressed, input_size)
    latency = measure_latency({"input": run.original, "compressed": compressed}, input_size, cfg.latency_batches,
                              repeats=cfg.latency_repeats) if cfg.latency_batches else []
    return _Measured(model=compressed, forms=forms, per_layer=per_layer, macs_before=macs_before,
                     macs_after=macs_after, executed_macs_after=executed_after, layers=layers, latency=latency,
                     speedup=_speedup(latency, cfg.latency_batches))


def _fastest_forms(run: _CompressRun, model: nn.Module
                   ) -> tuple[nn.Module, dict[str, Any] | None, pd.DataFrame | None]:
    """The compressed model on the CPU; with latency batches, on rank 0, in its fastest exact forms and with
    every layer timed beside the input model's (and the plan's predictions)."""
    cfg, plan = run.cfg, run.plan
    compressed = copy.deepcopy(model).cpu().eval()
    if not (cfg.latency_batches and run.rt.is_main):
        return compressed, None, None
    compressed, forms = choose_fastest_forms(compressed, run.input_size, batch=cfg.grouping.latency_batch)
    predicted = {lp.name: lp.predicted_ms for lp in plan.layers if lp.predicted_ms is not None}
    if plan.latency is not None:
        predicted[WHOLE] = plan.latency["predicted_ms"]
    per_layer = layer_latency(run.original, compressed, run.input_size,
                              batches=sorted({*cfg.latency_batches, cfg.grouping.latency_batch}),
                              predicted=predicted or None, predicted_batch=cfg.grouping.latency_batch,
                              repeats=cfg.latency_repeats)
    return compressed, forms, per_layer


def _speedup(latency: list[dict[str, Any]], batches: Sequence[int]) -> list[dict[str, Any]]:
    """Per batch: each model's latency in its fastest layout, and how many times faster the compressed one is."""
    speedup = []
    for batch in batches:
        a = next(r for r in latency if r["batch"] == batch and r["model"] == "input")
        b = next(r for r in latency if r["batch"] == batch and r["model"] == "compressed")
        speedup.append({"batch": batch, "input_ms": a["ms"], "input_layout": a["layout"], "compressed_ms": b["ms"],
                        "compressed_layout": b["layout"], "speedup": a["ms"] / b["ms"]})
    return speedup


def _summarize(run: _CompressRun, result: SelfGroupingResult, measured: _Measured) -> dict[str, Any]:
    """The run's summary: accuracy at each stage, MACs against the budget, parameters, layers, latency."""
    cfg, plan, channels, forms = run.cfg, run.plan, run.channels, measured.forms
    return {
        "source": run.source["source"], "dataset": run.ds.name, "input_size": list(run.input_size),
        "val_acc_before": result.val_acc("input") if channels is None else _accuracy(run.original, run.ds, run.rt),
        "val_acc_channels": None if channels is None else result.val_acc("input"),
        "channel_pruning": channels, "val_acc_pruned": result.val_acc("pruned"),
        "val_acc_after": result.history[-1]["val_acc"],
        "macs_before": measured.macs_before, "macs_after": measured.macs_after,
        "executed_macs_after": measured.executed_macs_after,
        "mac_reduction": measured.macs_before / max(measured.macs_after, 1),
        "macs_fraction": measured.macs_after / max(measured.macs_before, 1), "planned_macs_at_most": plan.macs_after,
        "budget_macs": plan.budget_macs, "global_fraction": plan.global_fraction,
        "budget_met": None if plan.budget_macs is None else measured.macs_after <= plan.budget_macs,
        "params_before": count_parameters(run.original), "params_after": count_parameters(measured.model),
        "pruned_layers": [lp.name for lp in plan.prunable],
        "skipped_layers": {lp.name: lp.reason for lp in plan.skipped},
        "steps": cfg.grouping.steps, "finetune": cfg.grouping.finetune, "importance": cfg.grouping.importance,
        "clusters": cfg.grouping.clusters, "cluster_sizes": cfg.grouping.cluster_sizes,
        "threshold": cfg.grouping.threshold,
        "latency": measured.latency, "speedup": measured.speedup, "threads": torch.get_num_threads(),
        "export_choice": None if forms is None else {"batch": forms["batch"], "layout": forms["layout"], "forms": {
            name: row["form"] for name, row in forms["layers"].items()}},
        **_latency_summary(plan, measured.per_layer, None if channels is None else channels["input_ms"]),
        "layers_latency_file": None if measured.per_layer is None else "latency_layers.csv",
        "device": str(run.rt.device), "wall_time_s": time.perf_counter() - run.start_time,
    }


def _write_run(run: _CompressRun, result: SelfGroupingResult, measured: _Measured, summary: dict[str, Any]) -> None:
    """On rank 0: history, layer tables, the per-layer latency files, the saved model (checked by reloading it)
    and the summary, then the summary's lines in the log."""
    out = run.out
    pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
    measured.layers.to_csv(out / "layers.csv", index=False)
    if measured.per_layer is not None:
        write_layer_latency(measured.per_layer, out)
    recipe = getattr(run.original, RECIPE_ATTR, None)
    save_model(measured.model, out / "model", recipe=recipe, extra={
        **{k: summary[k] for k in ("val_acc_after", "macs_before", "macs_after", "budget_macs", "dataset", "source")},
        "input_size": list(run.input_size)})
    summary["reload_max_abs_diff"] = _reload_diff(out / "model", measured.model, run.input_size)
    write_json(out / "summary.json", summary)
    logger.info(format_summary(summary))


def _reload_diff(folder: Path, model: nn.Module, input_size: Sequence[int]) -> float:
    """How far the saved model, loaded back, is from ``model`` on a random batch (0 when saving lost nothing)."""
    reloaded = load_model(folder).eval()
    x = torch.randn(8, *input_size)
    with torch.no_grad():
        return float((reloaded(x) - model(x)).abs().max())
