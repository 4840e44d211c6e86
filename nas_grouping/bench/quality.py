"""Accuracy at equal budgets: learned grouping vs uniform grouping, over seeds.

For one network and data set and a list of MAC budgets (fractions of the dense
model), every method is trained with the same epochs and schedule over N seeds:
dense; uniform group convs at each budget (every layer at G or 2G contiguous groups,
landing just under the budget: the ResNeXt-style baseline at equal MACs); our DGConv search
at each budget, from scratch and from the trained dense model (``search_from_dense``: more
epochs in all, its rows say how many), and the searched groups retrained from scratch as the
uniform ones are (``search_retrain``: the usual NAS evaluation, which judges the architecture
apart from the cost of finding it; twice the epochs in all); the self-grouping pass on the trained dense model
at each budget, fine-tuned; channel pruning of the same dense model to each budget, ours
(``channels``) and Torch-Pruning's (``torch_pruning``: L1; ``torch_pruning_gn``: group-norm
importance; installed by ``make bench-speed``), fine-tuned as self-grouping is; and the pipeline
(search at twice the budget, then self-grouping down to it) on one budget.

Each (method, budget, seed) cell is trained once and written to its own JSON
file, so an interrupted benchmark resumes without rerunning finished cells, and
seeds make every cell repeatable. Processes or machines may share a run folder,
each with its own seeds (``first_seed``); the table covers every finished cell in
it, and a folder is refused when resumed with other training settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from nas_grouping.config import (PROTOCOL_HELP, CompressConfig, SearchConfig, SelfGroupingConfig, config_from_dict,
                                 config_to_dict, setting)
from nas_grouping.data import DataConfig, load_datasets
from nas_grouping.errors import ConfigError
from nas_grouping.files import claim_run_folder
from nas_grouping.macs import count_macs, count_parameters, mac_counts
from nas_grouping.protocols import apply_protocol_defaults, merge_protocol
from nas_grouping.report import write_json

__all__ = ["QualityConfig", "run_quality", "summarize_quality", "format_quality_table", "uniform_groups_for_budget",
           "cost_fields", "PUBLISHED", "CellBusy"]

logger = logging.getLogger(__name__)

METHODS = ("dense", "uniform", "search", "search_from_dense", "search_retrain", "self_grouping", "pipeline",
           "channels", "torch_pruning", "torch_pruning_gn")
#: methods that prune this seed's trained dense model to the budget, then fine-tune it as self-grouping does
PRUNE_AND_FINETUNE = ("channels", "torch_pruning", "torch_pruning_gn")
#: the methods run unless told: all but search_from_dense, which trains more epochs in all
DEFAULT_METHODS = ("dense", "uniform", "search", "self_grouping", "pipeline")


@dataclass
class QualityConfig:
    """The accuracy-at-equal-budgets benchmark."""

    space: str = setting("digits_convnet", "search space (a digits network by default)")
    space_kwargs: dict = setting({}, "builder arguments of the space, as JSON")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data set settings"})
    budgets: list = setting([0.25, 0.125, 0.0625], "MAC budgets as fractions of the dense model")
    seeds: int = setting(5, "seeds per (method, budget)")
    first_seed: int = setting(0, "the first seed: cells run seeds first_seed .. first_seed + seeds - 1, so several "
                              "processes or machines can share one run folder, each with its own seeds")
    epochs: int = setting(15, "training epochs of every dense / uniform / search cell")
    sg_epochs: int = setting(5, "self-grouping fine-tuning epochs (on top of the trained dense model)")
    methods: list = setting(list(DEFAULT_METHODS), "methods to run")
    pipeline_budget: float | None = setting(None, "the budget of the pipeline method (default: the smallest)")
    search_settings: dict = setting({}, "SearchConfig settings of every search, search_from_dense and pipeline cell, "
                                    "as JSON (e.g. {\"budget_ramp\": 0.5}); cells with other settings "
                                    "are kept apart")
    uniform_settings: dict = setting({}, "settings of the uniform cells, as JSON: {\"keep_dense\": [layer, ...]} "
                                     "leaves those layers dense and groups the others to the budget (a hand rule, "
                                     "e.g. the layers every search kept dense); cells with other settings are kept "
                                     "apart")
    finetune_settings: dict = setting({}, "SelfGroupingConfig settings over the protocol's of every fine-tuning "
                                      "cell (self_grouping, pipeline, channels, torch_pruning*), as JSON (e.g. "
                                      "{\"distill\": 0.5}); cells with other settings are kept apart")
    quick: bool = setting(False, "2 seeds and the first budget only (a smoke run)")
    out: str = setting("runs/quality", "run folder (resumable: finished cells are not rerun)")
    progress: bool = setting(True, "show progress bars")
    protocol: str | None = setting(None, PROTOCOL_HELP + "; every cell trains by it (epochs and sg_epochs are then the "
                                   "protocol's)")
    protocol_applied: bool = setting(False, "set once the protocol has filled the settings", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = config_from_dict(DataConfig, self.data)
        apply_protocol_defaults(self)
        if not self.budgets or any(not 0 < float(b) <= 1 for b in self.budgets):
            raise ConfigError(f"budgets must be fractions in (0, 1], got {self.budgets}")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ConfigError(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
        if self.finetune_settings:
            config_from_dict(SelfGroupingConfig, dict(self.finetune_settings))  # unknown or bad settings: one line
        keep = self.uniform_settings.get("keep_dense", []) if isinstance(self.uniform_settings, dict) else None
        if (not isinstance(self.uniform_settings, dict) or set(self.uniform_settings) - {"keep_dense"}
                or not isinstance(keep, list) or not all(isinstance(n, str) for n in keep)):
            raise ConfigError(f"uniform_settings: expected {{\"keep_dense\": [layer names]}}, got "
                              f"{self.uniform_settings!r}")
        if self.seeds < 1 or self.epochs < 3 or self.first_seed < 0:
            raise ConfigError("seeds must be >= 1, first_seed >= 0 and epochs >= 3")

    @property
    def run_budgets(self) -> list[float]:
        return [float(self.budgets[0])] if self.quick else [float(b) for b in self.budgets]

    @property
    def run_seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + (2 if self.quick else self.seeds)))


def uniform_groups_for_budget(space: str, space_kwargs: dict, fraction: float, num_classes: int,
                              input_size: tuple[int, ...], keep_dense: Sequence[str] = ()
                              ) -> tuple[dict[str, int], int] | None:
    """Near-uniform contiguous groups per layer landing just under ``fraction`` of the dense MACs (see
    ``groups_at_budget``; ``keep_dense`` layers stay dense), with their MACs; None when even the largest groups
    do not fit."""
    from nas_grouping.budget import ModelCost, groups_at_budget
    from nas_grouping.errors import BudgetError
    from search_spaces import get_space

    model = get_space(space, num_classes=num_classes, in_channels=input_size[0], **space_kwargs)
    try:
        groups = groups_at_budget(model, input_size, fraction, keep_dense=keep_dense)
    except BudgetError:
        return None
    return groups, ModelCost(model, input_size).current_macs()


#: published CIFAR-10 results (original test pixels, long protocols): (label, MAC fraction, accuracy change
#: against the paper's own dense model, in points)
PUBLISHED = (
    ("DepGraph ResNet-56 (published)", 1 / 2.13, +0.24),
    ("HRank ResNet-56 (published)", 0.50, -0.09),
    ("ResRep ResNet-56 (published)", 1 / 2.12, 0.00),
)
LATENCY_BATCHES = (1, 32)


def cost_fields(model: torch.nn.Module, dense: torch.nn.Module, input_size: tuple[int, ...]) -> dict[str, Any]:
    """Structural and executed MACs, parameters, and CPU latency at batch 1 and 32 measured side by side with
    ``dense`` (both as deployed, each in its fastest layout). On a loaded machine ten repeats were not enough:
    the dense cell once timed 1.64x faster than an identical dense network at batch 32 (a re-test: 51 vs
    50 ms), so the dense cell's own ratio, which should be 1, shows the noise floor of a run."""
    from nas_grouping.latency.measure import fastest_layouts

    structural, executed = mac_counts(model, input_size)
    row: dict[str, Any] = {"macs": structural, "executed_macs": executed, "params": count_parameters(model)}
    for b in LATENCY_BATCHES:
        t = fastest_layouts({"dense": dense, "model": model}, input_size, batch=b, repeats=20, warmup=3)
        row[f"latency_ms_b{b}"], row[f"dense_latency_ms_b{b}"] = t["model"][1], t["dense"][1]
        row[f"speedup_b{b}"] = t["dense"][1] / t["model"][1]
    return row


class CellBusy(ConfigError):
    """A cell another process (sharing the run folder) is training."""


class _CellLock:
    """An exclusive lock file (pid and host inside) held while a cell trains."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key

    def __enter__(self) -> "_CellLock":
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # its process is gone: take the cell over
                    continue
                raise CellBusy(f"cell {self.key} is being run by process {holder.get('pid')} on "
                               f"{holder.get('host')} ({self.path}; delete it if that process is gone)") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise ConfigError(f"cell {self.key}: could not take its lock {self.path}")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Bench:
    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.cells = self.out / "cells"
        self.cells.mkdir(parents=True, exist_ok=True)
        self.ds = load_datasets(cfg.data)
        self.size = (self.ds.in_channels, *self.ds.input_size)
        if cfg.uniform_settings and "uniform" in cfg.methods:  # a misnamed layer: one line before any training
            uniform_groups_for_budget(cfg.space, cfg.space_kwargs, 1.0, self.ds.num_classes, self.size,
                                      keep_dense=cfg.uniform_settings.get("keep_dense", ()))

    def search_config(self, name: str, seed: int, **kw: Any) -> SearchConfig:
        base = dict(space=self.cfg.space, space_kwargs=self.cfg.space_kwargs, data=config_to_dict(self.cfg.data),
                    seed=seed, progress=False, measure_latency=False, out=str(self.out / "runs" / name))
        if self.cfg.protocol:
            base["protocol"] = self.cfg.protocol
            e = config_from_dict(SearchConfig, {"protocol": self.cfg.protocol}).total_epochs
        else:
            e = self.cfg.epochs
            base.update(epochs=e - max(1, e // 3), warmup_epochs=max(1, e // 5), finetune_epochs=max(1, e // 3))
        if (kw.get("dense") or kw.get("fixed_groups")) and not self.cfg.protocol:
            base.update(epochs=e, warmup_epochs=0, finetune_epochs=0)
        base.update(kw)
        return config_from_dict(SearchConfig, base)

    def run_search(self, name: str, seed: int, **kw: Any):
        from nas_grouping.search.loop import search

        cfg = self.search_config(name, seed, **kw)
        resume = (Path(cfg.out) / "checkpoint.pt").exists()
        with contextlib.redirect_stdout(io.StringIO()):
            return search(cfg, resume=resume)

    def self_group(self, model, budget: float | int, seed: int):
        from nas_grouping.self_grouping.grouping import SelfGrouping

        sg = SelfGrouping(self.grouping_settings(budget, seed))
        with contextlib.redirect_stdout(io.StringIO()):
            result = sg.run(model, self.ds, batch_size=self.cfg.data.batch_size)
        return result.model, result.val_acc("global") or result.val_acc("pruned")

    def grouping_settings(self, budget: float | int, seed: int) -> SelfGroupingConfig:
        """The self-grouping pass's settings at ``budget``: its fine-tuning is every pruning method's."""
        settings = {"epochs": self.cfg.sg_epochs}
        if self.cfg.protocol:
            settings = merge_protocol(CompressConfig, {"protocol": self.cfg.protocol}).get("grouping", {})
        return SelfGroupingConfig(**{**settings, **self.cfg.finetune_settings, "budget": budget, "seed": seed,
                                     "progress": False})

    def prune_and_finetune(self, method: str, dense: torch.nn.Module, budget: float, seed: int
                           ) -> tuple[torch.nn.Module, float, dict[str, Any]]:
        """This seed's dense model channel-pruned to ``budget`` of its MACs (ours, or Torch-Pruning's with L1 or
        group-norm importance), then fine-tuned with the self-grouping pass's epochs and schedule."""
        from nas_grouping.channels.pruning import ChannelPruning
        from nas_grouping.runtime import setup_runtime
        from nas_grouping.training import (Distillation, epoch_loader, evaluate, make_lr_scheduler, seed_everything,
                                           train_epoch)

        budget_macs = int(budget * count_macs(dense, self.size))
        if method == "channels":
            model, ratio = ChannelPruning(dense, self.size).prune_to_budget(budget_macs)
        else:
            from nas_grouping.bench.speed import torch_pruning_prune

            model, ratio = torch_pruning_prune(dense, self.size, budget_macs,
                                               importance="l1" if method == "torch_pruning" else "group_norm")
        g = self.grouping_settings(budget, seed)
        seed_everything(seed)
        rt = setup_runtime("auto", "32", False, False)
        model = model.to(rt.device).train()
        opt = torch.optim.SGD(model.parameters(), lr=g.lr, momentum=g.momentum, weight_decay=g.weight_decay,
                              nesterov=g.momentum > 0)
        scheduler, _ = make_lr_scheduler(opt, "cosine", epochs=g.epochs, steps_per_epoch=1)
        distill = (Distillation(dense, weight=g.distill, temperature=g.distill_temperature).place(rt)
                   if g.distill > 0 else None)
        for epoch in range(g.epochs):
            loader = epoch_loader(self.ds.train, rt, batch_size=self.cfg.data.batch_size, train=True, seed=seed,
                                  epoch=epoch)
            train_epoch(model, loader, rt, weight_optimizer=opt, label_smoothing=g.label_smoothing, distill=distill)
            scheduler.step()
        acc = evaluate(model, epoch_loader(self.ds.val, rt, batch_size=256, train=False, seed=0, epoch=0), rt)["acc"]
        return model.cpu().eval(), acc, {"pruning_ratio": ratio, "finetune_epochs": g.epochs}

    def cell(self, method: str, budget: float | None, seed: int, *, need_run: bool = False) -> dict[str, Any]:
        """A cell's row, trained unless it finished; ``need_run``: another cell starts from its run (the dense
        model, the searched groups), so a cell that finished where its run stayed (another machine: runs are not
        committed) is trained again here, its row replaced."""
        key = f"{method}-{'dense' if budget is None else budget}-{seed}"
        searching = method in ("search", "search_from_dense", "search_retrain", "pipeline")
        search_kw = dict(self.cfg.search_settings) if searching else {}
        settings = dict(search_kw)
        if method in ("self_grouping", "pipeline", *PRUNE_AND_FINETUNE) and self.cfg.finetune_settings:
            settings["finetune"] = dict(self.cfg.finetune_settings)
        if method == "uniform" and self.cfg.uniform_settings:
            settings["uniform"] = dict(self.cfg.uniform_settings)
        if settings:
            key += "-" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        path = self.cells / f"{key}.json"
        if path.is_file() and not (need_run and self._lost_run(key)):
            return self.with_costs(key, path)
        with self._claim(key):
            if path.is_file() and not (need_run and self._lost_run(key)):  # finished by another process meanwhile
                return self.with_costs(key, path)
            if path.is_file():
                logger.warning("cell %s finished where its run was kept, not in %s: training it again, as "
                               "another cell starts from it", key, self.out / "runs")
            return self._train_cell(key, path, method, budget, seed, settings, search_kw)

    def _lost_run(self, key: str) -> bool:
        return not (self.out / "runs" / key / "summary.json").is_file()

    def _claim(self, key: str) -> contextlib.AbstractContextManager:
        """Hold a cell while it trains, so two processes sharing the folder never write the same run (its
        checkpoint) at once; a lock left by a process of this machine that is gone is taken over."""
        return _CellLock(self.cells / f"{key}.lock", key)

    def _train_cell(self, key: str, path: Path, method: str, budget: float | None, seed: int,
                    settings: dict[str, Any], search_kw: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        row: dict[str, Any] = {"method": method, "budget": budget, "seed": seed, **({"settings": settings}
                                                                                   if settings else {})}
        if method == "dense":
            r = self.run_search(key, seed, dense=True)
            model, acc = r.model, r.summary["val_acc"]
        elif method == "uniform":
            found = uniform_groups_for_budget(self.cfg.space, self.cfg.space_kwargs, budget, self.ds.num_classes,
                                              self.size, keep_dense=self.cfg.uniform_settings.get("keep_dense", ()))
            if found is None:
                row.update(status="infeasible: even the largest groups exceed the budget")
                write_json(path, row)
                return row
            r = self.run_search(key, seed, fixed_groups=found[0])
            model, acc = r.model, r.summary["val_acc"]
            row["groups"] = found[0]
        elif method == "search":
            r = self.run_search(key, seed, budget=budget, **search_kw)
            model, acc = r.model, r.summary["val_acc"]
        elif method == "search_from_dense":  # the search starts from this seed's trained dense model
            self.cell("dense", None, seed, need_run=True)
            dense_run = self.out / "runs" / f"dense-dense-{seed}"
            r = self.run_search(key, seed, budget=budget, init_from=str(dense_run), **search_kw)
            model, acc = r.model, r.summary["val_acc"]
            row["epochs_total"] = r.summary["epochs"] + json.loads((dense_run / "summary.json").read_text())["epochs"]
        elif method == "search_retrain":  # the searched groups trained from scratch as uniform groups are
            self.cell("search", budget, seed, need_run=True)
            searched = self.out / "runs" / key.replace("search_retrain", "search", 1)
            groups = json.loads((searched / "summary.json").read_text())["groups"]
            r = self.run_search(key, seed, fixed_groups=groups)
            model, acc = r.model, r.summary["val_acc"]
            row.update(groups=groups, epochs_total=r.summary["epochs"] + json.loads(
                (searched / "summary.json").read_text())["epochs"])
        elif method in PRUNE_AND_FINETUNE:
            from nas_grouping.export.model import load_model

            self.cell("dense", None, seed, need_run=True)
            dense_run = self.out / "runs" / f"dense-dense-{seed}"
            model, acc, info = self.prune_and_finetune(method, load_model(dense_run / "model"), budget, seed)
            row.update(info, epochs_total=info["finetune_epochs"] + json.loads(
                (dense_run / "summary.json").read_text())["epochs"])
        elif method == "self_grouping":
            from nas_grouping.export.model import load_model

            self.cell("dense", None, seed, need_run=True)
            dense = load_model(self.out / "runs" / f"dense-dense-{seed}" / "model")
            model, acc = self.self_group(dense, budget, seed)
        else:  # pipeline: search at twice the budget, then self-group down to it
            r = self.run_search(key, seed, budget=min(1.0, 2 * budget), **search_kw)
            target = int(budget * r.summary["dense_macs"])
            model, acc = self.self_group(r.model, target, seed)
        self.keep_model(key, model)
        row.update(status="ok", val_acc=float(acc), **self.costs(model, seed),
                   seconds=time.perf_counter() - start)
        write_json(path, row)
        return row

    def latency_reference(self, seed: int) -> str:
        """The cell whose model the latency is measured against: this seed's trained dense model once its cell
        has run (the model the pruning methods start from), else "itself"."""
        name = f"dense-dense-{seed}"
        return name if (self.model_folder(name) / "weights.pt").is_file() else "itself"

    def costs(self, model: torch.nn.Module, seed: int) -> dict[str, Any]:
        """cost_fields against :meth:`latency_reference`, which the row names."""
        from nas_grouping.export.model import load_model

        reference = self.latency_reference(seed)
        dense = model if reference == "itself" else load_model(self.model_folder(reference))
        return {**cost_fields(model, dense, self.size), "latency_reference": reference}

    def model_folder(self, key: str) -> Path:
        return self.out / "runs" / key / "model"

    def keep_model(self, key: str, model: torch.nn.Module) -> None:
        """Save a cell's final model beside its run (search cells already have it), for later measurements."""
        from nas_grouping.export.model import save_model

        folder = self.model_folder(key)
        if not (folder / "architecture.json").is_file():
            try:
                save_model(model.cpu().eval(), folder)
            except Exception as exc:  # a model no recipe rebuilds (Torch-Pruning's): the cell is still valid
                logger.warning("cell %s: its model was not saved (%s); latency can only be measured now", key, exc)

    def with_costs(self, key: str, path: Path) -> dict[str, Any]:
        """A finished cell, with executed MACs and latency side by side with its seed's trained dense model added
        (or measured again) when it predates them and its model was kept (older cells keep their batch-1
        latency, measured alone)."""
        row = json.loads(path.read_text())
        if (row.get("status") != "ok" or row.get("latency_reference") == self.latency_reference(row["seed"])
                or not (self.model_folder(key) / "weights.pt").is_file()):
            return row
        from nas_grouping.export.model import load_model

        model = load_model(self.model_folder(key))
        row.update(self.costs(model, row["seed"]), costs_added_later=True)
        write_json(path, row)
        return row

    def plan(self) -> list[tuple[str, float | None, int]]:
        cfg = self.cfg
        pipeline_budget = cfg.pipeline_budget or min(cfg.run_budgets)
        todo = []
        for seed in cfg.run_seeds:
            for method in cfg.methods:
                if method == "dense":
                    todo.append(("dense", None, seed))
                elif method == "pipeline":
                    todo.append(("pipeline", float(pipeline_budget), seed))
                else:
                    todo.extend((method, b, seed) for b in cfg.run_budgets)
        return todo


#: the settings every cell of a run folder was trained with; the methods, budgets and seeds may differ per run
_FOLDER_SETTINGS = ("space", "space_kwargs", "epochs", "sg_epochs", "protocol")
_FOLDER_DATA_SETTINGS = ("dataset", "batch_size", "val_fraction", "split_seed", "holdout", "augment", "crop_padding",
                         "cutout", "image_size")


def _check_folder(cfg: QualityConfig, out: Path) -> None:
    """Refuse a run folder whose cells were trained with other settings: its table would mix them silently."""
    path = out / "config.json"
    if not path.is_file():
        return
    old, new = json.loads(path.read_text()), config_to_dict(cfg)
    # a setting added after the folder was made (absent from its config.json) had its default there
    quality, data = _defaults(QualityConfig), _defaults(DataConfig)
    pairs = [(k, old.get(k, quality.get(k)), new.get(k)) for k in _FOLDER_SETTINGS]
    pairs += [(f"data.{k}", old.get("data", {}).get(k, data.get(k)), new["data"].get(k))
              for k in _FOLDER_DATA_SETTINGS]
    differ = [f"{k}={a!r} (now {b!r})" for k, a, b in pairs if a != b]
    if differ:
        raise ConfigError(f"{out} holds cells trained with {', '.join(differ)}: resume it with those settings or "
                          "choose another --out")


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _all_cells(cells: Path) -> pd.DataFrame:
    """Every cell written to the folder (by this run, earlier ones or other processes); cells run with
    search_settings, uniform_settings or finetune_settings are labelled by them, so they never pool with the
    default ones."""
    rows = [json.loads(p.read_text()) for p in sorted(cells.glob("*.json"))]
    for row in rows:
        if row.get("settings"):
            row["method"] += " " + json.dumps(row["settings"], sort_keys=True)
    return pd.DataFrame(rows)


def run_quality(cfg: QualityConfig) -> pd.DataFrame:
    """Run (or resume) the benchmark; returns the table of every finished cell in ``cfg.out`` (several processes
    may share the folder, each with its own seeds) and writes CSV, JSON and a plot there."""
    out = Path(cfg.out)
    _check_folder(cfg, out)
    claim_run_folder(out, "bench-quality")
    bench = _Bench(cfg)
    write_json(bench.out / "config.json", config_to_dict(cfg))
    todo = bench.plan()
    for method, budget, seed in tqdm(todo, desc="cells", disable=not cfg.progress, dynamic_ncols=True):
        try:
            bench.cell(method, budget, seed)
        except CellBusy as exc:  # another process trains it: the table takes it once it is written
            logger.warning("%s: skipped here", exc)
    return summarize_quality(bench.out)


def summarize_quality(out: str | Path) -> pd.DataFrame:
    """The table of every finished cell of a quality run folder (mean, spread and seeds per method and budget,
    MACs, speed-ups, the change against dense), written beside them as cells.csv, table.csv, summary.json and
    quality.png; nothing is trained (``nas-grouping report`` on the folder prints it)."""
    out = Path(out)
    cells = _all_cells(out / "cells")
    if cells.empty:  # every planned cell is being trained elsewhere
        logger.warning("no finished cell in %s yet: no table", out)
        return pd.DataFrame()
    cells.to_csv(out / "cells.csv", index=False)
    ok = cells[cells["status"] == "ok"].copy()
    ok["budget"] = ok["budget"].fillna(1.0)
    for column in ("executed_macs", "params", *(f"speedup_b{b}" for b in LATENCY_BATCHES)):
        if column not in ok:
            ok[column] = float("nan")
    table = ok.groupby(["method", "budget"]).agg(
        acc_mean=("val_acc", "mean"), acc_std=("val_acc", "std"), seeds=("val_acc", "size"),
        macs_mean=("macs", "mean"), executed_macs_mean=("executed_macs", "mean"), params_mean=("params", "mean"),
        speedup_b1=("speedup_b1", "median"), speedup_b32=("speedup_b32", "median"),
        accs=("val_acc", lambda v: " ".join(f"{a:.4f}" for a in v))).reset_index()
    dense_macs = float(ok[ok["method"] == "dense"]["macs"].mean()) if (ok["method"] == "dense").any() else None
    if dense_macs:
        table["macs_fraction"] = table["macs_mean"] / dense_macs
        table["executed_fraction"] = table["executed_macs_mean"] / dense_macs
        dense_acc = float(table[table["method"] == "dense"]["acc_mean"].iloc[0])
        table["acc_change_points"] = 100 * (table["acc_mean"] - dense_acc)
    table.to_csv(out / "table.csv", index=False)
    skipped = cells[cells["status"] != "ok"][["method", "budget", "seed", "status"]].to_dict("records")
    write_json(out / "summary.json", {"table": table.to_dict("records"), "skipped": skipped})
    _plot(table, out / "quality.png")
    return table


def _share(v: Any) -> str:
    return "-" if pd.isna(v) else f"{100 * v:.1f}%"


def _times(v: Any) -> str:
    return "-" if pd.isna(v) else f"{v:.2f}x"


def format_quality_table(table: pd.DataFrame) -> str:
    """One line per method and budget: accuracy mean ± std over its seeds, the change against dense in points,
    structural and executed MACs as shares of dense, and the measured speed-ups at batch 1 and 32."""
    if table.empty:
        return "no finished cell yet"
    nan = float("nan")
    w = max(6, *(len(m) for m in table["method"]))
    lines = [f"{'method':<{w}} {'budget':>6} {'seeds':>5} {'accuracy':>17} {'vs dense':>8} {'MACs':>6} "
             f"{'executed':>8} {'b1':>6} {'b32':>6}"]
    for r in table.sort_values(["budget", "method"], ascending=[False, True]).itertuples():
        accuracy = f"{r.acc_mean:.4f}" + ("" if pd.isna(r.acc_std) else f" ± {r.acc_std:.4f}")
        change = getattr(r, "acc_change_points", nan)
        lines.append(f"{r.method:<{w}} {'dense' if r.budget == 1 else f'{r.budget:g}':>6} {r.seeds:>5} "
                     f"{accuracy:>17} {'-' if pd.isna(change) else f'{change:+.2f}':>8} "
                     f"{_share(getattr(r, 'macs_fraction', nan)):>6} {_share(getattr(r, 'executed_fraction', nan)):>8} "
                     f"{_times(r.speedup_b1):>6} {_times(r.speedup_b32):>6}")
    return "\n".join(lines)


def _plot(table: pd.DataFrame, path: Path) -> None:
    """Accuracy change against dense vs MACs (with the published anchors) and vs measured speed-up (batch 1, 32)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if "acc_change_points" not in table:
        return
    panels = [("macs_fraction", "structural MACs, share of dense (log)"),
              *((f"speedup_b{b}", f"measured CPU speed-up vs dense, batch {b}") for b in LATENCY_BATCHES)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    colors = {method: f"C{i % 10}" for i, method in enumerate(sorted(table["method"].unique()))}
    for ax, (column, label) in zip(axes, panels):
        for method, rows in table.groupby("method"):
            rows = rows.dropna(subset=[column]).sort_values(column)
            if len(rows):  # one color per method in every panel, though some lack a column
                ax.errorbar(rows[column], rows["acc_change_points"], yerr=100 * rows["acc_std"].fillna(0),
                            marker="o", capsize=3, label=method, color=colors[method])
        if column == "macs_fraction":  # the published points sit close together: told apart by marker, in the legend
            ax.set_xscale("log")
            percent = FuncFormatter(lambda v, _: f"{100 * v:.0f}%")
            ax.xaxis.set_major_formatter(percent)
            ax.xaxis.set_minor_formatter(percent)
            ax.tick_params(axis="x", which="minor", labelsize=7)
            for (name, fraction, change), marker in zip(PUBLISHED, "*PX^v"):
                ax.scatter([fraction], [change], marker=marker, s=90, color="black", label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy change vs dense (points; mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("ours: this benchmark's protocol and validation split; black: published, original CIFAR-10 test set, "
                 "long protocols", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
