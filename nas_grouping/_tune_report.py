"""A tuning run a person can read: trials.csv, summary.json, best_model/, and PNG plots.

Feasibility is judged here again, not only by Optuna: a trial counts as feasible when it
completed, its constraint is <= 0 *and* its exported model's MACs are within the budget, so
a model over budget is never reported as best, whatever the storage holds.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .report import read_json, write_json

__all__ = ["feasible_trials", "pareto_front", "write_results", "format_tuning_run", "SUMMARY", "TRIALS_CSV"]

SUMMARY = "summary.json"
TRIALS_CSV = "trials.csv"
BEST_MODEL = "best_model"


def feasible_trials(trials: Sequence[Any], budget_macs: int) -> list[Any]:
    """Completed trials whose constraints are all <= 0 and whose exported model fits ``budget_macs``."""
    from optuna.trial import TrialState

    out = []
    for t in trials:
        macs = t.user_attrs.get("macs")
        if (t.state == TrialState.COMPLETE and t.constraints and all(v <= 0 for v in t.constraints.values())
                and macs is not None and macs <= budget_macs and t.user_attrs.get("val_acc") is not None):
            out.append(t)
    return out


def pareto_front(trials: Sequence[Any]) -> list[Any]:
    """The trials no other trial beats on both accuracy (higher) and MACs (lower), by MACs."""
    front = []
    for t in trials:
        a, m = t.user_attrs["val_acc"], t.user_attrs["macs"]
        if not any((o.user_attrs["val_acc"] >= a and o.user_attrs["macs"] <= m)
                   and (o.user_attrs["val_acc"] > a or o.user_attrs["macs"] < m) for o in trials):
            front.append(t)
    return sorted(front, key=lambda t: (t.user_attrs["macs"], -t.user_attrs["val_acc"], t.number))


def _best(feasible: Sequence[Any]) -> Any | None:
    """Highest accuracy; ties go to fewer MACs, then the earlier trial."""
    if not feasible:
        return None
    return min(feasible, key=lambda t: (-t.user_attrs["val_acc"], t.user_attrs["macs"], t.number))


def _trial_record(t: Any, dense_macs: int) -> dict[str, Any]:
    u = t.user_attrs
    return {"number": t.number, "val_acc": u.get("val_acc"), "macs": u.get("macs"),
            "macs_fraction": (u["macs"] / dense_macs) if u.get("macs") is not None else None,
            "violation": u.get("violation"), "params": dict(t.params), "run_dir": u.get("run_dir"),
            "worker": u.get("worker")}


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
                  storage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """trials.csv, summary.json, best_model/ and the plots of ``study``, in ``out``; returns the summary."""
    trials = study.get_trials(deepcopy=False)
    df = study.trials_dataframe()
    df.to_csv(out / TRIALS_CSV, index=False)
    feasible = feasible_trials(trials, budget_macs)
    best = _best(feasible)
    front = pareto_front(feasible)
    summary: dict[str, Any] = {
        "kind": kind, "objective": objective, "study_name": study.study_name, "storage": storage,
        "budget_macs": budget_macs, "dense_macs": dense_macs, "budget_fraction": budget_macs / dense_macs,
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
    summary["plots"] = _plots(study, trials, feasible, front, out, budget_macs, dense_macs, objective)
    write_json(out / SUMMARY, summary)
    return summary


# ------------------------------------------------------------------ plots

def _plots(study: Any, trials: Sequence[Any], feasible: Sequence[Any], front: Sequence[Any], out: Path,
           budget_macs: int, dense_macs: int, objective: str) -> dict[str, str]:
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
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=110)
    plt.close(fig)
    written["history"] = "history.png"

    # accuracy vs MACs: the Pareto front of feasible trials, infeasible ones marked
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pct = 100.0 / dense_macs
    if feasible:
        ax.plot([t.user_attrs["macs"] * pct for t in feasible], [t.user_attrs["val_acc"] for t in feasible], "o",
                color="tab:blue", alpha=0.6, label="feasible")
    if front:
        ax.step([t.user_attrs["macs"] * pct for t in front], [t.user_attrs["val_acc"] for t in front], "-o",
                where="post", color="tab:orange", label="Pareto front (feasible)")
    if trained_over:
        ax.plot([t.user_attrs["macs"] * pct for t in trained_over], [t.user_attrs["val_acc"] for t in trained_over],
                "x", color="tab:red", ms=9, label="infeasible (over budget)")
    if skipped:
        macs = [t.user_attrs.get("planned_macs") or t.user_attrs.get("minimum_macs") for t in skipped]
        macs = [m * pct for m in macs if m is not None]
        if macs:
            ax.plot(macs, [0.02] * len(macs), "|", color="tab:red", ms=18, mew=2,
                    transform=ax.get_xaxis_transform(), label="infeasible, not trained (MACs known)")
    ax.axvline(budget_macs * pct, ls="--", color="tab:red", alpha=0.7, label="hard budget")
    ax.set_xlabel("MACs (% of dense)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("accuracy vs MACs" + (" (Pareto front)" if objective == "pareto" else ""))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    written["pareto"] = "pareto.png"

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
             f"hard budget {s['budget_macs']:,} MACs ({s['budget_fraction']:.1%} of dense {s['dense_macs']:,}); "
             f"{s['trials']} trials: " + ", ".join(f"{n} {k}" for k, n in sorted(s["states"].items()))
             + f"; {s['feasible']} feasible"]
    b = s.get("best")
    if b:
        lines.append(f"best feasible: trial {b['number']}, val acc {b['val_acc']:.4f}, {b['macs']:,} MACs "
                     f"({b['macs_fraction']:.1%} of dense); model in "
                     f"{run / s['best_model'] if s.get('best_model') else s.get('best_model_elsewhere')}")
        lines.append("  knobs: " + ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items()))
    else:
        lines.append("no feasible trial completed yet")
    if s["objective"] == "pareto" and s.get("pareto_front"):
        lines.append("Pareto front (feasible): " + "; ".join(
            f"trial {t['number']}: {t['val_acc']:.4f} at {t['macs_fraction']:.1%}" for t in s["pareto_front"]))
    csv = run / TRIALS_CSV
    if csv.is_file():
        lines.append(trial_table(pd.read_csv(csv), s["dense_macs"], top=top))
    return "\n".join(lines)


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
