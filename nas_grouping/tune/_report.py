"""A tuning run a person can read: trials.csv, summary.json, best_model/, and PNG plots.

Feasibility is judged here again, not only by Optuna: a trial counts as feasible when it
completed, its constraints are <= 0 *and* its exported model's MACs (and, under a latency
budget, its measured latency) are within the budget, so a model over budget is never
reported as best, whatever the storage holds.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from nas_grouping.report import read_json, write_json

__all__ = ["feasible_trials", "pareto_front", "write_results", "format_tuning_run", "SUMMARY", "TRIALS_CSV"]

SUMMARY = "summary.json"
TRIALS_CSV = "trials.csv"
BEST_MODEL = "best_model"


def feasible_trials(trials: Sequence[Any], budget_macs: int, latency_budget_ms: float | None = None) -> list[Any]:
    """Completed trials whose constraints are all <= 0, whose exported model fits ``budget_macs`` and, when
    ``latency_budget_ms`` is given, whose measured latency fits it."""
    from optuna.trial import TrialState

    out = []
    for t in trials:
        macs = t.user_attrs.get("macs")
        latency = t.user_attrs.get("latency_ms")
        if (t.state == TrialState.COMPLETE and t.constraints and all(v <= 0 for v in t.constraints.values())
                and macs is not None and macs <= budget_macs and t.user_attrs.get("val_acc") is not None
                and (latency_budget_ms is None or (latency is not None and latency <= latency_budget_ms))):
            out.append(t)
    return out


def pareto_front(trials: Sequence[Any], cost: str = "macs") -> list[Any]:
    """The trials no other trial beats on both accuracy (higher) and ``cost`` (lower: the user attribute
    ``macs`` or ``latency_ms``), by cost. Trials without that cost are left out."""
    trials = [t for t in trials if t.user_attrs.get(cost) is not None]
    front = []
    for t in trials:
        a, m = t.user_attrs["val_acc"], t.user_attrs[cost]
        if not any((o.user_attrs["val_acc"] >= a and o.user_attrs[cost] <= m)
                   and (o.user_attrs["val_acc"] > a or o.user_attrs[cost] < m) for o in trials):
            front.append(t)
    return sorted(front, key=lambda t: (t.user_attrs[cost], -t.user_attrs["val_acc"], t.number))


def _best(feasible: Sequence[Any], cost: str = "macs") -> Any | None:
    """Highest accuracy; ties go to the lower cost (MACs, or latency for pareto-latency), then the earlier trial."""
    if not feasible:
        return None
    return min(feasible, key=lambda t: (-t.user_attrs["val_acc"], t.user_attrs.get(cost, math.inf),
                                        t.user_attrs["macs"], t.number))


def _trial_record(t: Any, dense_macs: int) -> dict[str, Any]:
    u = t.user_attrs
    return {"number": t.number, "val_acc": u.get("val_acc"), "macs": u.get("macs"),
            "macs_fraction": (u["macs"] / dense_macs) if u.get("macs") is not None else None,
            "latency_ms": u.get("latency_ms"), "latency_fraction": u.get("latency_fraction"),
            "violation": u.get("violation"), "latency_violation": u.get("latency_violation"),
            "params": dict(t.params), "run_dir": u.get("run_dir"), "worker": u.get("worker")}


def _why_none_feasible(trials: Sequence[Any], budget_macs: int, budget_ms: float | None) -> str:
    """One line saying why no trial is feasible (so an empty result reads as an answer, not a crash)."""
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("val_acc") is not None]
    if not done:
        return "no trial completed training yet"
    reasons = []
    over_macs = [t for t in done if (t.user_attrs.get("macs") or 0) > budget_macs]
    if over_macs:
        reasons.append(f"{len(over_macs)} over the MAC budget of {budget_macs:,}")
    if budget_ms is not None:
        timed = [t.user_attrs["latency_ms"] for t in done if t.user_attrs.get("latency_ms") is not None]
        over = [ms for ms in timed if ms > budget_ms]
        if over:
            reasons.append(f"{len(over)} over the latency budget of {budget_ms:.4g} ms (fastest measured "
                           f"{min(timed):.4g} ms)")
    why = "; ".join(reasons) if reasons else "their constraints are violated"
    return f"none of the {len(done)} completed trial(s) is feasible: {why}; loosen the budget or change the knobs"


def _cost(objective: str) -> str:
    """The user attribute the objective trades accuracy against."""
    return "latency_ms" if objective == "pareto-latency" else "macs"


def _state_counts(trials: Sequence[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        key = t.state.name.lower()
        if t.user_attrs.get("skipped"):
            key = "skipped"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _copy_model(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def write_results(study: Any, out: Path, *, kind: str, objective: str, budget_macs: int, dense_macs: int,
                  storage: str, extra: dict[str, Any] | None = None,
                  latency: dict[str, Any] | None = None) -> dict[str, Any]:
    """trials.csv, summary.json, best_model/ and the plots of ``study``, in ``out``; returns the summary.

    ``latency``: when trials are timed, the dense reference (``ms``, ``batch``, ``layout``, ``device``...) and
    the budget (``budget``, ``budget_ms``: None without one).
    """
    trials = study.get_trials(deepcopy=False)
    df = study.trials_dataframe()
    if latency is not None:
        for col in ("user_attrs_latency_ms", "user_attrs_latency_fraction"):
            if col not in df.columns:
                df[col] = float("nan")  # no trial timed yet: the columns are there all the same
    df.to_csv(out / TRIALS_CSV, index=False)
    budget_ms = latency.get("budget_ms") if latency else None
    cost = _cost(objective)
    feasible = feasible_trials(trials, budget_macs, budget_ms)
    best = _best(feasible, cost)
    front = pareto_front(feasible, cost)
    summary: dict[str, Any] = {
        "kind": kind, "objective": objective, "study_name": study.study_name, "storage": storage,
        "budget_macs": budget_macs, "dense_macs": dense_macs, "budget_fraction": budget_macs / dense_macs,
        "latency_budget_ms": budget_ms, "latency_reference_ms": latency.get("ms") if latency else None,
        "latency": latency, "pareto_cost": cost,
        "trials": len(trials), "states": _state_counts(trials), "feasible": len(feasible),
        "best": _trial_record(best, dense_macs) if best is not None else None,
        "pareto_front": [_trial_record(t, dense_macs) for t in front],
        "best_model": None, **(extra or {}),
    }
    if best is not None:
        src = out / best.user_attrs["run_dir"] / "model"
        if src.is_dir():
            _copy_model(src, out / BEST_MODEL)
            summary["best_model"] = BEST_MODEL
        else:
            summary["best_model_elsewhere"] = (f"trial {best.number} ran on {best.user_attrs.get('worker')}; its model "
                                               f"is in that machine's {best.user_attrs['run_dir']}/model")
    else:
        summary["no_feasible"] = _why_none_feasible(trials, budget_macs, budget_ms)
    summary["plots"] = _plots(study, trials, feasible, front, out, budget_macs, dense_macs, objective, latency)
    write_json(out / SUMMARY, summary)
    return summary


# ------------------------------------------------------------------ plots

def _tradeoff_plot(plt: Any, trials: Sequence[Any], feasible: Sequence[Any], trained_over: Sequence[Any],
                   skipped: Sequence[Any], dense_macs: int, budget_macs: int, latency: dict[str, Any] | None,
                   objective: str, *, cost: str, front: Sequence[Any], path: Path) -> None:
    """Accuracy vs ``cost`` (``macs``, as % of dense, or ``latency_ms``) with the hard budget as a line."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if cost == "macs":
        scale, budget, label = 100.0 / dense_macs, budget_macs, "MACs (% of dense)"
        title = "accuracy vs MACs" + (" (Pareto front)" if objective == "pareto" else "")
    else:
        scale, budget = 1.0, (latency or {}).get("budget_ms")
        batch = (latency or {}).get("batch")
        label = "measured latency (ms" + (f", batch {batch}" if batch else "") + ")"
        title = "accuracy vs latency" + (" (Pareto front)" if objective == "pareto-latency" else "")
    with_cost = [t for t in feasible if t.user_attrs.get(cost) is not None]
    over = [t for t in trained_over if t.user_attrs.get(cost) is not None]
    if with_cost:
        ax.plot([t.user_attrs[cost] * scale for t in with_cost], [t.user_attrs["val_acc"] for t in with_cost], "o",
                color="tab:blue", alpha=0.6, label="feasible")
    if front:
        ax.step([t.user_attrs[cost] * scale for t in front], [t.user_attrs["val_acc"] for t in front], "-o",
                where="post", color="tab:orange", label="Pareto front (feasible)")
    if over:
        ax.plot([t.user_attrs[cost] * scale for t in over], [t.user_attrs["val_acc"] for t in over],
                "x", color="tab:red", ms=9, label="infeasible (over a budget)")
    if skipped and cost == "macs":
        macs = [t.user_attrs.get("planned_macs") or t.user_attrs.get("minimum_macs") for t in skipped]
        macs = [m * scale for m in macs if m is not None]
        if macs:
            ax.plot(macs, [0.02] * len(macs), "|", color="tab:red", ms=18, mew=2,
                    transform=ax.get_xaxis_transform(), label="infeasible, not trained (MACs known)")
    if budget is not None:
        ax.axvline(budget * scale, ls="--", color="tab:red", alpha=0.7,
                   label="hard budget" if cost == "macs" else "hard latency budget")
    if cost == "latency_ms" and latency and latency.get("ms"):
        ax.axvline(latency["ms"], ls=":", color="tab:gray", alpha=0.8, label="dense reference")
    ax.set_xlabel(label)
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plots(study: Any, trials: Sequence[Any], feasible: Sequence[Any], front: Sequence[Any], out: Path,
           budget_macs: int, dense_macs: int, objective: str,
           latency: dict[str, Any] | None = None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    written: dict[str, str] = {}
    feasible_ids = {t.number for t in feasible}
    trained_over = [t for t in trials if t.state == TrialState.COMPLETE and t.number not in feasible_ids
                    and t.user_attrs.get("val_acc") is not None]
    skipped = [t for t in trials if t.user_attrs.get("skipped")]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and not t.user_attrs.get("skipped")
              and t.intermediate_values]

    # optimization history
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if feasible:
        ax.plot([t.number for t in feasible], [t.user_attrs["val_acc"] for t in feasible], "o", color="tab:blue",
                label="feasible")
        best, xs, ys = -math.inf, [], []
        for t in sorted(feasible, key=lambda t: t.number):
            best = max(best, t.user_attrs["val_acc"])
            xs.append(t.number)
            ys.append(best)
        xs.append(max(t.number for t in trials))  # the line runs on to the last trial
        ys.append(best)
        ax.step(xs, ys, where="post", color="tab:orange", label="best feasible so far")
    if pruned:
        ax.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                "v", color="tab:gray", alpha=0.7, label="pruned (last report)")
    if trained_over:
        ax.plot([t.number for t in trained_over], [t.user_attrs["val_acc"] for t in trained_over], "x",
                color="tab:red", label="over budget (never best)")
    if skipped:
        for t in skipped:
            ax.axvline(t.number, color="tab:red", alpha=0.25, lw=3)
        ax.plot([], [], color="tab:red", alpha=0.25, lw=3, label="infeasible, not trained")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title("optimization history")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=110)
    plt.close(fig)
    written["history"] = "history.png"

    # accuracy vs the objective's cost (MACs, or measured latency for pareto-latency): the Pareto front of
    # feasible trials, infeasible ones marked; the other cost gets its own plot when trials were timed
    cost = _cost(objective)
    args = (plt, trials, feasible, trained_over, skipped, dense_macs, budget_macs, latency, objective)
    _tradeoff_plot(*args, cost=cost, front=front, path=out / "pareto.png")
    written["pareto"] = "pareto.png"
    timed = any(t.user_attrs.get("latency_ms") is not None for t in trials)
    if cost == "macs" and (latency is not None or timed):
        _tradeoff_plot(*args, cost="latency_ms", front=pareto_front(feasible, "latency_ms"),
                       path=out / "latency.png")
        written["latency"] = "latency.png"
    elif cost == "latency_ms":
        _tradeoff_plot(*args, cost="macs", front=pareto_front(feasible, "macs"), path=out / "macs.png")
        written["macs"] = "macs.png"

    # parameter importances (fANOVA, seeded) over the completed trials
    try:
        import optuna

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        written["importances_skipped"] = f"{type(exc).__name__}: {exc}"
        importances = {}
    if importances:
        names = list(importances)[::-1]
        fig, ax = plt.subplots(figsize=(7, 0.6 + 0.35 * len(names)))
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance for validation accuracy (fANOVA)")
        ax.set_title("parameter importances")
        fig.tight_layout()
        fig.savefig(out / "importances.png", dpi=110)
        plt.close(fig)
        written["importances"] = "importances.png"
    return written


# ------------------------------------------------------------------ text

def format_tuning_run(run_dir: str | Path, *, top: int = 20) -> str:
    """The summary and the trial table of a tuning run folder, as text (``nas-grouping report``)."""
    run = Path(run_dir)
    s = read_json(run / SUMMARY)
    lines = [f"tuning run {run}: {s['kind']} trials, objective {s['objective']}, study {s['study_name']!r} "
             f"in {s['storage']}",
             f"hard budget {s['budget_macs']:,} MACs ({s['budget_fraction']:.1%} of dense {s['dense_macs']:,})"
             + _latency_line(s) + f"; {s['trials']} trials: "
             + ", ".join(f"{n} {k}" for k, n in sorted(s["states"].items())) + f"; {s['feasible']} feasible"]
    b = s.get("best")
    if b:
        lat = f", {b['latency_ms']:.3f} ms" if b.get("latency_ms") is not None else ""
        lines.append(f"best feasible: trial {b['number']}, val acc {b['val_acc']:.4f}, {b['macs']:,} MACs "
                     f"({b['macs_fraction']:.1%} of dense){lat}; model in "
                     f"{run / s['best_model'] if s.get('best_model') else s.get('best_model_elsewhere')}")
        lines.append("  knobs: " + ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items()))
    else:
        lines.append("no feasible trial" + (f": {s['no_feasible']}" if s.get("no_feasible") else " completed yet"))
    if s["objective"] == "pareto" and s.get("pareto_front"):
        lines.append("Pareto front (feasible): " + "; ".join(
            f"trial {t['number']}: {t['val_acc']:.4f} at {t['macs_fraction']:.1%}" for t in s["pareto_front"]))
    if s["objective"] == "pareto-latency" and s.get("pareto_front"):
        lines.append("Pareto front (feasible, accuracy vs latency): " + "; ".join(
            f"trial {t['number']}: {t['val_acc']:.4f} at {t['latency_ms']:.3f} ms" for t in s["pareto_front"]))
    csv = run / TRIALS_CSV
    if csv.is_file() and csv.stat().st_size > 1:
        lines.append(trial_table(pd.read_csv(csv), s["dense_macs"], top=top))
    elif csv.is_file():
        lines.append("no trial has run yet")
    return "\n".join(lines)


def _latency_line(s: dict[str, Any]) -> str:
    lat = s.get("latency")
    if not lat:
        return ""
    ref = f"dense {lat['ms']:.3f} ms at batch {lat.get('batch', 1)} on {lat.get('device', '?')}"
    if s.get("latency_budget_ms") is None:
        return f"; latency measured ({ref})"
    budget = s["latency_budget_ms"]
    return f"; hard latency budget {_ms(budget)} ms ({budget / lat['ms']:.1%} of {ref})"


def _ms(v: float) -> str:
    return f"{v:.3f}" if v >= 0.01 else f"{v:.3g}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_table(df: pd.DataFrame, dense_macs: int, *, top: int = 20) -> str:
    """The trials best first (feasible completed ones by accuracy), one line each."""
    if df.empty:
        return "(no trials)"
    table = pd.DataFrame({"trial": df["number"], "state": df["state"]})
    acc = df.get("user_attrs_val_acc")
    table["val_acc"] = acc.round(4) if acc is not None else None
    macs = df.get("user_attrs_macs")
    if macs is None or macs.isna().all():
        macs = df.get("user_attrs_planned_macs")
    table["MACs %"] = (macs / dense_macs * 100).round(1) if macs is not None else None
    latency = df.get("user_attrs_latency_ms")
    if latency is not None and latency.notna().any():
        table["latency ms"] = latency.round(3)
    feas = df.get("user_attrs_feasible")
    table["feasible"] = feas if feas is not None else None
    skipped = df.get("user_attrs_skipped")
    if skipped is not None:
        table.loc[skipped.notna(), "state"] = "SKIPPED"
    for col in [c for c in df.columns if c.startswith("params_")]:
        values = df[col]
        table[col[len("params_"):]] = values.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)
    order = table.assign(_f=table["feasible"].fillna(False).astype(bool) & (table["state"] == "COMPLETE"))
    order = order.sort_values(["_f", "val_acc", "trial"], ascending=[False, False, True], na_position="last")
    shown = order.drop(columns="_f").head(top)
    more = f"\n... {len(table) - top} more in trials.csv" if len(table) > top else ""
    return shown.to_string(index=False) + more
