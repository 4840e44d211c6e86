"""What one tuning trial does: sample knobs, compute the MACs they imply, skip or train, report.

Every trial writes its own run folder (``trials/NNNN`` under the tuning run) and records in
its user attributes what a person needs to judge it: the MACs before training
(``planned_macs``, at most what the model will cost; ``minimum_macs`` for searches), the
exported model's ``macs``, ``val_acc``, ``feasible`` and ``run_dir``. The graded violation
``macs / budget - 1`` is the trial's Optuna constraint ``macs``: set before training for a
sample that cannot fit (which is then not trained, and ends PRUNED with ``skipped``), and
from the exported model's exact count after training.

With a latency budget (``TuneConfig.trial_latency_budget``) or objective ``pareto-latency``, a
finished trial's saved model is loaded again, put in its fastest exact forms and layout
(``choose_fastest_forms``, as the export does) and timed on this machine's CPU at
``trial_latency_batch`` (the faster layout's median): ``latency_ms`` and ``latency_fraction`` of
the study's dense reference. Under a budget, ``latency_ms / budget_ms - 1`` is the second
constraint ``measured_latency`` (always after ``macs``), and ``feasible`` needs both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nas_grouping.config import CompressConfig, SearchConfig
from nas_grouping.errors import ConfigError, ExportError, RunExistsError
from nas_grouping.tune._knobs import BUDGET, SHARE, Knob, apply_knobs, project_shares, share_param

__all__ = ["TrialContext", "make_objective", "CONSTRAINT", "LATENCY_CONSTRAINT", "trial_dir_name", "model_latency_ms"]

logger = logging.getLogger(__name__)

#: name of the Optuna constraint (system attribute ``constraints:macs``)
CONSTRAINT = "macs"
#: name of the second constraint, set after ``macs`` when a latency budget is given; it sorts after ``macs``, so
#: every storage lists the two in that order (database storages sort constraints by name, the others keep the
#: order they were set in)
LATENCY_CONSTRAINT = "measured_latency"


def trial_dir_name(number: int) -> str:
    return f"trials/{number:04d}"


@dataclass
class TrialContext:
    """What every trial of a study shares: the job, the knobs, the hard budget and the model facts."""

    kind: str
    base: SearchConfig | CompressConfig
    out: Path
    objective: str
    knobs: dict[str, Knob]
    budget_macs: int
    dense_macs: int
    minimum_macs: int
    input_size: tuple[int, ...]
    num_classes: int
    in_channels: int
    share_groups: dict[str, str] = field(default_factory=dict)  # compress: layer -> share group
    share_layers: list[tuple[str, int, int, float]] = field(default_factory=list)
    fixed_macs: int = 0
    source_model: Any = None  # compress: the input model (kept in memory, never modified)
    claim: Any = None  # the ClaimLock, released as soon as the trial exists
    quiet: bool = False
    measure_latency: bool = False  # time every finished trial's model (a latency budget or pareto-latency)
    latency_batch: int = 1
    latency_budget_ms: float | None = None  # resolved against the dense reference (set once the study is open)
    latency_reference_ms: float | None = None

    @property
    def multi(self) -> bool:
        return self.objective in ("pareto", "pareto-latency")

    def say(self, text: str) -> None:
        """One line of the study's progress, on the ``nas_grouping`` logger (INFO) unless quiet."""
        if not self.quiet:
            logger.info("[nas-grouping tune] %s", text)


def _record_constraint(trial: Any, macs: int, budget_macs: int) -> float:
    violation = macs / budget_macs - 1.0
    trial.set_constraint(CONSTRAINT, violation)
    trial.set_user_attr("violation", violation)
    return violation


def _sample(ctx: TrialContext, trial: Any) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, knob in ctx.knobs.items():
        if name == SHARE:
            for group in dict.fromkeys(ctx.share_groups.values()):
                params[share_param(group)] = knob.suggest(trial, share_param(group))
        else:
            params[name] = knob.suggest(trial)
    return params


@contextlib.contextmanager
def _trial_log(path: Path):
    """The job's own console output goes to the trial's log.txt; the tuner prints one line per trial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f):
        yield


def _describe(params: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


def model_latency_ms(model: Any, input_size: tuple[int, ...], batch: int) -> tuple[float, str]:
    """(ms, layout): ``model``'s inference latency on this machine's CPU in its fastest exact forms, at
    ``batch``: the forms and layout ``choose_fastest_forms`` picks, then the faster layout's median."""
    from nas_grouping.latency.measure import choose_fastest_forms, fastest_layouts

    model = model.to("cpu").eval()
    fastest, _ = choose_fastest_forms(model, input_size, batch=batch)
    layout, ms = fastest_layouts({"model": fastest}, input_size, batch=batch)["model"]
    return float(ms), layout


def _trial_latency(ctx: TrialContext, run_dir: Path) -> tuple[float, str]:
    """The latency of the model the trial saved in ``run_dir/model`` (what the user would deploy)."""
    from nas_grouping.export.model import load_model

    folder = run_dir / "model"
    if not (folder / "architecture.json").is_file():
        raise ExportError(f"the trial saved no model in {folder}, so its latency cannot be measured")
    return model_latency_ms(load_model(folder), ctx.input_size, ctx.latency_batch)


def _finish(ctx: TrialContext, trial: Any, *, val_acc: float, macs: int, started: float,
            params: dict[str, Any], run_dir: Path) -> float | tuple[float, float]:
    latency_ms = None
    if ctx.measure_latency:
        latency_ms, layout = _trial_latency(ctx, run_dir)
    violation = _record_constraint(trial, macs, ctx.budget_macs)  # macs first, then latency: a stable order
    feasible = macs <= ctx.budget_macs
    latency_note = ""
    if latency_ms is not None:
        trial.set_user_attr("latency_ms", latency_ms)
        trial.set_user_attr("latency_layout", layout)
        trial.set_user_attr("latency_batch", ctx.latency_batch)
        if ctx.latency_reference_ms:
            trial.set_user_attr("latency_fraction", latency_ms / ctx.latency_reference_ms)
        latency_note = f", {latency_ms:.3f} ms" + (f" ({latency_ms / ctx.latency_reference_ms:.1%} of dense)"
                                                    if ctx.latency_reference_ms else "")
        if ctx.latency_budget_ms is not None:
            lat_violation = latency_ms / ctx.latency_budget_ms - 1.0
            trial.set_constraint(LATENCY_CONSTRAINT, lat_violation)
            trial.set_user_attr("latency_violation", lat_violation)
            if latency_ms > ctx.latency_budget_ms:
                feasible = False
                latency_note += f", OVER the latency budget of {ctx.latency_budget_ms:.4g} ms by {lat_violation:.2%}"
    trial.set_user_attr("val_acc", val_acc)
    trial.set_user_attr("macs", macs)
    trial.set_user_attr("macs_fraction", macs / ctx.dense_macs)
    trial.set_user_attr("feasible", feasible)
    trial.set_user_attr("wall_time_s", time.perf_counter() - started)
    over_macs = macs > ctx.budget_macs
    ctx.say(f"trial {trial.number}: val acc {val_acc:.4f}, {macs:,} MACs ({macs / ctx.dense_macs:.1%} of dense)"
            + (f", OVER the MAC budget by {violation:.2%}" if over_macs else "") + latency_note + ", "
            + ("feasible" if feasible else "infeasible: never reported as best") + f" [{_describe(params)}]")
    if ctx.objective == "pareto-latency":
        return val_acc, float(latency_ms)
    return (val_acc, float(macs)) if ctx.multi else val_acc


def _skip(ctx: TrialContext, trial: Any, reason: str) -> None:
    import optuna

    trial.set_user_attr("feasible", False)
    trial.set_user_attr("skipped", reason)
    ctx.say(f"trial {trial.number}: not trained: {reason}")
    raise optuna.TrialPruned(reason)


def _search_trial(ctx: TrialContext, trial: Any, params: dict[str, Any], run_dir: Path, started: float
                  ) -> float | tuple[float, float]:
    import optuna

    from nas_grouping.budget import ModelCost
    from nas_grouping.search.loop import build_search_model, search

    budget = ctx.budget_macs
    if BUDGET in params:  # the sampled budget never exceeds the hard one (the knob's range is projected)
        budget = min(budget, int(params[BUDGET] * ctx.dense_macs))
    fixed = {"out": str(run_dir), "progress": False}
    if hasattr(ctx.base, "measure_latency"):
        fixed["measure_latency"] = False  # timing every trial costs time and says nothing about accuracy
    cfg = apply_knobs(ctx.base, params, budget=float(budget), **fixed)
    model = build_search_model(cfg, ctx.num_classes, ctx.in_channels)
    cost = ModelCost(model, ctx.input_size)
    del model
    trial.set_user_attr("minimum_macs", cost.minimum_macs)
    trial.set_user_attr("trial_dense_macs", cost.dense_macs)
    if cost.minimum_macs > ctx.budget_macs:
        _record_constraint(trial, cost.minimum_macs, ctx.budget_macs)
        _skip(ctx, trial, f"even fully grouped this network costs {cost.minimum_macs:,} MACs, over the budget of "
                          f"{ctx.budget_macs:,}")
    if cost.minimum_macs > budget:  # an architecture knob raised the floor above the sampled budget
        budget = cost.minimum_macs
        cfg = apply_knobs(ctx.base, params, budget=float(budget), **fixed)
    trial.set_user_attr("planned_macs", budget)

    def on_epoch(row: dict[str, Any]) -> None:
        trial.set_user_attr("epochs_done", int(row["epoch"]))
        if ctx.multi:
            return  # Optuna cannot prune multi-objective trials (trial.report raises)
        trial.report(float(row["val_acc"]), int(row["epoch"]))
        if trial.should_prune():
            raise optuna.TrialPruned(f"val acc {row['val_acc']:.4f} at epoch {row['epoch']}")

    try:
        with _trial_log(run_dir / "log.txt"):
            result = search(cfg, on_epoch=on_epoch)
    except optuna.TrialPruned as exc:
        _record_constraint(trial, budget, ctx.budget_macs)  # the projection would have met the sampled budget
        trial.set_user_attr("feasible", True)
        ctx.say(f"trial {trial.number}: pruned ({exc}) [{_describe(params)}]")
        raise
    s = result.summary
    return _finish(ctx, trial, val_acc=float(s["val_acc"]), macs=int(s["macs"]), started=started, params=params,
                   run_dir=run_dir)


def _compress_trial(ctx: TrialContext, trial: Any, params: dict[str, Any], run_dir: Path, started: float
                    ) -> float | tuple[float, float]:
    from nas_grouping.pipeline.compress import compress
    from nas_grouping.self_grouping.grouping import SelfGrouping

    fixed: dict[str, Any] = {"out": str(run_dir), "latency_batches": [], "grouping.progress": False}
    if SHARE in ctx.knobs:
        weights = {name: params[share_param(group)] for name, group in ctx.share_groups.items()}
        fractions = project_shares(ctx.share_layers, ctx.fixed_macs, ctx.budget_macs, weights)
        trial.set_user_attr("fractions", {k: round(v, 4) for k, v in fractions.items()})
        fixed.update({"grouping.fraction": {_escape(k): v for k, v in fractions.items()}, "grouping.budget": None})
    cfg = apply_knobs(ctx.base, params, **fixed)
    plan = SelfGrouping(cfg.grouping).plan(ctx.source_model, ctx.input_size)
    trial.set_user_attr("planned_macs", plan.macs_after)
    if plan.macs_after > ctx.budget_macs:
        _record_constraint(trial, plan.macs_after, ctx.budget_macs)
        _skip(ctx, trial, f"the plan keeps {plan.macs_after:,} MACs, over the budget of {ctx.budget_macs:,}")
    with _trial_log(run_dir / "log.txt"):
        result = compress(cfg)
    s = result.summary
    return _finish(ctx, trial, val_acc=float(s["val_acc_after"]), macs=int(s["macs_after"]), started=started,
                   params=params, run_dir=run_dir)


def _escape(name: str) -> str:
    """A layer name as an fnmatch pattern that matches only it."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def make_objective(ctx: TrialContext) -> Callable[[Any], float | tuple[float, float]]:
    """The Optuna objective of a study: one search or compress run per trial."""
    run = _search_trial if ctx.kind == "search" else _compress_trial

    def objective(trial: Any) -> float | tuple[float, float]:
        if ctx.claim is not None:
            ctx.claim.release()  # the trial exists now: other workers may claim the next one
        started = time.perf_counter()
        params = _sample(ctx, trial)
        run_dir = ctx.out / trial_dir_name(trial.number)
        trial.set_user_attr("run_dir", trial_dir_name(trial.number))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            return run(ctx, trial, params, run_dir, started)
        except RunExistsError:  # the trial's folder holds a run: every later trial would meet it too
            raise
        except ConfigError as exc:  # a combination of knobs the job rejects: a bad sample, not a bad study
            trial.set_user_attr("invalid", str(exc))
            _skip(ctx, trial, f"invalid combination of knobs: {exc}")
            raise  # unreachable: _skip raises

    return objective

