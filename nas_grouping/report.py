"""Reports a person can read: CSV tables (pandas), JSON summaries and PNG plots of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from torch import nn

from nas_grouping.errors import ConfigError
from nas_grouping.files import atomic_write
from nas_grouping.macs import format_macs, layer_macs

__all__ = ["write_json", "read_json", "layer_table", "write_search_report", "format_summary", "print_run"]


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, default=str)
    return atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path.resolve()} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


def layer_table(before: nn.Module, after: nn.Module, input_size: Sequence[int]) -> pd.DataFrame:
    """One row per counted layer: channels, kernel, groups and MACs before/after (dense vs exported)."""
    rows_after = {r.name: r for r in layer_macs(after, input_size)}
    rows = []
    for r in layer_macs(before, input_size):
        a = rows_after.get(r.name)
        kh_kw = 1
        for k in r.kernel_size:
            kh_kw *= k
        positions = 1
        for s in r.output_size:
            positions *= s
        dense = r.in_channels * r.out_channels * kh_kw * positions if r.kind == "DGConv2d" else r.macs
        rows.append({
            "layer": r.name, "kind": r.kind, "in_channels": r.in_channels, "out_channels": r.out_channels,
            "kernel": "x".join(map(str, r.kernel_size)) or "-", "output_size": "x".join(map(str, r.output_size)) or "-",
            "groups": r.groups, "exported_kind": a.kind if a else None, "macs_dense": dense,
            "macs_after": a.macs if a else r.macs, "executed_macs_after": a.executed_macs if a else r.macs,
            "params_after": a.params if a else r.params,
        })
    df = pd.DataFrame(rows)
    df["macs_ratio"] = df["macs_after"] / df["macs_dense"]
    return df


def _plot_search(out: Path, history: pd.DataFrame, layers: pd.DataFrame, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.2))
    searched = layers[layers["kind"] == "DGConv2d"]
    ax[0].bar(range(len(searched)), searched["groups"], color="tab:blue")
    ax[0].set_xticks(range(len(searched)))
    ax[0].set_xticklabels(searched["layer"], rotation=70, fontsize=7)
    ax[0].set_yscale("log", base=2)
    ax[0].set_ylabel("learned groups")
    ax[0].set_title("groups per searched layer")
    e = history["epoch"]
    ax[1].plot(e, history["macs"] / summary["dense_macs"], "o-", color="tab:red", label="MACs / dense")
    ax[1].axhline(summary["budget_macs"] / summary["dense_macs"], ls="--", color="tab:red", alpha=0.6, label="budget")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("MACs / dense", color="tab:red")
    ax[1].set_ylim(0, 1.05)
    twin = ax[1].twinx()
    twin.plot(e, history["val_acc"], "s-", color="tab:green", label="val accuracy")
    twin.set_ylabel("validation accuracy", color="tab:green")
    ax[1].set_title("MACs and accuracy per epoch")
    lines = ax[1].get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax[1].legend(lines[0] + more[0], lines[1] + more[1], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "search.png", dpi=110)
    plt.close(fig)


def write_search_report(out: Path, searched: nn.Module, exported: nn.Module, input_size: Sequence[int],
                        history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """history.csv, layers.csv, summary.json and search.png in ``out``."""
    hist = pd.DataFrame([{k: v for k, v in row.items() if k != "groups"} for row in history])
    groups = pd.DataFrame([row["groups"] for row in history]).add_prefix("groups:")
    hist = pd.concat([hist, groups], axis=1)
    hist.to_csv(out / "history.csv", index=False)
    layers = layer_table(searched, exported, input_size)
    layers.to_csv(out / "layers.csv", index=False)
    write_json(out / "summary.json", summary)
    if len(hist):
        _plot_search(out, hist, layers, summary)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"validation accuracy {summary['val_acc']:.4f} (exported model)",
        format_macs(summary["macs"], summary.get("executed_macs"), summary["dense_macs"])
        + ("" if summary.get("dense") else
           f"; budget {summary['budget_macs']:,}: {'met' if summary['budget_met'] else 'NOT met'}"
           + (f" after {len(summary['projection_flips'])} projection change(s)" if summary.get("projected") else "")),
        f"parameters {summary['params']:,}; wall time {summary['wall_time_s']:.1f} s",
    ]
    lat = summary.get("latency")
    if lat:
        parts = [f"batch {k.split('_')[1]}: dense {v['dense_ms']:.2f} ms, exported {v['exported_ms']:.2f} ms "
                 f"({v['speedup']:.2f}x)" for k, v in lat.items() if k.startswith("batch_")]
        lines.append(f"measured latency ({lat['device']}, {lat['threads']} threads, each in its fastest layout): "
                     + "; ".join(parts))
        if lat.get("layers_file"):
            rest = [f"batch {k.split('_')[1]}: dense {v['dense_rest_ms']:.2f} ms, "
                    f"exported {v['exported_rest_ms']:.2f} ms"
                    for k, v in lat.items() if k.startswith("batch_") and "exported_rest_ms" in v]
            lines.append(f"per-layer latency in {lat['layers_file']} (.json, .png)"
                         + ("; outside the conv/linear layers (BN, ReLU, adds, gathers): " + "; ".join(rest)
                            if rest else ""))
    loop = summary.get("latency_measured_loop")
    if loop:
        lines.append(f"latency budget {loop['budget_ms']:.3f} ms measured (dense {loop['reference_ms']:.3f} ms): "
                     f"{'met' if loop['met'] else 'NOT met'}, {loop['measured_ms']:.3f} ms after "
                     f"{len(loop['tries'])} measured projection(s); the table predicted {loop['predicted_ms']:.3f} ms")
    if summary.get("groups"):
        lines.append("groups per layer: " + ", ".join(f"{k}={v}" for k, v in summary["groups"].items()))
    return "\n".join(lines)


def print_run(run_dir: str | Path) -> str:
    """The summary, per-layer table and (when measured) slowest layers of a run folder, as text."""
    run = Path(run_dir)
    summary = read_json(run / "summary.json")
    text = [f"run {run}", format_summary(summary)]
    if (run / "layers.csv").is_file():
        df = pd.read_csv(run / "layers.csv")
        cols = ["layer", "kind", "in_channels", "out_channels", "kernel", "groups", "macs_dense", "macs_after",
                "executed_macs_after"]
        text.append(df[[c for c in cols if c in df]].to_string(index=False))
    if (run / "latency_layers.csv").is_file():
        text.append(_slowest_layers(pd.read_csv(run / "latency_layers.csv")))
    return "\n".join(text)


def _slowest_layers(df: pd.DataFrame, top: int = 5) -> str:
    """The ``top`` layers with the largest exported time at the smallest measured batch (batch 1 by default)."""
    from nas_grouping.latency.layers import REST, WHOLE

    batches = sorted(int(c.rsplit("_b", 1)[1]) for c in df.columns if c.startswith("exported_ms_b"))
    if not batches or "layer" not in df:
        return "latency_layers.csv: no per-layer times"
    b = batches[0]
    layers = df[~df["layer"].isin([WHOLE, REST])].nlargest(top, f"exported_ms_b{b}")
    cols = ["layer", "exported_kind", "form", f"dense_ms_b{b}", f"exported_ms_b{b}", f"speedup_b{b}",
            f"predicted_ms_b{b}"]
    table = layers[[c for c in cols if c in layers]].to_string(index=False, float_format=lambda v: f"{v:.4f}",
                                                                na_rep="-")
    return f"slowest {len(layers)} exported layers at batch {b} (ms, from latency_layers.csv):\n{table}"
