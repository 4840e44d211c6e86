"""Deployed speed: ONNX Runtime (CPU) latency of our exports against the dense model exported the same way.

The speed benchmark times models in PyTorch eager; what ships is a file run by an inference
runtime, whose kernels (and whose handling of grouped convolutions) differ. For each network
(a CIFAR ResNet-56 at 32x32, a torchvision ResNet-50 at 224x224; random weights: latency does
not depend on them) and each MAC budget (a share of the dense MACs), these models are built:

- ``dense``: the DGConv network with every gate on, exported (plain convolutions);
- ``groups``: the same network with near-uniform contiguous groups landing just under the
  budget (``budget.groups_at_budget``: every layer G or 2G groups), exported by ``export_model``:
  real grouped convolutions, no channel gathers;
- ``channels``: the dense network channel-pruned to the budget (``ChannelPruning``: L1
  magnitude, coupled channels together, widths multiples of ``round_to``, the least ratio within
  it; 4 by default, as 8 sends ResNet-56's 16-channel stage straight to 8 channels and its budget
  of 1/2 to 1/4 of the MACs);
- ``channels+groups``: half the cut each, in log: channels pruned to the square root of the
  budget's share, then the pruned network converted to DGConv and grouped as ``groups`` is to
  the budget.

Every model goes through ``export_deployable(format="onnx")`` (standard modules, one file that
takes any batch size, loaded back with ONNX Runtime and checked against the model) and each
file is timed in its own ``onnxruntime.InferenceSession`` (CPUExecutionProvider,
``intra_op_num_threads`` = ``threads``): all files of one network and batch take turns
within every repetition (``latency.timer.sample_ms``), at least ``repeats`` times and more where
that takes less than ``seconds``. The deployable PyTorch modules are
timed the same way, side by side among themselves, for comparison. Run
``nas-grouping bench deploy`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from nas_grouping.budget import groups_at_budget
from nas_grouping.channels.pruning import ChannelPruning
from nas_grouping.config import parse_list_settings, setting
from nas_grouping.convert import convert_to_dgconv, dgconv_layers
from nas_grouping.errors import ConfigError, MissingDependencyError
from nas_grouping.export.deploy import DeployReport, deployable, export_deployable
from nas_grouping.export.model import export_model
from nas_grouping.latency.timer import UnstableTimingWarning, enough_repeats, machine_info, sample_ms
from nas_grouping.macs import count_macs

__all__ = ["DeployBenchConfig", "run_deploy_bench", "format_deploy_bench", "NETWORKS", "VARIANTS", "COLUMNS"]

logger = logging.getLogger(__name__)

#: network -> (space name, builder keyword arguments, input size)
NETWORKS: dict[str, tuple[str, dict[str, Any], tuple[int, int, int]]] = {
    "resnet56": ("resnet56", {"num_classes": 10}, (3, 32, 32)),
    "resnet50": ("torchvision", {"name": "resnet50", "num_classes": 1000}, (3, 224, 224)),
    "resnet20": ("resnet20", {"num_classes": 10}, (3, 32, 32)),
}
#: the smoke run's network and input size (the ONNX export of each file still takes seconds)
QUICK_NETWORK, QUICK_SIZE = "resnet20", (3, 16, 16)
#: the most repetitions ``seconds`` may ask for
MAX_REPEATS = 100
VARIANTS = ("groups", "channels", "channels+groups")
#: the CSV's columns, in order
COLUMNS = ("network", "input", "batch", "budget", "variant", "structural_macs", "executed_macs", "mac_cut", "onnx_kb",
           "ort_ms", "speedup", "speedup_per_mac_cut", "torch_ms", "torch_speedup", "max_abs_error", "output_scale",
           "threads", "repeats", "weights", "note")


@dataclass
class DeployBenchConfig:
    """`nas-grouping bench deploy`: which networks, budgets, variants and batch sizes, and how long to time."""

    networks: Any = setting(["resnet56", "resnet50"], "networks, comma-separated: " + ", ".join(NETWORKS))
    budgets: Any = setting([0.5, 0.25], "MAC budgets as shares of the dense MACs, comma-separated")
    variants: Any = setting(list(VARIANTS), "compressed variants, comma-separated: " + ", ".join(VARIANTS))
    batches: Any = setting([1, 32], "batch sizes, comma-separated")
    threads: int | None = setting(None, "ONNX Runtime intra-op threads, and torch's for the eager timings "
                                  "(default: torch's thread count)")
    repeats: int = setting(10, "timed repetitions of every model at least (median kept)")
    seconds: float = setting(10.0, f"time each network and batch for about this long: cheap models get more "
                             f"repetitions than --repeats (at most {MAX_REPEATS})")
    warmup: int = setting(2, "untimed calls of every model first")
    spinning: bool = setting(False, "let ONNX Runtime's worker threads spin between runs (its default); off, the "
                             "sessions that take turns do not take each other's cores")
    eager: bool = setting(True, "also time the deployable PyTorch modules, side by side among themselves (on a busy "
                          "machine, more than one thread makes eager PyTorch slow and noisy: its OpenMP threads "
                          "wait for each other)")
    round_to: int = setting(4, "channel pruning keeps widths multiples of this")
    seed: int = setting(0, "seed of the random weights and inputs")
    quick: bool = setting(False, f"a smoke run: {QUICK_NETWORK} at {'x'.join(map(str, QUICK_SIZE))}, budget 1/2, "
                          "batches 1 and 2, 2 repetitions")
    out: str = setting("runs/bench-deploy.csv", "write the rows as CSV here")
    overwrite: bool = setting(False, "replace an existing --out file (and ONNX files in --onnx-dir)")
    onnx_dir: str | None = setting(None, "keep the ONNX files in this folder (default: a temporary one, removed)")

    def __post_init__(self) -> None:
        parse_list_settings(self, (("networks", str), ("budgets", float), ("variants", str), ("batches", int)))
        if self.quick:
            self.networks, self.budgets, self.batches, self.repeats, self.warmup = (
                [QUICK_NETWORK], self.budgets[:1] or [0.5], [1, 2], 2, 1)
            self.seconds = 0.0
        unknown = [n for n in self.networks if n not in NETWORKS]
        if unknown or not self.networks:
            raise ConfigError(f"networks: unknown {unknown}; choose from {', '.join(NETWORKS)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        if not self.budgets or any(not 0 < b < 1 for b in self.budgets):
            raise ConfigError(f"budgets must be shares of the dense MACs in (0, 1), got {self.budgets}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ConfigError(f"batches must be >= 1, got {self.batches}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {self.round_to}")
        if self.repeats < 1 or self.warmup < 0 or self.seconds < 0:
            raise ConfigError(f"repeats must be >= 1, warmup and seconds >= 0, got {self.repeats}, {self.warmup} "
                              f"and {self.seconds}")
        if not self.out:
            raise ConfigError("out: give the CSV file to write, e.g. runs/bench-deploy.csv")


def _dense_of(searchable: nn.Module) -> nn.Module:
    """The DGConv network with every gate on, exported: plain convolutions, the dense model."""
    model = copy.deepcopy(searchable)
    for _, layer in dgconv_layers(model):
        layer.set_groups(1)
    return export_model(model).eval()


def _grouped(searchable: nn.Module, size: tuple[int, ...], budget_macs: int) -> nn.Module:
    """``searchable`` with near-uniform contiguous groups just under ``budget_macs``, exported."""
    model = copy.deepcopy(searchable)
    groups_at_budget(model, size, budget_macs)
    return export_model(model).eval()


def _variants(searchable: nn.Module, dense: nn.Module, size: tuple[int, ...], budgets: list[float],
              variants: list[str], round_to: int = 4) -> dict[tuple[float, str], nn.Module]:
    """Every compressed model, by (budget, variant); budgets are shares of the dense MACs."""
    dense_macs = count_macs(dense, size)
    pruned_variants = {"channels", "channels+groups"} & set(variants)
    pruning = ChannelPruning(dense, size, round_to=round_to) if pruned_variants else None
    models: dict[tuple[float, str], nn.Module] = {}
    for budget in budgets:
        budget_macs = int(budget * dense_macs)
        if "groups" in variants:
            models[budget, "groups"] = _grouped(searchable, size, budget_macs)
        if "channels" in variants:
            models[budget, "channels"] = pruning.prune_to_budget(budget_macs)[0].eval()
        if "channels+groups" in variants:
            pruned = pruning.prune_to_budget(int(math.sqrt(budget) * dense_macs))[0]
            models[budget, "channels+groups"] = _grouped(convert_to_dgconv(pruned), size, budget_macs)
        logger.debug("built the variants at %g of the dense MACs", budget)
    return models


def _ort_session(path: Path, threads: int, spinning: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _timed(fns: dict[str, Callable[[], object]], cfg: DeployBenchConfig, engine: str
           ) -> tuple[dict[str, float], int, str]:
    """Median ms of each function, side by side; the repetitions used; and the unstable-timing warning, if any.

    One untimed round first sizes the repetitions: at least ``cfg.repeats``, more where a round is
    cheap, so that about ``cfg.seconds`` are timed (a 3 ms model timed 5 times on a busy machine says little).
    """
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    repeats = enough_repeats((time.perf_counter() - start) * 1e3, cfg.repeats, seconds=cfg.seconds,
                             at_most=max(cfg.repeats, MAX_REPEATS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnstableTimingWarning)
        times = sample_ms(fns, warmup=cfg.warmup, repeats=repeats)
    note = "; ".join(f"{engine}: {w.message}" for w in caught if issubclass(w.category, UnstableTimingWarning))
    return {k: statistics.median(v) for k, v in times.items()}, repeats, note


def _check_runtime() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"the deploy benchmark needs {', '.join(missing)}: pip install "
                                     "'nas-grouping[deploy]'")


def run_deploy_bench(cfg: DeployBenchConfig) -> pd.DataFrame:
    """Build and export every model, time the files side by side per network and batch, write and return the rows."""
    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"out: {out} is a folder; give the CSV file to write")
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"out: {out} exists; choose another --out or pass --overwrite")
    _check_runtime()
    import onnxruntime as ort

    threads = cfg.threads or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    keep = Path(cfg.onnx_dir) if cfg.onnx_dir else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
            folder = keep or Path(tmp)
            for net in cfg.networks:
                rows += _bench_network(cfg, net, folder, threads)
    finally:
        torch.set_num_threads(before)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs.update(machine_info())
    df.attrs.update(threads=threads, onnxruntime=ort.__version__, repeats=cfg.repeats, warmup=cfg.warmup,
                    spinning=cfg.spinning, out=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return df


def _bench_network(cfg: DeployBenchConfig, net: str, folder: Path, threads: int) -> list[dict[str, Any]]:
    """Build, export and time one network's models: one row per model and batch."""
    from search_spaces import get_space

    space, kwargs, size = NETWORKS[net]
    size = QUICK_SIZE if cfg.quick else size
    torch.manual_seed(cfg.seed)
    searchable = get_space(space, **kwargs).eval()
    dense = _dense_of(searchable)
    models: dict[tuple[float, str], nn.Module] = {(1.0, "dense"): dense}
    models.update(_variants(searchable, dense, size, cfg.budgets, cfg.variants, cfg.round_to))
    reports: dict[tuple[float, str], DeployReport] = {}
    for (budget, variant), model in models.items():
        path = folder / f"{net}-{variant.replace('+', '-')}-{budget:g}.onnx"
        # our variants have no per-batch forms: one file that takes any batch serves every batch
        reports[budget, variant] = export_deployable(model, path, input_size=size, format="onnx",
                                                     batch=cfg.batches[0], dynamic_batch=True,
                                                     overwrite=cfg.overwrite)
        logger.info("%s %s@%g: %s (%.1f kB)", net, variant, budget, path.name, reports[budget, variant].bytes / 1024)
    keys = {f"{v}@{b:g}": (b, v) for b, v in models}
    rows = []
    gen = torch.Generator().manual_seed(cfg.seed)
    for batch in cfg.batches:
        x = torch.randn(batch, *size, generator=gen)
        sessions = {k: _ort_session(Path(reports[key].path), threads, cfg.spinning) for k, key in keys.items()}
        feed = x.numpy()
        ort_ms, repeats, note = _timed({k: partial(s.run, None, {s.get_inputs()[0].name: feed})
                                        for k, s in sessions.items()}, cfg, "ONNX Runtime")
        del sessions
        torch_ms: dict[str, float] = {}
        if cfg.eager:
            deployed = {k: deployable(models[key], size, batch=batch).eval() for k, key in keys.items()}

            def call(module: nn.Module) -> None:
                with torch.inference_mode():
                    module(x)

            torch_ms, _, eager_note = _timed({k: partial(call, m) for k, m in deployed.items()}, cfg, "eager")
            note = "; ".join(filter(None, (note, eager_note)))
            del deployed
        dense_key = next(k for k, key in keys.items() if key[1] == "dense")
        dense_exec = reports[keys[dense_key]].executed_macs
        for k, (budget, variant) in keys.items():
            r = reports[budget, variant]
            cut = dense_exec / r.executed_macs
            speedup = ort_ms[dense_key] / ort_ms[k]
            rows.append({
                "network": net, "input": "x".join(map(str, size)), "batch": batch, "budget": budget,
                "variant": variant, "structural_macs": r.structural_macs, "executed_macs": r.executed_macs,
                "mac_cut": cut, "onnx_kb": r.bytes / 1024, "ort_ms": ort_ms[k], "speedup": speedup,
                "speedup_per_mac_cut": speedup / cut, "torch_ms": torch_ms.get(k, math.nan),
                "torch_speedup": torch_ms[dense_key] / torch_ms[k] if torch_ms else math.nan,
                "max_abs_error": r.max_abs_error, "output_scale": r.output_scale, "threads": threads,
                "repeats": repeats, "weights": "random", "note": note,
            })
        logger.info("%s batch %d: dense %.2f ms in ONNX Runtime", net, batch, ort_ms[dense_key])
    return rows


def format_deploy_bench(df: pd.DataFrame) -> str:
    """A Markdown table of the rows, with the machine and runtime it was measured on."""
    eager = bool(df["torch_ms"].notna().any())
    lines = [f"ONNX Runtime {df.attrs.get('onnxruntime')} (CPUExecutionProvider, {df.attrs.get('threads')} intra-op "
             f"threads, spinning {'on' if df.attrs.get('spinning') else 'off'}), torch {df.attrs.get('torch')}; "
             f"median of the repetitions in column reps (at least {df.attrs.get('repeats')}, after "
             f"{df.attrs.get('warmup')} warm-up), every file of one network and batch taking turns; random weights "
             "(latency does not depend on them); MACs per sample; speed-up against the dense model exported the "
             "same way",
             "", "| network | batch | MAC budget | variant | MACs structural / executed | MAC cut | ONNX kB | ORT ms "
             "| reps | speed-up | speed-up / MAC cut |" + (" eager ms | eager speed-up |" if eager else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if eager else "")]
    for r in df.itertuples():
        budget = "dense" if r.variant == "dense" else f"1/{round(1 / r.budget)}" if math.isclose(
            1 / r.budget, round(1 / r.budget)) else f"{r.budget:g}"
        lines.append(f"| {r.network} | {r.batch} | {budget} | {r.variant} | {r.structural_macs / 1e6:,.1f}M / "
                     f"{r.executed_macs / 1e6:,.1f}M | {r.mac_cut:.2f}x | {r.onnx_kb:,.0f} | {r.ort_ms:.2f} | "
                     f"{r.repeats} | {r.speedup:.2f}x | {r.speedup_per_mac_cut:.2f} |"
                     + (f" {r.torch_ms:.2f} | {r.torch_speedup:.2f}x |" if eager else ""))
    notes = sorted({f"{r.network} batch {r.batch}: {r.note}" for r in df.itertuples() if r.note})
    return "\n".join(lines + ([""] + notes if notes else []) + ["", f"rows written to {df.attrs.get('out')}"])
