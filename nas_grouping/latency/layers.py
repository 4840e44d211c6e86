"""Per-layer latency of a dense and an exported model, side by side, with the table's predictions.

A model-level speedup hides where the time goes: an exported model can have
cheaper convolutions and still run slower, because of what lies outside them
(channel gathers, BN, ReLU, adds) or because one layer's grouped form is slower
than its dense one. ``layer_latency`` times every conv/linear layer of both
models on the exact input it sees in the forward pass, each model in its own
faster memory layout, and adds the whole model and the ``(rest)`` outside the
layers, so the overhead shows as a number. Timing practice as in ``bench.timing``:
warm-up, interleaved repetitions, median.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from nas_grouping.errors import ConfigError
from nas_grouping.files import atomic_write
from nas_grouping.latency.measure import LAYOUTS, example_input, fastest_layouts, measured_on, set_layout
from nas_grouping.latency.timer import median_ms
from nas_grouping.macs import check_input_size, count_macs, layer_macs
from nas_grouping.ops.dgconv import DGConv2d
from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear
from nas_grouping.ops.group_conv import PermutedGroupConv2d

__all__ = ["layer_latency", "plot_layer_latency", "write_layer_latency", "summary_from_layers",
           "WHOLE", "REST", "LAYOUTS"]

WHOLE = "(whole model)"
REST = "(rest)"
FILE_STEM = "latency_layers"
#: layer types timed as one unit (their inner convolutions are not timed again)
UNIT_LAYERS = (PermutedGroupConv2d, DiverseGroupConv2d, DiverseGroupLinear, DGConv2d)


def _timed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Exported layer types and the leaf conv/linear modules outside them, by module name."""
    found: dict[str, nn.Module] = {}
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(c == "" or name.startswith(c + ".") for c in claimed):
            continue
        if isinstance(module, UNIT_LAYERS):
            claimed.append(name)
            found[name] = module
        elif isinstance(module, (_ConvNd, nn.Linear)) and next(module.children(), None) is None:
            found[name] = module
    return found


def _check_batches(batches: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(dict.fromkeys(int(b) for b in batches))
    except (TypeError, ValueError):
        raise ConfigError(f"batches must be batch sizes such as (1, 32), got {batches!r}") from None
    if not out or any(b < 1 for b in out):
        raise ConfigError(f"batches must be one or more batch sizes >= 1, got {tuple(batches)!r}")
    return out


def _device(model: nn.Module) -> torch.device:
    ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def _capture_inputs(model: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, Tensor]:
    """The input each named layer gets in one forward pass of ``x`` (cloned: later in-place ops cannot alter it)."""
    inputs: dict[str, Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach().clone())) for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _macs_by_name(model: nn.Module, size: tuple[int, ...], which: str) -> dict[str, int]:
    try:
        return {r.name: r.macs for r in layer_macs(model, size)}
    except ConfigError as exc:
        raise ConfigError(f"layer_latency: the {which} model: {exc}") from exc


def layer_latency(dense: nn.Module, exported: nn.Module, input_size: Sequence[int], *,
                  batches: Sequence[int] = (1, 32), predicted: dict[str, float] | None = None,
                  predicted_batch: int = 1, repeats: int = 10, warmup: int = 3) -> pd.DataFrame:
    """Measured latency (ms) of every conv/linear layer of ``dense`` and ``exported``, matched by module name.

    One row per layer (a layer in one model only has NaN on the other side), then
    ``(whole model)`` and ``(rest)`` = whole minus the timed layers (BN, ReLU, adds,
    gathers: the overhead outside the layers). Per batch b: ``dense_ms_b{b}``,
    ``exported_ms_b{b}``, ``speedup_b{b}``; with ``predicted`` (layer name or
    ``"(whole model)"`` -> ms, e.g. from a latency table) also
    ``predicted_ms_b{predicted_batch}`` and ``prediction_error_b{predicted_batch}`` =
    (predicted - measured) / measured against the exported model. Each layer runs
    alone on the input it gets in the forward pass, in its model's faster layout
    (chosen per batch on the whole model); dense and exported layers take turns.
    ``df.attrs`` holds the device, threads, torch version and the layouts.
    """
    size = check_input_size(input_size)
    batch_list = _check_batches(batches)
    if predicted is not None and predicted_batch not in batch_list:
        raise ConfigError(f"predicted_batch {predicted_batch} must be one of the measured batches {batch_list}")
    models = {"dense": copy.deepcopy(dense).eval(), "exported": copy.deepcopy(exported).eval()}
    layers = {k: _timed_layers(m) for k, m in models.items()}
    if not layers["dense"] and not layers["exported"]:
        raise ConfigError("layer_latency: neither model has a conv or linear layer to time")
    macs = {k: _macs_by_name(m, size, k) for k, m in models.items()}
    used = {k: [n for n in layers[k] if n in macs[k]] for k in models}  # layers the forward pass reaches
    names = list(dict.fromkeys(used["dense"] + used["exported"]))
    if predicted is not None:
        unknown = sorted(set(predicted) - set(names) - {WHOLE, REST})
        if unknown:
            raise ConfigError(f"layer_latency: predicted times for layers the models do not have: {unknown}; "
                              f"layers: {names}")
    device = _device(models["exported"])
    nan = float("nan")
    rows: dict[str, dict[str, Any]] = {}
    for n in names:
        d = layers["dense"][n] if n in used["dense"] else None
        e = layers["exported"][n] if n in used["exported"] else None
        rows[n] = {"layer": n, "dense_kind": type(d).__name__ if d is not None else None,
                   "exported_kind": type(e).__name__ if e is not None else None,
                   "form": getattr(e, "form", None) if e is not None else None,
                   "dense_macs": macs["dense"].get(n) if d is not None else None,
                   "exported_macs": macs["exported"].get(n) if e is not None else None}
    totals = {k: count_macs(m, size) for k, m in models.items()}
    whole: dict[str, Any] = {"layer": WHOLE, "dense_kind": None, "exported_kind": None, "form": None,
                             "dense_macs": totals["dense"], "exported_macs": totals["exported"]}
    rest: dict[str, Any] = {**whole, "layer": REST}
    layouts: dict[str, dict[str, str]] = {}
    for b in batch_list:
        best = fastest_layouts(models, size, batch=b, repeats=repeats, warmup=warmup)
        layouts[f"b{b}"] = {k: v[0] for k, v in best.items()}
        for k, m in models.items():
            set_layout(m, best[k][0])  # outside inference mode: parameters must stay normal tensors
        with torch.inference_mode():
            inputs = {k: _capture_inputs(m, used[k], example_input(size, b, best[k][0], m)) for k, m in models.items()}
            for n in names:
                fns = {k: (lambda mod=layers[k][n], x=inputs[k][n]: mod(x))
                       for k in models if n in inputs[k]}
                t = median_ms(fns, warmup=warmup, repeats=repeats)
                rows[n][f"dense_ms_b{b}"] = t.get("dense", nan)
                rows[n][f"exported_ms_b{b}"] = t.get("exported", nan)
        for k in models:
            whole[f"{k}_ms_b{b}"] = best[k][1]
            rest[f"{k}_ms_b{b}"] = best[k][1] - sum(r[f"{k}_ms_b{b}"] for r in rows.values()
                                                    if not math.isnan(r[f"{k}_ms_b{b}"]))
    df = pd.DataFrame([*rows.values(), whole, rest])
    for k in models:
        df.loc[df["layer"] == REST, f"{k}_macs"] = totals[k] - sum(macs[k].get(n, 0) for n in used[k])
        df[f"{k}_macs"] = df[f"{k}_macs"].astype("Int64")
    for b in batch_list:
        df[f"speedup_b{b}"] = df[f"dense_ms_b{b}"] / df[f"exported_ms_b{b}"]
    cols = ["layer", "dense_kind", "exported_kind", "form", "dense_macs", "exported_macs"]
    cols += [f"{c}_b{b}" for b in batch_list for c in ("dense_ms", "exported_ms", "speedup")]
    df = df[cols]
    if predicted is not None:
        pb = predicted_batch
        df[f"predicted_ms_b{pb}"] = [float(predicted[n]) if n in predicted else nan for n in df["layer"]]
        measured = df[f"exported_ms_b{pb}"]
        df[f"prediction_error_b{pb}"] = (df[f"predicted_ms_b{pb}"] - measured) / measured
    df.attrs.update({**measured_on(device), "input_size": list(size), "batches": list(batch_list), "layouts": layouts,
                     "repeats": repeats, "warmup": warmup, "statistic": "median",
                     "predicted_batch": predicted_batch if predicted is not None else None})
    return df


def summary_from_layers(df: pd.DataFrame) -> dict[str, Any]:
    """The whole-model and ``(rest)`` numbers of a ``layer_latency`` frame, per batch, as a summary dict."""
    row = df.set_index("layer")
    out: dict[str, Any] = {k: df.attrs.get(k) for k in ("device", "threads", "torch")}
    for b in df.attrs.get("batches", []):
        lay = df.attrs.get("layouts", {}).get(f"b{b}", {})
        w, r = row.loc[WHOLE], row.loc[REST]
        out[f"batch_{b}"] = {"dense_ms": float(w[f"dense_ms_b{b}"]), "dense_layout": lay.get("dense"),
                             "exported_ms": float(w[f"exported_ms_b{b}"]), "exported_layout": lay.get("exported"),
                             "speedup": float(w[f"speedup_b{b}"]), "dense_rest_ms": float(r[f"dense_ms_b{b}"]),
                             "exported_rest_ms": float(r[f"exported_ms_b{b}"])}
    return out


def _ms_columns(df: pd.DataFrame) -> list[int]:
    return [int(c.rsplit("_b", 1)[1]) for c in df.columns if c.startswith("exported_ms_b")]


def plot_layer_latency(df: pd.DataFrame, path: str | Path) -> Path:
    """A PNG: per layer, dense vs exported ms at each batch (one panel per batch), predictions marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = df[df["layer"] != WHOLE].reset_index(drop=True)
    batches = _ms_columns(df)
    if not batches:
        raise ConfigError("plot_layer_latency: the frame has no exported_ms_b<batch> column; "
                          "pass what layer_latency returns")
    whole = df[df["layer"] == WHOLE]
    y = list(range(len(parts)))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches) + 1.5, 1.2 + 0.32 * max(len(parts), 4)),
                             squeeze=False, sharey=True)
    for ax, b in zip(axes[0], batches):
        h = 0.38
        ax.barh([v - h / 2 for v in y], parts[f"dense_ms_b{b}"].fillna(0), height=h, color="tab:gray", label="dense")
        ax.barh([v + h / 2 for v in y], parts[f"exported_ms_b{b}"].fillna(0), height=h, color="tab:blue",
                label="exported")
        pred = f"predicted_ms_b{b}"
        if pred in parts and parts[pred].notna().any():
            ax.plot(parts[pred], [v + h / 2 for v in y], "kx", markersize=7, label="predicted (table)")
        ax.axvline(0, color="black", lw=0.6)
        title = f"batch {b}"
        if len(whole):
            w = whole.iloc[0]
            lay = df.attrs.get("layouts", {}).get(f"b{b}", {})
            title += (f": whole dense {w[f'dense_ms_b{b}']:.3f} ms ({lay.get('dense', '?')}), "
                      f"exported {w[f'exported_ms_b{b}']:.3f} ms ({lay.get('exported', '?')})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("median latency (ms)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    labels = [f"{r.layer} [{r.form}]" if isinstance(r.form, str) else r.layer for r in parts.itertuples()]
    axes[0][0].set_yticks(y)
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    a = df.attrs
    fig.suptitle(f"per-layer latency on {a.get('device', '?')}, {a.get('threads', '?')} threads, "
                 f"torch {a.get('torch', '?')} (each layer alone, on its forward-pass input)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_layer_latency(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """``latency_layers.csv``, ``latency_layers.json`` (records and attrs) and ``latency_layers.png`` in ``out_dir``."""
    out = Path(out_dir)
    csv = atomic_write(out / f"{FILE_STEM}.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    text = json.dumps({"attrs": df.attrs, "records": json.loads(df.to_json(orient="records"))}, indent=1,
                      default=str)
    js = atomic_write(out / f"{FILE_STEM}.json", lambda f: f.write(text.encode()))
    png = plot_layer_latency(df, out / f"{FILE_STEM}.png")
    return {"csv": csv, "json": js, "png": png}
