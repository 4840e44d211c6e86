"""Optuna tuning of the search's and the self-grouping pass's knobs under a hard MAC budget.

Optuna's constraints are soft, so the budget is made hard here: before any training each
trial computes the MACs its sampled knobs imply (a search: the most grouped network's
cost, and the budget the search projects to; a compression: the exact plan), records the
graded violation ``macs / budget - 1`` as the constraint ``macs``, and is not trained when it
cannot fit. Knobs that set MACs are sampled so every sample fits (the search's budget up
to the hard one; per-layer shares of the budget, projected). The results count a trial as
feasible only when its exported model's MACs are within the budget.

    >>> from nas_grouping.config import SearchConfig, TuneConfig
    >>> from nas_grouping.tune.study import tune
    >>> result = tune(SearchConfig(space="resnet20", budget=0.5, out="runs/tune"), TuneConfig(trials=20))
    >>> result.best["val_acc"], result.best["params"]

Latency: with ``TuneConfig(trial_latency_budget="2.5ms")`` (or a fraction of the dense
latency) or ``objective="pareto-latency"``, every finished trial's saved model is timed on this
machine's CPU in its fastest exact forms and layout, at ``trial_latency_batch``. The dense
reference (search: the dense searched space; compress: the input model) is timed once per
study and kept in the study (workers and resumed runs reuse it); a fractional budget resolves
against it. A budget adds the constraint ``measured_latency`` (``latency_ms / budget_ms - 1``,
after ``macs``), and a trial is feasible only when it meets both budgets.

Modes: ``objective="accuracy"`` maximizes validation accuracy, and a pruner stops bad trials
from their per-epoch reports; ``objective="pareto"`` trades accuracy against MACs and
``"pareto-latency"`` against measured latency (no pruning: Optuna cannot prune
multi-objective trials). Storage: a SQLite file in the run folder, a journal file for
``workers > 1``, or a PostgreSQL/MySQL URL shared by machines.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import socket
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nas_grouping.config import (TUNE_PRUNERS, TUNE_SAMPLERS, CompressConfig, SearchConfig, TuneConfig,
                                 config_from_dict, config_to_dict)
from nas_grouping.errors import ConfigError, WorkerError
from nas_grouping.files import check_run_folder, claim_run_folder
from nas_grouping.report import read_json, write_json
from nas_grouping.tune._knobs import (BUDGET, SHARE, Knob, apply_knobs, check_enqueued, knob_groups, parse_knobs,
                                      share_param)
from nas_grouping.tune._report import SUMMARY, format_tuning_run, write_results
from nas_grouping.tune._storage import ClaimLock, StorageSpec, WorkerLock, open_storage, resolve_storage
from nas_grouping.tune._trials import TrialContext, make_objective, model_latency_ms

__all__ = ["tune", "TuneResult", "Knob", "print_tuning_run", "is_tuning_run", "load_tuning_config"]

logger = logging.getLogger(__name__)

SETTINGS_ATTR = "nas_grouping.settings"
#: study user attribute holding the dense reference latency (measured once per study)
LATENCY_ATTR = "nas_grouping.latency_reference"
TUNE_FILE = "tune.json"
#: job settings a trial never takes from the base (each trial sets them), so they may change on resume
_VOLATILE = {"out", "progress", "device", "latency_batches", "latency_repeats", "measure_latency", "latency_batch"}


@dataclass
class TuneResult:
    """What ``tune`` returns: the study, the best feasible trial (or the Pareto front), the summary written."""

    study: Any
    summary: dict[str, Any]
    run_dir: Path

    @property
    def best(self) -> dict[str, Any] | None:
        """The best feasible trial: number, val_acc, macs, params, run_dir (None when none is feasible)."""
        return self.summary.get("best")

    @property
    def pareto_front(self) -> list[dict[str, Any]]:
        """The feasible trials no other feasible trial beats on both accuracy and cost, by cost (MACs; the
        measured latency for objective pareto-latency)."""
        return self.summary.get("pareto_front", [])


# ------------------------------------------------------------------ context

def _kind_of(base: Any) -> str:
    if isinstance(base, SearchConfig):
        return "search"
    if isinstance(base, CompressConfig):
        return "compress"
    raise TypeError(f"base must be a SearchConfig (tune the DGConv search) or a CompressConfig (tune the "
                    f"self-grouping pass), got {type(base).__name__}")


def _job_settings(base: Any) -> dict[str, Any]:
    values = config_to_dict(base)
    for key in _VOLATILE:
        if key == "latency_batch" and values.get("latency_budget") is not None:
            continue  # the search's own latency budget is profiled at that batch: it changes the results
        values.pop(key, None)
    if isinstance(values.get("grouping"), dict):
        values["grouping"].pop("progress", None)
    return values


def _prepare(kind: str, base: Any, config: TuneConfig, out: Path, *, quiet: bool = False) -> TrialContext:
    """Everything trials share, checked before any trial: data, model, budget, knobs, enqueued settings.

    Raises:
        BudgetError: a budget no configuration can meet.
        ConfigError: an unknown or fixed knob, an empty range, a knob value the job rejects.
    """
    from nas_grouping.data import load_datasets

    ds = load_datasets(base.data)
    input_size = (ds.in_channels, *ds.input_size)
    common = dict(kind=kind, base=base, out=out, objective=config.objective, input_size=input_size,
                  num_classes=ds.num_classes, in_channels=ds.in_channels, quiet=quiet,
                  measure_latency=_measures_latency(config), latency_batch=config.trial_latency_batch)
    if kind == "search":
        from nas_grouping.budget import MacBudget, ModelCost
        from nas_grouping.convert import dgconv_layers
        from nas_grouping.search.loop import build_search_model

        if base.dense:
            raise ConfigError("tuning runs the budgeted search; dense=True trains the dense baseline instead "
                              "(nothing to tune against a budget): drop --dense")
        model = build_search_model(base, ds.num_classes, ds.in_channels)
        if not dgconv_layers(model):
            raise ConfigError(f"space {base.space!r} has no DGConv2d layer to search")
        cost = ModelCost(model, input_size)
        budget_macs = MacBudget.parse(base.budget).resolve(cost.dense_macs)
        cost.check_budget(budget_macs)  # BudgetError: no configuration meets the budget
        knobs = parse_knobs(kind, config.objective, config.knobs,
                            budget_range=(cost.minimum_macs / cost.dense_macs, budget_macs / cost.dense_macs))
        ctx = TrialContext(**common, knobs=knobs, budget_macs=budget_macs, dense_macs=cost.dense_macs,
                           minimum_macs=cost.minimum_macs)
    else:
        from nas_grouping.pipeline.compress import load_source_model
        from nas_grouping.self_grouping.grouping import SelfGrouping

        if base.grouping.budget is None:
            raise ConfigError("tuning the self-grouping pass needs a hard MAC budget: set --budget (a share of the "
                              "input model's MACs, e.g. 0.5, or MACs such as 12M) instead of --fraction")
        model, _ = load_source_model(base, num_classes=ds.num_classes, in_channels=ds.in_channels)
        plan = SelfGrouping(base.grouping).plan(model, input_size)  # BudgetError when the caps cannot meet it
        knobs = parse_knobs(kind, config.objective, config.knobs)
        layers = [(lp.name, lp.macs, lp.connections, lp.cap) for lp in plan.prunable]
        groups = knob_groups([n for n, _, _, _ in layers], knobs[SHARE].per) if SHARE in knobs else {}
        fixed = plan.macs - sum(m for _, m, _, _ in layers)
        at_caps = fixed + sum(math.floor((1 - cap) * c + 1e-9) * (m // c) if c else m for _, m, c, cap in layers)
        ctx = TrialContext(**common, knobs=knobs, budget_macs=int(plan.budget_macs), dense_macs=plan.macs,
                           minimum_macs=at_caps, share_groups=groups, share_layers=layers,
                           fixed_macs=fixed, source_model=model)
    _check_knob_values(ctx)
    return ctx


def _check_knob_values(ctx: TrialContext) -> None:
    """Every knob's end points and choices must make a valid job config (fail before any trial)."""
    for name, knob in ctx.knobs.items():
        if name in (SHARE, BUDGET):
            continue
        values = list(knob.choices) if knob.kind == "categorical" else [knob.low, knob.high]
        for v in values:
            try:
                cfg = apply_knobs(ctx.base, {name: v})
                if ctx.kind == "search" and (name == "space" or name.startswith("space_kwargs.")):
                    from nas_grouping.search.loop import build_search_model

                    build_search_model(cfg, ctx.num_classes, ctx.in_channels)
            except (ConfigError, TypeError, ValueError) as exc:
                raise ConfigError(f"knob {knob.describe()}: the value {v!r} makes an invalid {ctx.kind} "
                                  f"configuration: {exc}. Narrow the knob's range.") from exc


def _settings(ctx: TrialContext, config: TuneConfig) -> dict[str, Any]:
    """What defines a study: a study of that name holding other settings is an error, not a resume."""
    settings = {"kind": ctx.kind, "objective": ctx.objective, "budget_macs": ctx.budget_macs,
                "knobs": {n: k.to_dict() for n, k in ctx.knobs.items()}, "job": _job_settings(ctx.base)}
    if ctx.measure_latency:  # only then: studies made without latency resume as before
        settings["latency"] = {"budget": None if config.trial_latency_budget is None
                               else str(config.trial_latency_budget).strip().lower(),
                               "batch": config.trial_latency_batch}
    return settings


# ------------------------------------------------------------------ latency

def _measures_latency(config: TuneConfig) -> bool:
    return config.trial_latency_budget is not None or config.objective == "pareto-latency"


def _reference_model(ctx: TrialContext) -> tuple[Any, str]:
    """The dense reference: the searched space built dense (as the search's own report), or the input model."""
    if ctx.kind == "search":
        from search_spaces import get_space

        base = ctx.base
        model = get_space(base.space, num_classes=ctx.num_classes, in_channels=ctx.in_channels, dense=True,
                          **base.space_kwargs)
        return model, f"dense {base.space}"
    return ctx.source_model, "input model"


def _latency_reference(study: Any, ctx: TrialContext, config: TuneConfig, *, measure: bool,
                       stacklevel: int = 3) -> dict[str, Any] | None:
    """Set the context's reference and budget (ms) from the study, measuring the reference first when the study
    has none yet (once per study: workers and resumed runs reuse it). None when latency is not measured.
    ``stacklevel``: where a warning points (the public call that led here)."""
    from nas_grouping.latency.measure import device_name, measured_on, parse_latency_budget

    if not ctx.measure_latency:
        return None
    ref = study.user_attrs.get(LATENCY_ATTR)
    if ref is None:
        if not measure:
            raise RuntimeError(f"study {study.study_name!r} holds no dense reference latency; the tune call that "
                               "starts the workers measures it")
        model, what = _reference_model(ctx)
        ms, layout = model_latency_ms(model, ctx.input_size, ctx.latency_batch)
        ref = {"ms": ms, "layout": layout, "batch": ctx.latency_batch, "model": what, **measured_on("cpu")}
        study.set_user_attr(LATENCY_ATTR, ref)
        ctx.say(f"dense reference latency ({what}, batch {ctx.latency_batch}, {layout}): {ms:.3f} ms")
    elif ref.get("device") != device_name("cpu"):
        warnings.warn(f"the study's dense reference latency was measured on {ref.get('device')!r}, this machine is "
                      f"{device_name('cpu')!r}: latencies of trials run here compare against another machine's",
                      stacklevel=stacklevel)
    ctx.latency_reference_ms = float(ref["ms"])
    if config.trial_latency_budget is not None:
        ctx.latency_budget_ms = parse_latency_budget(config.trial_latency_budget, ctx.latency_reference_ms)
    return {**ref, "budget": config.trial_latency_budget, "budget_ms": ctx.latency_budget_ms}


def _diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(now), key=str):
            out += _diff(saved.get(k), now.get(k), f"{prefix}{k}.")
        return out
    return [] if saved == now else [f"{prefix.rstrip('.')}: study has {saved!r}, now {now!r}"]


# ------------------------------------------------------------------ study

def _worker_seed(seed: int, index: int, *, server: bool) -> int:
    """Each worker samples from its own stream: the same seed in two workers would propose the same knobs.

    Workers of one ``tune`` call are numbered; workers on a server may run on other machines, so
    their host and process id are mixed in (concurrent studies are not repeatable anyway).
    """
    seed = seed + 7919 * index
    if server:
        seed += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
    return seed % 2**31


def _make_sampler(config: TuneConfig, seed: int, *, shared: bool) -> Any:
    return TUNE_SAMPLERS[config.sampler](config, seed, shared)


def _make_pruner(config: TuneConfig, ctx: TrialContext) -> Any:
    """The pruner ``config`` names. Reports before the middle of the search phase are not judged: warm-up
    accuracy says little about where the gates end up, and early epochs are noisy."""
    base = ctx.base
    # reports are per epoch (1-based): judge once half the search epochs (at least one) are done
    warmup = 0
    if ctx.kind == "search":
        warmup = base.warmup_epochs + max(1, math.ceil((base.epochs - base.warmup_epochs) / 2))
    return TUNE_PRUNERS[config.pruner](config, ctx, warmup)


def _open_study(ctx: TrialContext, config: TuneConfig, storage: Any, name: str, sampler: Any, pruner: Any, *,
                create: bool) -> Any:
    """Create the study (recording its settings) or load it and check its settings match."""
    import optuna

    directions = ["maximize", "minimize"] if ctx.multi else ["maximize"]
    settings = _settings(ctx, config)
    existing = {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in existing:
        if not create:
            raise ConfigError(f"no study {name!r} in the storage to work on")
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                    pruner=pruner)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            cost = "latency_ms" if ctx.objective == "pareto-latency" else "macs"
            study.set_metric_names(["val_acc", cost] if ctx.multi else ["val_acc"])
        study.set_user_attr(SETTINGS_ATTR, settings)
        return study
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    saved = study.user_attrs.get(SETTINGS_ATTR)
    if saved is None:
        raise ConfigError(f"a study named {name!r} exists in the storage but was not made by nas-grouping tune; "
                          "choose another --study-name")
    diffs = _diff(saved, settings)
    if diffs:
        raise ConfigError(f"the study {name!r} exists with other settings: " + "; ".join(diffs[:8])
                          + ("; ..." if len(diffs) > 8 else "")
                          + ". Use the same settings to resume or join it, or another --study-name / --out.")
    return study


def _recover(study: Any, *, alone: bool) -> list[int]:
    """Fail the running trials a crash left behind (only when no other worker is alive), and enqueue each
    failed trial's knobs once more. Returns the numbers of the trials retried."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if alone:
        for t in trials:
            if t.state == TrialState.RUNNING:
                study.tell(t.number, state=TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    out = []
    for t in trials:
        if (t.state == TrialState.FAIL and t.number not in retried and "retry_of" not in t.user_attrs
                and "failed_trial" not in t.system_attrs and t.params):
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            out.append(t.number)
    return out


def _may_start(study: Any, total: int) -> bool:
    """Another trial may start: one is waiting (enqueued), or fewer than ``total`` are done or running."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    if TrialState.WAITING in states:
        return True
    return sum(s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) for s in states) < total


def _work(study: Any, ctx: TrialContext, claim: ClaimLock, total: int, deadline: float | None,
          callbacks: list[Callable] | None = None) -> int:
    """Run trials until the study holds ``total`` (or the deadline passes); returns how many this worker ran."""
    objective = make_objective(ctx)
    ran = 0
    while deadline is None or time.time() < deadline:
        claim.acquire()
        try:
            if not _may_start(study, total):
                break
            study.optimize(objective, n_trials=1, callbacks=callbacks, gc_after_trial=True)
            ran += 1
        finally:
            claim.release()
    return ran


# ------------------------------------------------------------------ workers

def _worker_entry(payload: dict[str, Any]) -> None:
    """A --workers child: load the study the parent made and work on it (spawned, so nothing is inherited)."""
    import optuna
    import torch

    torch.set_num_threads(payload["threads"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if payload.get("log_level") is not None:  # the parent shows our log lines: so does its worker (spawned bare)
        from nas_grouping.log import log_to_console

        log_to_console(payload["log_level"])
    kind = payload["kind"]
    base = config_from_dict(SearchConfig if kind == "search" else CompressConfig, payload["job"])
    config = config_from_dict(TuneConfig, payload["tune"])
    out = Path(payload["out"])
    ctx = _prepare(kind, base, config, out, quiet=payload["quiet"])
    storage = open_storage(StorageSpec(payload["storage_kind"], payload["storage_url"]), heartbeat=config.heartbeat)
    lock = WorkerLock(out)
    lock.acquire()
    try:
        seed = _worker_seed(base_seed(base), payload["index"], server=payload["storage_kind"] == "server")
        sampler = _make_sampler(config, seed, shared=True)
        study = _open_study(ctx, config, storage, payload["study_name"], sampler, _make_pruner(config, ctx),
                            create=False)
        _latency_reference(study, ctx, config, measure=False)
        ctx.claim = ClaimLock(out, storage, payload["study_name"])
        _work(study, ctx, ctx.claim, config.trials, payload["deadline"])
    finally:
        lock.release()


def _shown_level() -> int | None:
    """The level of the ``nas_grouping`` logger when a handler shows its records (the CLI's, or the
    application's), for the spawned workers to show theirs the same way; None when nothing would."""
    log = logging.getLogger("nas_grouping")
    chain = log
    while chain is not None:
        if any(not isinstance(h, logging.NullHandler) for h in chain.handlers):
            return log.getEffectiveLevel()
        chain = chain.parent if chain.propagate else None
    return None


def base_seed(base: Any) -> int:
    return base.seed if isinstance(base, SearchConfig) else base.grouping.seed


def _run_workers(n: int, payload: dict[str, Any]) -> list[str]:
    """Run ``n`` worker processes on the study; how each one that failed ended (empty: all finished)."""
    mp = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = [mp.Process(target=_worker_entry, args=({**payload, "index": i, "threads": threads},),
                        name=f"nas-grouping-tune-{i}") for i in range(n)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    return [f"{p.name} was killed by signal {-p.exitcode}" if p.exitcode < 0 else
            f"{p.name} exited with code {p.exitcode} (its error is printed above)"
            for p in procs if p.exitcode != 0]


# ------------------------------------------------------------------ public

@dataclass
class _TuneRun:
    """The state a tuning call carries from stage to stage (settings, trial context, storage, study name, sampler)."""

    kind: str
    base: SearchConfig | CompressConfig
    config: TuneConfig
    out: Path
    quiet: bool
    ctx: TrialContext
    enqueued: list[dict[str, Any]]
    spec: StorageSpec
    storage: Any
    name: str
    sampler: Any
    pruner: Any


@dataclass
class _Opened:
    """The study as this call opened it: whether it existed, its latency reference, the trials retried and done."""

    study: Any
    existed: bool
    latency: dict[str, Any] | None
    retried: list[int]
    done: int


def tune(base: SearchConfig | CompressConfig, config: TuneConfig | None = None, *, resume: bool = False,
         sampler: Any = None, pruner: Any = None, quiet: bool = False) -> TuneResult:
    """Tune the knobs of a search (``SearchConfig``) or a compression (``CompressConfig``) under its hard budget.

    The tuning run folder is ``base.out``: ``tune.json``, the study (``study.db`` or
    ``study.journal`` unless ``config.storage`` names a server), ``trials/NNNN/`` (each trial's
    own run folder), ``trials.csv``, ``summary.json``, ``best_model/`` and PNG plots.

    Args:
        base: the job every trial runs, with sampled knobs replacing some of its settings.
        config: how to tune (trials, objective, knobs, storage, workers; defaults when None).
        resume: continue the study of ``base.out`` (after a crash or to add trials).
        sampler / pruner: Optuna objects replacing the ones ``config`` names (one worker).
        quiet: no line per trial and no final table on the ``nas_grouping`` logger (INFO).

    Raises:
        BudgetError: the budget no configuration can meet (before any trial).
        ConfigError: an empty knob range, an unreachable storage, a study of that name with other
            settings, a run folder that holds a tuning run without ``resume``.
    """
    import optuna

    config, kind, out = _check_call(base, config, resume=resume,
                                    own_objects=sampler is not None or pruner is not None)
    run = _set_up(kind, base, config, out, resume=resume, sampler=sampler, pruner=pruner, quiet=quiet)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock, claim = _claim(run)
    try:
        alone = lock.acquire()
        with claim:
            opened = _open(run, alone=alone)
        _announce(run, opened)
        failed = _run_trials(run, opened.study, claim)
        with claim:
            summary = write_results(opened.study, out, kind=kind, objective=config.objective,
                                    budget_macs=run.ctx.budget_macs, dense_macs=run.ctx.dense_macs,
                                    storage=run.spec.display, latency=opened.latency)
    finally:
        claim.release()
        lock.release()
        optuna.logging.set_verbosity(verbosity)
    if not quiet and logger.isEnabledFor(logging.INFO):  # the table reads the run folder: only when shown
        logger.info(format_tuning_run(out, top=10))
    if failed:
        raise WorkerError(f"tuning worker(s) failed: {'; '.join(failed)}. The study is intact and its results so far "
                          f"are written to {out}; fix the cause and resume (the same command with --resume)")
    return TuneResult(study=opened.study, summary=summary, run_dir=out)


def _check_call(base: Any, config: TuneConfig | None, *, resume: bool, own_objects: bool
                ) -> tuple[TuneConfig, str, Path]:
    """The arguments and the run folder, checked before any work: the tuning settings, the job's kind, the folder."""
    config = config or TuneConfig()
    if not isinstance(config, TuneConfig):
        raise TypeError(f"config must be a TuneConfig, got {type(config).__name__}")
    kind = _kind_of(base)
    if own_objects and config.workers > 1:
        raise ConfigError("sampler= / pruner= objects work with one worker; with workers > 1 name them in "
                          "TuneConfig (sampler='tpe', pruner='median', ...) so every worker builds its own")
    out = Path(base.out)
    if (out / TUNE_FILE).exists() and not resume:
        raise ConfigError(f"{out} already holds a tuning run; pass --resume (resume=True) to continue it with the "
                          "same settings, or choose another --out")
    if resume and not (out / TUNE_FILE).is_file():
        raise ConfigError(f"--resume: {out} holds no tuning run (no {TUNE_FILE}); run without --resume to start one "
                          "there, or point --out at the tuning run to continue")
    check_run_folder(out, "tune")
    return config, kind, out


def _set_up(kind: str, base: SearchConfig | CompressConfig, config: TuneConfig, out: Path, *, resume: bool,
            sampler: Any, pruner: Any, quiet: bool) -> _TuneRun:
    """What trials share (checked before any trial), the settings to enqueue, the opened storage, the study's
    name, and the sampler and pruner (the caller's objects, else the ones ``config`` names)."""
    ctx = _prepare(kind, base, config, out, quiet=quiet)
    share_names = [share_param(g) for g in dict.fromkeys(ctx.share_groups.values())]
    enqueued = check_enqueued(kind, ctx.knobs, config.enqueue, share_names)
    spec = resolve_storage(config.storage, out, config.workers)
    storage = open_storage(spec, heartbeat=config.heartbeat)
    saved_name = read_json(out / TUNE_FILE).get("study_name") if resume else None
    name = config.study_name or saved_name or out.resolve().name  # a moved or renamed folder keeps its study
    shared = config.workers > 1 or spec.kind == "server"
    if sampler is None:
        sampler = _make_sampler(config, _worker_seed(base_seed(base), 0, server=spec.kind == "server"), shared=shared)
    pruner = pruner if pruner is not None else _make_pruner(config, ctx)
    return _TuneRun(kind=kind, base=base, config=config, out=out, quiet=quiet, ctx=ctx, enqueued=enqueued, spec=spec,
                    storage=storage, name=name, sampler=sampler, pruner=pruner)


def _claim(run: _TuneRun) -> tuple[WorkerLock, ClaimLock]:
    """Claim the run folder for tuning; this process's worker lock, and the lock under which trials start."""
    claim_run_folder(run.out, "tune")
    lock, claim = WorkerLock(run.out), ClaimLock(run.out, run.storage, run.name)
    run.ctx.claim = claim
    return lock, claim


def _open(run: _TuneRun, *, alone: bool) -> _Opened:
    """Under the claim lock: create the study (with the enqueued settings) or join it, set its latency reference,
    retry what a crash left unfinished, and record the run in ``tune.json``."""
    import optuna

    ctx, config, spec = run.ctx, run.config, run.spec
    existed = run.name in {s.study_name for s in optuna.study.get_all_study_summaries(run.storage)}
    study = _open_study(ctx, config, run.storage, run.name, run.sampler, run.pruner, create=True)
    if not existed:
        for params in run.enqueued:
            study.enqueue_trial(params, user_attrs={"enqueued": True})
    latency = _latency_reference(study, ctx, config, measure=True, stacklevel=4)
    retried = _recover(study, alone=alone and spec.local)
    write_json(run.out / TUNE_FILE, {"kind": run.kind, "tune": config_to_dict(config), "job": config_to_dict(run.base),
                                     "storage": spec.display, "storage_kind": spec.kind, "study_name": run.name,
                                     "budget_macs": ctx.budget_macs, "dense_macs": ctx.dense_macs,
                                     "latency": latency,
                                     "knobs": {n: k.to_dict() for n, k in ctx.knobs.items()}})
    return _Opened(study=study, existed=existed, latency=latency, retried=retried,
                   done=len(study.get_trials(deepcopy=False)))


def _announce(run: _TuneRun, opened: _Opened) -> None:
    """Say which study runs: created or joined, its objective, budgets, trials so far and to come; then the knobs."""
    ctx, config = run.ctx, run.config
    lat = ""
    if ctx.latency_budget_ms is not None:
        lat = (f", hard latency budget {ctx.latency_budget_ms:.3f} ms "
               f"({ctx.latency_budget_ms / ctx.latency_reference_ms:.1%} of dense {ctx.latency_reference_ms:.3f} "
               f"ms at batch {ctx.latency_batch})")
    ctx.say(f"{'joined' if opened.existed else 'created'} study {run.name!r} in {run.spec.display}: {run.kind} "
            f"trials, objective {config.objective}, hard budget {ctx.budget_macs:,} MACs "
            f"({ctx.budget_macs / ctx.dense_macs:.1%} of dense {ctx.dense_macs:,}){lat}, {opened.done} trial(s) so "
            f"far, {config.trials} in all"
            + (f"; retrying trial(s) {opened.retried} left unfinished" if opened.retried else ""))
    ctx.say("knobs: " + "; ".join(k.describe() for k in ctx.knobs.values()))


def _run_trials(run: _TuneRun, study: Any, claim: ClaimLock) -> list[str]:
    """Run trials until the study holds ``config.trials`` (or the timeout passes): here with one worker, else in
    spawned worker processes. How each worker that failed ended (empty: all finished)."""
    config = run.config
    deadline = time.time() + config.timeout if config.timeout else None
    if config.workers == 1:
        _work(study, run.ctx, claim, config.trials, deadline)
        return []
    return _run_workers(config.workers, {
        "kind": run.kind, "job": config_to_dict(run.base), "tune": config_to_dict(config), "out": str(run.out),
        "storage_kind": run.spec.kind, "storage_url": run.spec.url, "study_name": run.name, "deadline": deadline,
        "quiet": run.quiet, "log_level": _shown_level()})


def is_tuning_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a tuning run folder (holds tune.json)."""
    return (Path(run_dir) / TUNE_FILE).is_file()


def print_tuning_run(run_dir: str | Path, *, top: int = 20) -> str:
    """The summary and trial table of a tuning run folder, as text (what ``nas-grouping report`` prints)."""
    run = Path(run_dir)
    if not (run / SUMMARY).is_file():
        raise ConfigError(f"{run} holds a tuning run without results yet ({SUMMARY} is written when the study "
                          "stops); resume it with --resume, or wait for it to finish")
    return format_tuning_run(run, top=top)


def load_tuning_config(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job settings, tuning settings) a tuning run folder was made with (to resume it)."""
    saved = read_json(Path(run_dir) / TUNE_FILE)
    return saved["job"], saved["tune"]

