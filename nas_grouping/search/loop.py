"""The budget-constrained DGConv search loop, in plain PyTorch.

Phases, by epoch: warm-up (weights only), search (weights and gates, the
regularizer pulling the expected MACs under the budget), then fine-tuning with
frozen gates. Between search and fine-tuning the gates are *projected*: if the
binary gates still cost more than the budget, the gates whose removal costs the
least loss per saved MAC (first-order estimate on training batches) are turned
off until the model fits, so the exported model always meets the budget.

The same loop runs in one process and under ``torchrun`` (see ``runtime``): the
gates are DDP parameters, the regularizer is computed from them on every rank
(identically), and only rank 0 writes the run folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nas_grouping.budget import MacBudget, ModelCost, make_regularizer
from nas_grouping.config import SearchConfig, check_same_settings, config_from_dict, config_to_dict
from nas_grouping.convert import arch_parameters, dgconv_layers, weight_parameters
from nas_grouping.data import load_datasets, split_dataset
from nas_grouping.errors import BudgetError, ConfigError, RunExistsError
from nas_grouping.export.model import export_model, load_model, model_folder, save_model
from nas_grouping.files import check_run_folder, claim_run_folder
from nas_grouping.macs import count_parameters, mac_counts
from nas_grouping.runtime import Runtime, setup_runtime, unwrap
from nas_grouping.training import (epoch_loader, evaluate, load_checkpoint, make_lr_scheduler, save_checkpoint,
                                   seed_everything, train_epoch)

__all__ = ["search", "SearchResult", "project_to_budget", "build_search_model"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: settings that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset({"progress", "device", "out", "precision", "channels_last", "compile"})


@dataclass
class SearchResult:
    """What a search returns: the exported model, the searched supernet, and the summary written to disk."""

    model: nn.Module
    searched: nn.Module
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    run_dir: Path


def build_search_model(cfg: SearchConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The search space of ``cfg`` for a data set (DGConv layers get ``cfg.gate_init``)."""
    from search_spaces import get_space

    model = get_space(cfg.space, num_classes=num_classes, in_channels=in_channels, dense=cfg.dense,
                      **cfg.space_kwargs)
    for _, layer in dgconv_layers(model):
        with torch.no_grad():
            layer.gate_latent.copy_(layer.gate_latent.sign() * cfg.gate_init)
    if cfg.fixed_groups is not None:
        _hold_groups(model, cfg.fixed_groups)
    return model


def _describe_groups(groups: int | dict[str, int]) -> str:
    return str(groups) if isinstance(groups, int) else "per layer " + "/".join(map(str, sorted(set(groups.values()))))


def _hold_groups(model: nn.Module, groups: int | dict[str, int]) -> None:
    """Set every DGConv layer to ``groups`` contiguous groups (capped per layer), or to its entry of a per-layer map."""
    layers = dict(dgconv_layers(model))
    if isinstance(groups, dict):
        unknown = sorted(set(groups) - set(layers))
        missing = sorted(set(layers) - set(groups))
        if unknown or missing:
            raise ConfigError(f"fixed_groups: the map must name every searchable layer; unknown {unknown}, "
                              f"missing {missing}")
        for name, layer in layers.items():
            layer.set_groups(groups[name])
    else:
        for layer in layers.values():
            layer.set_groups(min(groups, layer.max_groups))


def _dense_model(cfg: SearchConfig, num_classes: int, in_channels: int, device: torch.device) -> nn.Module:
    """The dense network of ``cfg``'s space on ``device``: the reference that latency is measured against."""
    from search_spaces import get_space

    return get_space(cfg.space, num_classes=num_classes, in_channels=in_channels, dense=True,
                     **cfg.space_kwargs).to(device)


def groups_per_layer(model: nn.Module) -> dict[str, int]:
    return {name: layer.learned_groups for name, layer in dgconv_layers(unwrap(model))}


def _gate_gradients(model: nn.Module, batches: list, rt: Runtime) -> list[torch.Tensor]:
    """dL/dg for every DGConv layer's gates, averaged over ``batches`` (all-reduced under DDP)."""
    params = arch_parameters(unwrap(model))
    for p in params:
        p.grad = None
    model.train()
    for x, y in batches:
        x, y = rt.to_device(x), torch.as_tensor(y).to(rt.device).long()
        with rt.autocast():
            loss = F.cross_entropy(model(x).float(), y) / len(batches)
        loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in unwrap(model).parameters():
        p.grad = None
    return grads


def _flip_key(increase: float, relief: float) -> tuple[bool, float]:
    """Order of gate removals: free ones (estimated loss decrease) first, biggest relief first;
    then the least loss increase per unit of relief."""
    return (increase >= 0, increase / relief if increase >= 0 else -relief)


@dataclass
class Constraint:
    """One budget the projection must meet: the current cost, and what a gate change saves or adds."""

    name: str
    budget: float
    current: Callable[[], float]
    saved: Callable[[str, Any, int], float]  # turning gate j of a layer off
    added: Callable[[str, Any, int], float]  # turning it on


def mac_constraint(cost: ModelCost, budget_macs: int) -> Constraint:
    sizes = {name: size for name, _, size in cost.layers}
    return Constraint("MACs", budget_macs, cost.current_macs,
                      lambda name, layer, j: layer.macs(sizes[name]) / 2,
                      lambda name, layer, j: layer.macs(sizes[name]))


def latency_constraint(latency, budget_ms: float) -> Constraint:
    """For a ``latency.LatencyCost``: a gate change moves the layer to the table's time for its new
    group count and pattern (contiguous or permuted groups)."""
    values = {name: v for name, _, v in latency.layers}

    def change(name: str, layer, j: int, value: int) -> float:
        gates = layer.gate_values().tolist()
        before = latency.layer_ms(values[name], gates)
        gates[j] = value
        return latency.layer_ms(values[name], gates) - before

    return Constraint("latency (ms)", budget_ms, latency.current_ms,
                      lambda name, layer, j: -change(name, layer, j, 0),
                      lambda name, layer, j: change(name, layer, j, 1))


def project_to_budget(model: nn.Module, cost: ModelCost, budget_macs: int, batches: list, rt: Runtime, *,
                      extra: list[Constraint] | None = None) -> list[dict[str, Any]]:
    """Make the binary gates fit ``budget_macs`` (and any ``extra`` budget, e.g. latency), losing as
    little as the gradients can tell.

    Turning gate j off changes the loss by about -dL/dg_j (the straight-through
    gradient at the binary point). Gates change one at a time, free ones first, then
    the cheapest per unit of relief (the budgets still exceeded, each relative to
    its budget), until every budget is met: usually a gate off (fewer MACs), but a
    gate on where the latency table says fewer groups run faster. A change never
    pushes a budget that holds over it, so the excess falls at every step. Then
    gates that are off are turned back on while every budget still holds and the
    loss is estimated to fall (a large last removal can leave budget unused).
    Returns the changes. The decisions depend only on all-reduced gradients, so
    every DDP rank makes the same.
    """
    constraints = [mac_constraint(cost, budget_macs)] + list(extra or [])
    changes: list[dict[str, Any]] = []
    named = dgconv_layers(unwrap(model))
    layers = [layer for _, layer in named]

    def grads_by_layer() -> dict[int, torch.Tensor]:
        return {id(layer): g for layer, g in zip(layers, _gate_gradients(model, batches, rt))}

    def flip(name: str, layer, j: int, value: int, estimate: float, action: str) -> None:
        gates = layer.gate_values().tolist()
        gates[j] = value
        layer.set_gates(gates)
        changes.append({"action": action, "layer": name, "gate": j, "estimated_loss_change": estimate,
                        "groups_after": layer.learned_groups,
                        **{c.name: c.current() for c in constraints}})

    while True:
        over = [c for c in constraints if c.current() > c.budget]
        if not over:
            break
        grads = grads_by_layer()
        within = [c for c in constraints if c not in over]
        options = []
        for name, layer in named:
            gates = layer.gate_values()
            for j in range(layer.num_gates):
                on = gates[j] > 0.5
                # turning off saves; turning on can save too where grouping is slower (a latency table)
                delta = {id(c): (c.saved(name, layer, j) if on else -c.added(name, layer, j)) for c in constraints}
                relief = sum(delta[id(c)] / c.budget for c in over)
                if relief <= 0 or any(delta[id(c)] < 0 and c.current() - delta[id(c)] > c.budget
                                      for c in within):
                    continue  # no help, or it would break a budget that holds
                increase = -float(grads[id(layer)][j]) if on else float(grads[id(layer)][j])
                options.append((_flip_key(increase, relief), name, layer, j, increase, on))
        if not options:
            raise BudgetError("projection: no gate change brings " + ", ".join(
                f"{c.name} ({c.current():,.3f} > budget {c.budget:,.3f})" for c in over)
                + " closer to its budget without breaking another; relax one of the budgets")
        _, name, layer, j, increase, on = min(options, key=lambda o: o[0])
        flip(name, layer, j, 0 if on else 1, increase, "off" if on else "on")
    if not changes:
        return changes
    while True:
        grads = grads_by_layer()
        options = []
        for name, layer in named:
            gates = layer.gate_values()
            for j in range(layer.num_gates):
                gain = float(grads[id(layer)][j])
                if gates[j] < 0.5 and gain < 0 and all(
                        c.current() + c.added(name, layer, j) <= c.budget for c in constraints):
                    options.append((gain, name, layer, j))
        if not options:
            return changes
        gain, name, layer, j = min(options, key=lambda o: o[0])
        flip(name, layer, j, 1, gain, "on")


def project_to_measured_latency(model: nn.Module, cost: ModelCost, budget_macs: int, batches: list, rt: Runtime,
                                latency, budget_ms: float, measure: Callable[[nn.Module], float], *,
                                reference_ms: float, tries: int = 4, tolerance: float = 0.05) -> dict[str, Any]:
    """Project the gates to ``budget_macs`` and a latency budget that holds when *measured*.

    A table predicts each layer alone; the whole model runs differently (folded gathers,
    fused operators, caches), so the prediction can be off by tens of percent. Each try
    projects (``project_to_budget``) from the same start to a table target and measures the
    result (``measure``: ms, e.g. ``latency.MeasuredLatency``); ``latency.meet_measured_budget``
    moves the target (the secant method on measured latency, the dense model's
    ``reference_ms`` included). A target the table cannot reach leaves the gates where the
    projection got stuck (the fastest it found within the MAC budget): that is measured, and
    nothing faster is tried. A target the MAC budget cannot meet (on narrow layers grouping
    can be slower than dense) moves halfway up; if none is met, the MAC budget alone is
    projected. The model is left at the least pruned try that met ``budget_ms`` when
    measured, else at the fastest. Returns a report with every try and the gate changes from
    the start (``changes``). ``measure`` runs on the main rank only and its result is
    broadcast, so all DDP ranks make the same choice.
    """
    from nas_grouping.latency.measure import meet_measured_budget

    net = unwrap(model)
    named = dgconv_layers(net)

    def tracked() -> list[tuple[str, torch.Tensor]]:  # what a projection changes: gate latents, BN statistics
        return [*((n + ".gate_latent", layer.gate_latent) for n, layer in named), *net.named_buffers()]

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in tracked()}

    def restore(state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in tracked():
                v.copy_(state[k])

    start = snapshot()

    def try_target(target: float | None) -> dict[str, Any]:
        restore(start)
        extra = [latency_constraint(latency, target)] if target is not None else None
        stuck = False
        try:
            project_to_budget(model, cost, budget_macs, batches, rt, extra=extra)
        except BudgetError:
            if target is None or cost.current_macs() > budget_macs:
                raise  # the MAC budget needs more latency than this target
            stuck = True  # the MAC budget holds; the table has nothing faster: measure what it reached
        measured = rt.on_main(lambda: measure(net), "measuring the projected model")
        return {"predicted_ms": latency.current_ms(), "measured_ms": measured, "stuck": stuck,
                "_reached": latency.current_ms(), "_state": snapshot()}

    best, tried = meet_measured_budget(try_target, budget_ms, table_dense_ms=latency.dense_ms,
                                       reference_ms=reference_ms, floor=latency.minimum_ms, tries=tries,
                                       tolerance=tolerance)
    restore(best["_state"])
    signs = {n: (start[n + ".gate_latent"] >= 0, best["_state"][n + ".gate_latent"] >= 0) for n, _ in named}
    changes = [{"action": "on" if b else "off", "layer": name, "gate": j, "groups_after": layer.learned_groups}
               for name, layer in named for j, (a, b) in enumerate(zip(*(x.tolist() for x in signs[name])))
               if a != b]
    return {"changes": changes, "budget_ms": budget_ms, "reference_ms": reference_ms,
            "table_dense_ms": latency.dense_ms, "met": best["met"], "measured_ms": best["measured_ms"],
            "predicted_ms": best["predicted_ms"], "table_target_ms": best["table_target_ms"], "tries": tried}


def _project(base: nn.Module, cost: ModelCost, budget_macs: int, train_set, cfg: SearchConfig, rt: Runtime,
             epoch: int, latency=None, latency_budget_ms: float | None = None, measured=None
             ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Projection at the end of the search, on a few seeded training batches: the gate changes, and the
    measured-latency loop's report when ``measured`` = (measure, reference ms, budget ms) closes the loop."""
    loader = epoch_loader(train_set, rt, batch_size=cfg.data.batch_size, train=True, seed=cfg.seed + 31, epoch=epoch)
    batches = [b for _, b in zip(range(4), loader)]
    _set_gate_training(base, True)
    if measured is not None:
        measure, reference_ms, budget_ms = measured
        loop = project_to_measured_latency(rt.prepare(base), cost, budget_macs, batches, rt, latency, budget_ms,
                                           measure, reference_ms=reference_ms)
        return loop.pop("changes"), loop
    extra = [latency_constraint(latency, latency_budget_ms)] if latency is not None else None
    return project_to_budget(rt.prepare(base), cost, budget_macs, batches, rt, extra=extra), None


def _latency_budget(cfg: SearchConfig, base: nn.Module, input_size, rt: Runtime, out: Path, num_classes: int):
    """The latency cost, its budget (ms, the table's) and, with ``cfg.latency_measured``, (measure,
    measured dense ms, measured budget ms) for the final projection; (None, None, None) without a budget.

    The table is measured on rank 0 and broadcast, so every rank optimises the same numbers.
    """
    if cfg.latency_budget is None or cfg.dense or cfg.fixed_groups is not None:
        return None, None, None
    from nas_grouping.latency.measure import LatencyCost, LatencyTable, parse_latency_budget, profile_layers

    table = None
    if rt.is_main:
        if cfg.latency_table:
            table = LatencyTable.load(cfg.latency_table, device=rt.device)
        else:
            logger.info("[nas-grouping] profiling layer latency at batch %d on this machine ...", cfg.latency_batch)
            table = profile_layers(base, input_size, batch=cfg.latency_batch)
            out.mkdir(parents=True, exist_ok=True)
            table.save(out / "latency_table.json")
    table = rt.broadcast(table)
    latency = LatencyCost(base, table)
    budget_ms = parse_latency_budget(cfg.latency_budget, latency.dense_ms)
    measured = None
    if cfg.latency_measured:
        from nas_grouping.latency.measure import MeasuredLatency

        measure = None
        if rt.is_main:
            measure = MeasuredLatency(_dense_model(cfg, num_classes, input_size[0], rt.device), input_size,
                                      batch=cfg.latency_batch)
        reference_ms = rt.broadcast(measure.reference_ms if rt.is_main else None)
        measured_budget = parse_latency_budget(cfg.latency_budget, reference_ms)
        measured = (measure, reference_ms, measured_budget)
        budget_ms = measured_budget * latency.dense_ms / reference_ms  # the table's units, for the regularizer
        if budget_ms < latency.minimum_ms and rt.is_main:
            logger.warning("the latency budget (%.3f ms measured, %.3f ms by the table) is under the table's fastest "
                           "grouping (%.3f ms): the final projection will measure what it can reach, and may report "
                           "the budget NOT met", measured_budget, budget_ms, latency.minimum_ms)
    else:  # a measured budget is judged by measuring (the loop reports it unmet); a predicted one fails now
        latency.check_budget(budget_ms)
    return latency, budget_ms, measured


def make_gate_optimizer(params: list[nn.Parameter], kind: str, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    """The gates' own optimizer, never with weight decay (it drags latents to 0, where they flip on noise).

    With SGD a gate's speed is proportional to its gradient, so the regularizer moves the
    gates of expensive layers first; Adam moves every gate by about ``lr`` per step. No
    momentum by default: the hinge regularizer stops pulling once the binary cost is under
    budget, and momentum would carry the latents on, turning off gates the budget did not
    ask for (measured: 38.5% of dense at a 50% budget with momentum 0.9, 47.3% without).
    """
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), weight_decay=0.0)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
    raise ConfigError(f"gate optimizer must be adam or sgd, got {kind!r}")


def _phase(cfg: SearchConfig, epoch: int) -> str:
    if cfg.dense or cfg.fixed_groups is not None:
        return "train"
    if epoch < cfg.warmup_epochs:
        return "warmup"
    return "search" if epoch < cfg.epochs else "finetune"


def _set_gate_training(model: nn.Module, on: bool) -> None:
    for _, layer in dgconv_layers(model):
        layer.gate_latent.requires_grad_(on)


def _check_resume(saved: dict[str, Any], cfg: SearchConfig) -> None:
    check_same_settings(saved, config_to_dict(cfg), allowed=RESUMABLE_CHANGES, where=cfg.out, kind=SearchConfig)


class _Cycle:
    """Endless iterator over freshly seeded epoch loaders (the bi-level gate data)."""

    def __init__(self, dataset, rt: Runtime, batch_size: int, seed: int) -> None:
        self.dataset, self.rt, self.batch_size, self.seed = dataset, rt, batch_size, seed
        self.round = 0
        self.it: Iterator | None = None

    def next(self):
        while True:
            if self.it is None:
                self.it = iter(epoch_loader(self.dataset, self.rt, batch_size=self.batch_size, train=True,
                                            seed=self.seed + 7919, epoch=self.round))
                self.round += 1
            try:
                return next(self.it)
            except StopIteration:
                self.it = None


@dataclass
class _SearchRun:
    """The state a search carries from stage to stage (settings, runtime, data, model, budgets, optimizers)."""

    cfg: SearchConfig
    rt: Runtime
    out: Path
    ds: Any
    input_size: tuple[int, ...]
    base: nn.Module
    cost: ModelCost
    budget: MacBudget
    budget_macs: int
    fixed: bool
    latency: Any
    latency_budget_ms: float | None
    measured: Any
    train_set: Any
    gate_set: Any
    weight_opt: torch.optim.Optimizer
    gate_opt: torch.optim.Optimizer | None
    scheduler: Any
    per_batch: bool
    scaler: Any
    regularizer: Callable
    start_time: float
    history: list[dict[str, Any]]
    flips: list[dict[str, Any]] | None = None
    latency_loop: dict[str, Any] | None = None
    start_epoch: int = 0

    @property
    def dense_macs(self) -> int:
        return self.cost.dense_macs

    @property
    def total(self) -> int:
        return self.cfg.total_epochs


def search(cfg: SearchConfig, *, resume: bool = False,
           on_epoch: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Run a budget-constrained DGConv search (or dense training with ``cfg.dense``) and export the result.

    Writes to ``cfg.out``: ``config.json``, ``checkpoint.pt`` (every epoch, atomically),
    ``history.csv``, ``layers.csv``, ``summary.json``, plots, and ``model/`` (the
    exported model, loadable with ``load_model``).

    ``on_epoch`` is called on rank 0 with each history row, after the epoch's checkpoint is
    written; an exception it raises stops the run there (how a tuning pruner stops a trial).

    Raises:
        BudgetError: the budget is below what the most grouped configuration costs.
        ConfigError / DataError: bad settings or data, before any training.
    """
    run = _prepare(cfg)
    _start(run, resume)
    _train(run, on_epoch)
    _project_if_never_fine_tuned(run)
    exported, evaluation = _export(run)
    exported, latency_measured, per_layer = _measure_latency(run, exported)
    summary = _summarize(run, exported, evaluation, latency_measured)
    _write_run(run, exported, summary, per_layer)
    return SearchResult(model=exported, searched=run.base, summary=summary, history=run.history, run_dir=run.out)


def _prepare(cfg: SearchConfig) -> _SearchRun:
    """Runtime, data, search space, budgets, latency table and optimizers; every check that needs no training."""
    start_time = time.perf_counter()
    rt = setup_runtime(cfg.device, cfg.precision, cfg.channels_last, cfg.compile)
    out = Path(cfg.out)
    rt.on_main(lambda: check_run_folder(out, "search"), "checking the run folder")
    ds = load_datasets(cfg.data)
    input_size = (ds.in_channels, *ds.input_size)
    seed_everything(cfg.seed)
    base = build_search_model(cfg, ds.num_classes, ds.in_channels)
    if cfg.init_from:
        _init_weights(base, cfg.init_from)
    cost = ModelCost(base, input_size)
    budget = MacBudget.parse(cfg.budget)
    fixed = cfg.dense or cfg.fixed_groups is not None  # no search: nothing to budget or project
    budget_macs = cost.current_macs() if fixed else budget.resolve(cost.dense_macs)
    if not fixed:
        if not dgconv_layers(base):
            raise ConfigError(f"space {cfg.space!r} has no DGConv2d layer to search")
        cost.check_budget(budget_macs)

    base.to(rt.device)  # before the optimizers load any state (and the latency table: measured where it runs)
    latency, latency_budget_ms, measured = _latency_budget(cfg, base, input_size, rt, out, ds.num_classes)

    train_set, gate_set = ds.train, None
    if cfg.bilevel and not fixed:
        train_set, gate_set = split_dataset(ds.train, cfg.gate_split, seed=cfg.seed)

    weight_opt = torch.optim.SGD(weight_parameters(base), lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    gate_opt = make_gate_optimizer(arch_parameters(base), cfg.gate_optimizer, cfg.gate_lr) if not fixed else None
    steps = len(epoch_loader(train_set, rt, batch_size=cfg.data.batch_size, train=True, seed=cfg.seed, epoch=0))
    scheduler, per_batch = make_lr_scheduler(weight_opt, cfg.lr_schedule, epochs=cfg.total_epochs,
                                             steps_per_epoch=steps, warmup_epochs=cfg.lr_warmup_epochs)
    return _SearchRun(cfg=cfg, rt=rt, out=out, ds=ds, input_size=input_size, base=base, cost=cost, budget=budget,
                      budget_macs=budget_macs, fixed=fixed, latency=latency, latency_budget_ms=latency_budget_ms,
                      measured=measured, train_set=train_set, gate_set=gate_set, weight_opt=weight_opt,
                      gate_opt=gate_opt, scheduler=scheduler, per_batch=per_batch,
                      scaler=rt.grad_scaler() if cfg.precision == "16" else None,
                      regularizer=make_regularizer(cfg.regularizer, cfg.reg_strength), start_time=start_time,
                      history=[])


def _start(run: _SearchRun, resume: bool) -> None:
    """Refuse a finished run's folder without --resume, restore a checkpoint with it, claim the folder, say what runs."""
    cfg, rt, out = run.cfg, run.rt, run.out
    problem = None
    if rt.is_main and not resume and (out / CHECKPOINT).exists():
        problem = f"{out} already holds a run; pass --resume to continue it, or choose another --out"
    problem = rt.broadcast(problem)  # every rank raises, none waits at a barrier
    if problem:
        raise RunExistsError(problem)
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        _check_resume(ckpt["config"], cfg)
        run.base.load_state_dict(ckpt["model"])
        run.weight_opt.load_state_dict(ckpt["weight_opt"])
        if run.gate_opt is not None and ckpt.get("gate_opt") is not None:
            run.gate_opt.load_state_dict(ckpt["gate_opt"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.history, run.flips, run.start_epoch = ckpt["history"], ckpt["flips"], ckpt["next_epoch"]
        run.latency_loop = ckpt.get("latency_loop")
        torch.set_rng_state(ckpt["rng"])
        run.start_time -= ckpt.get("wall_time_s", 0.0)  # the summary's wall time counts every session of the run
    if rt.is_main:
        from nas_grouping import report

        claim_run_folder(out, "search")
        report.write_json(out / "config.json", config_to_dict(cfg))
        if run.ds.split is not None:
            report.write_json(out / "data_split.json", run.ds.split)
        what = ("dense training" if cfg.dense else
                f"fixed groups={_describe_groups(cfg.fixed_groups)}, {run.budget_macs:,} MACs"
                if cfg.fixed_groups is not None else f"budget {run.budget.describe(run.dense_macs)}")
        logger.info(f"[nas-grouping] {cfg.space} on {run.ds.name}: dense {run.dense_macs:,} MACs/sample, {what}"
                    f", device {rt.device}, {rt.world_size} process(es)")


def _train(run: _SearchRun, on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
    """The epochs: warm-up, search, the projection at the first fine-tuning epoch, fine-tuning; a checkpoint each."""
    cfg, rt = run.cfg, run.rt
    model = None
    current_phase = None
    bar = tqdm(range(run.start_epoch, run.total), desc="epochs", disable=not (cfg.progress and rt.is_main),
               initial=run.start_epoch, total=run.total, dynamic_ncols=True)
    for epoch in bar:
        phase = _phase(cfg, epoch)
        if phase == "finetune" and run.flips is None:
            run.flips, run.latency_loop = _project(run.base, run.cost, run.budget_macs, run.train_set, cfg, rt, epoch,
                                                   run.latency, run.latency_budget_ms, run.measured)
            if run.flips and rt.is_main:
                logger.info(f"[nas-grouping] projected to the budget by {len(run.flips)} gate change(s): "
                            + ", ".join(f"{f['layer']} {f['action']}->G={f['groups_after']}" for f in run.flips))
        if phase != current_phase:
            _set_gate_training(run.base, phase == "search")
            model = rt.prepare(run.base)
            current_phase = phase
        loader = epoch_loader(run.train_set, rt, batch_size=cfg.data.batch_size, train=True, seed=cfg.seed,
                              epoch=epoch, num_workers=cfg.data.num_workers)
        stats = train_epoch(model, loader, rt, weight_optimizer=run.weight_opt, scaler=run.scaler,
                            progress=cfg.progress, desc=f"epoch {epoch + 1}/{run.total} {phase}",
                            label_smoothing=cfg.label_smoothing,
                            batch_scheduler=run.scheduler if run.per_batch else None,
                            **(_gate_steps(run, model, epoch) if phase == "search" else {}))
        if not run.per_batch:
            run.scheduler.step()
        val = evaluate(model, epoch_loader(run.ds.val, rt, batch_size=256, train=False, seed=0, epoch=0), rt)
        row = {"epoch": epoch + 1, "phase": phase, "lr": run.weight_opt.param_groups[0]["lr"],
               "train_loss": stats["loss"], "train_acc": stats["acc"], "val_loss": val["loss"], "val_acc": val["acc"],
               "macs": run.cost.current_macs(), "budget_macs": run.budget_macs,
               **({"latency_ms_predicted": run.latency.current_ms()} if run.latency is not None else {}),
               "groups": groups_per_layer(run.base), "time_s": time.perf_counter() - run.start_time}
        run.history.append(row)
        bar.set_postfix(acc=f"{val['acc']:.3f}", macs=f"{row['macs'] / run.dense_macs:.2f}x")
        if rt.is_main:
            logger.info(f"epoch {epoch + 1:3d}/{run.total} {phase:8s} train loss {stats['loss']:.4f} acc "
                        f"{stats['acc']:.4f} | val acc {val['acc']:.4f} | MACs {row['macs']:,} "
                        f"({row['macs'] / run.dense_macs:.1%} of dense)")
            _checkpoint(run, epoch)
            if on_epoch is not None:
                on_epoch(row)
        rt.barrier()
    bar.close()


def _gate_steps(run: _SearchRun, model: nn.Module, epoch: int) -> dict[str, Any]:
    """How a search epoch moves the gates: with the regularized loss of each batch, or (bi-level) on their own data."""
    cfg, rt, reg = run.cfg, run.rt, run.regularizer

    share = _budget_share(cfg, epoch)
    target_macs = run.dense_macs - share * (run.dense_macs - run.budget_macs)
    target_ms = (run.latency.dense_ms - share * (run.latency.dense_ms - run.latency_budget_ms)
                 if run.latency is not None else None)

    def loss_hook(task: torch.Tensor) -> torch.Tensor:
        loss = reg(task, run.cost.expected_macs(), target_macs)
        return reg(loss, run.latency.expected_ms(), target_ms) if run.latency is not None else loss

    if not cfg.bilevel:
        return {"loss_hook": loss_hook, "gate_optimizer": run.gate_opt}
    gates_data = _Cycle(run.gate_set, rt, cfg.data.batch_size, cfg.seed + epoch)

    def gate_step() -> None:
        x, y = gates_data.next()
        x, y = rt.to_device(x), torch.as_tensor(y).to(rt.device).long()
        run.gate_opt.zero_grad(set_to_none=True)
        with rt.autocast():
            task = F.cross_entropy(model(x).float(), y)
        loss_hook(task).backward()
        run.gate_opt.step()

    return {"loss_hook": None, "gate_step": gate_step}


def _budget_share(cfg: SearchConfig, epoch: int) -> float:
    """How far the regularizer's target has moved from the dense cost to the budget in search ``epoch`` (1: there)."""
    ramp = cfg.budget_ramp * max(cfg.epochs - cfg.warmup_epochs, 1)
    return 1.0 if ramp <= 0 else min(1.0, (epoch - cfg.warmup_epochs + 1) / ramp)


def _init_weights(base: nn.Module, source: str) -> None:
    """Load a trained model's weights into the search space (every weight of it; the gates keep their start)."""
    trained = load_model(model_folder(source)).state_dict()
    wanted = {k: v for k, v in base.state_dict().items() if not k.endswith("gate_latent")}
    missing = sorted(k for k in wanted if k not in trained)
    misfit = sorted(k for k in wanted if k in trained and trained[k].shape != wanted[k].shape)
    if missing or misfit:
        raise ConfigError(f"init_from {source}: its weights do not fit the search space (missing "
                          f"{missing[:5]}{'...' if len(missing) > 5 else ''}, other shapes {misfit[:5]}); give a model "
                          "of the same space and settings, such as `nas-grouping train`'s")
    base.load_state_dict({k: trained[k] for k in wanted}, strict=False)


def _checkpoint(run: _SearchRun, epoch: int) -> None:
    """Everything a resumed run needs to continue exactly, written atomically after ``epoch``."""
    save_checkpoint({
        "config": config_to_dict(run.cfg), "model": run.base.state_dict(), "weight_opt": run.weight_opt.state_dict(),
        "gate_opt": run.gate_opt.state_dict() if run.gate_opt is not None else None,
        "scheduler": run.scheduler.state_dict(), "history": run.history, "flips": run.flips,
        "latency_loop": run.latency_loop, "next_epoch": epoch + 1, "wall_time_s": time.perf_counter() - run.start_time,
        "rng": torch.get_rng_state(),
    }, run.out / CHECKPOINT)


def _project_if_never_fine_tuned(run: _SearchRun) -> None:
    """A run without a fine-tuning epoch is projected to its budgets now, before export."""
    if run.flips is None:
        run.flips, run.latency_loop = _project(run.base, run.cost, run.budget_macs, run.train_set, run.cfg, run.rt,
                                               run.total, run.latency, run.latency_budget_ms, run.measured) \
            if not run.fixed else ([], None)


def _export(run: _SearchRun) -> tuple[nn.Module, dict[str, Any]]:
    """Freeze the gates and export; evaluate the searched and the exported model and how far apart they are."""
    rt, base = run.rt, run.base
    groups = groups_per_layer(base)
    if any(g != groups for g in rt.gather(groups)):
        raise RuntimeError(f"ranks disagree on the learned groups: {rt.gather(groups)}")  # never expected
    for _, layer in dgconv_layers(base):
        layer.freeze_gates()
    base.eval()
    exported = export_model(base)
    exported.eval()
    val_loader = epoch_loader(run.ds.val, rt, batch_size=256, train=False, seed=0, epoch=0)
    searched_val = evaluate(base, val_loader, rt)
    exported_val = evaluate(exported, val_loader, rt)
    with torch.no_grad():
        x = rt.to_device(next(iter(val_loader))[0][:16])
        max_diff = float((base(x) - exported(x)).abs().max())
    return exported, {"groups": groups, "searched": searched_val, "exported": exported_val, "max_diff": max_diff}


def _measure_latency(run: _SearchRun, exported: nn.Module) -> tuple[nn.Module, dict[str, Any] | None, Any]:
    """On rank 0 with ``measure_latency``: the fastest exact forms and layout on this machine, and every layer of the
    dense and exported model timed (the per-layer table); else the export as it is."""
    cfg, latency = run.cfg, run.latency
    if not (cfg.measure_latency and run.rt.is_main):
        return exported, None, None
    from nas_grouping.latency.layers import layer_latency, summary_from_layers
    from nas_grouping.latency.measure import choose_fastest_forms

    exported, forms = choose_fastest_forms(exported, run.input_size, batch=cfg.latency_batch)
    dense_model = _dense_model(cfg, run.ds.num_classes, run.ds.in_channels, run.rt.device)
    predicted, predicted_batch = None, 1
    if latency is not None:
        predicted = {name: latency.layer_ms(v, layer.gate_values()) for name, layer, v in latency.layers}
        predicted["(whole model)"] = latency.current_ms()
        predicted_batch = latency.batch
    per_layer = layer_latency(dense_model, exported, run.input_size, batches=sorted({1, 32, predicted_batch}),
                              predicted=predicted, predicted_batch=predicted_batch)
    measured = summary_from_layers(per_layer)  # whole-model row, the same numbers as the CSV
    measured["layers_file"] = "latency_layers.csv"
    measured["export_choice"] = {"layout": forms["layout"],
                                 "dense_form_layers": sorted(k for k, v in forms["layers"].items()
                                                             if v["form"] == "dense")}
    return exported, measured, per_layer


def _summarize(run: _SearchRun, exported: nn.Module, evaluation: dict[str, Any],
               latency_measured: dict[str, Any] | None) -> dict[str, Any]:
    """The run's summary: accuracy, MACs against the budget, parameters, projection, latency, groups."""
    cfg, rt = run.cfg, run.rt
    exported_macs, executed_macs = mac_counts(exported, run.input_size)
    return {
        "space": cfg.space, "dataset": run.ds.name, "dense": cfg.dense,
        "val_acc": evaluation["exported"]["acc"], "val_loss": evaluation["exported"]["loss"],
        "searched_val_acc": evaluation["searched"]["acc"],
        "macs": exported_macs, "dense_macs": run.dense_macs, "budget_macs": run.budget_macs,
        "macs_fraction": exported_macs / run.dense_macs, "budget_met": exported_macs <= run.budget_macs,
        "executed_macs": executed_macs,
        "params": count_parameters(exported), "projected": bool(run.flips), "projection_flips": run.flips,
        "export_max_abs_diff": evaluation["max_diff"], "epochs": run.total,
        "wall_time_s": time.perf_counter() - run.start_time,
        "latency": latency_measured,
        **_latency_summary(run.latency, run.latency_budget_ms, exported, run.input_size, cfg, latency_measured,
                           run.latency_loop),
        **({"latency_measured_loop": run.latency_loop} if run.latency_loop is not None else {}),
        "groups": evaluation["groups"], "world_size": rt.world_size, "ranks_agree_on_groups": True,
        "device": str(rt.device),
    }


def _write_run(run: _SearchRun, exported: nn.Module, summary: dict[str, Any], per_layer: Any) -> None:
    """On rank 0: history, layer tables, plots, the per-layer latency files, the saved model and the summary."""
    if run.rt.is_main:
        from nas_grouping import report

        report.write_search_report(run.out, run.base, exported, run.input_size, run.history, summary)
        if per_layer is not None:
            from nas_grouping.latency.layers import write_layer_latency

            write_layer_latency(per_layer, run.out)
        save_model(exported, run.out / "model", extra={
            **{k: summary[k] for k in ("val_acc", "macs", "dense_macs", "budget_macs", "space", "dataset")},
            "input_size": list(run.input_size)})
        logger.info(report.format_summary(summary))
    run.rt.barrier()


def _latency_summary(latency, budget_ms: float | None, exported: nn.Module, input_size, cfg: SearchConfig,
                     measured_report: dict[str, Any] | None = None, loop: dict[str, Any] | None = None) -> dict:
    """Predicted (table) vs measured latency of the exported model at the budget's batch size
    (the measurement of ``measured_report`` when it has that batch, else a new one). With a
    measured budget (``loop``) the budget is the measured one and whether it was met is the
    loop's side-by-side verdict; the table's budget is reported apart."""
    if latency is None:
        return {}
    from nas_grouping.latency.measure import measure_ms

    at_batch = (measured_report or {}).get(f"batch_{latency.batch}")
    measured = at_batch["exported_ms"] if at_batch else min(measure_ms(
        exported, input_size, batch=latency.batch, layouts=("nchw", "channels_last")).values())
    predicted = latency.current_ms()
    out = {"latency_budget_ms": budget_ms, "latency_predicted_ms": predicted, "latency_measured_ms": measured,
           "latency_prediction_error": (predicted - measured) / measured, "latency_batch": latency.batch,
           "latency_budget_met_predicted": predicted <= budget_ms}
    if loop is not None:
        out.update(latency_budget_ms=loop["budget_ms"], latency_table_budget_ms=budget_ms,
                   latency_budget_met_measured=loop["met"])
    return out


def load_search_config(run_dir: str | Path) -> SearchConfig:
    """The configuration a run folder was made with (to resume it or repeat it)."""
    from nas_grouping.report import read_json

    return config_from_dict(SearchConfig, read_json(Path(run_dir) / "config.json"))
