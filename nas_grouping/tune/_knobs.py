"""The knob space of a tuning study: what each trial samples, and how a sample becomes a job config.

A knob is a field of the job's config (``reg_strength``, ``data.batch_size``,
``space_kwargs.width``; for compress jobs also a self-grouping field such as ``lr`` or
``clusters``) with a range or a list of choices. Two knobs are special because the MAC
budget is hard:

- ``budget`` (search jobs): the search's own budget, a fraction of the dense MACs, sampled
  at or below the hard budget, so every sample fits (the search projects to it).
- ``share`` (compress jobs): one weight per layer (or stage) of how much of its connections
  a layer keeps; the weights are projected onto the budget (one scale found by bisection,
  each layer capped), so every sampled plan fits before any fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, get_type_hints

from nas_grouping.config import CompressConfig, SearchConfig, SelfGroupingConfig, config_from_dict, config_to_dict
from nas_grouping.errors import ConfigError

__all__ = ["Knob", "parse_knobs", "default_knobs", "apply_knobs", "knob_groups", "project_shares",
           "check_enqueued", "SHARE", "BUDGET"]

SHARE = "share"
BUDGET = "budget"
#: fields that no trial may change: where it writes, what it runs on, and the hard budget itself
_FIXED = {
    "search": {"out", "progress", "device", "seed", "dense", "data.dataset", "data.data_dir", "data.download",
               "measure_latency", "latency_batch"},
    "compress": {"out", "model", "arch", "state_dict", "arch_kwargs", "device", "data.dataset", "data.data_dir",
                 "data.download", "grouping.budget", "grouping.fraction", "grouping.progress", "grouping.seed",
                 "latency_batches", "latency_repeats"},
}
_SHARE_PER = ("auto", "layer", "stage")
#: the auto rule: up to this many prunable layers get a share each, more are grouped by stage
_MAX_LAYER_SHARES = 8


@dataclass(frozen=True)
class Knob:
    """One sampled setting: a float/int range (optionally log or stepped) or categorical choices."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None
    per: str | None = None  # share knob only: one share per "layer" or per "stage"

    def suggest(self, trial: Any, name: str | None = None) -> Any:
        """Sample this knob in an Optuna trial (``name`` overrides the parameter name)."""
        name = name or self.name
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.kind != "int" or float(value).is_integer())

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {list(self.choices)}"
        extra = ", log" if self.log else f", step {self.step}" if self.step else ""
        per = {"auto": ", one per layer (per stage above 8 layers)", "layer": ", one per layer",
               "stage": ", one per stage"}.get(self.per or "", "")
        return f"{self.name} in [{self.low}, {self.high}] ({self.kind}{extra}{per})"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "name"}
        if "choices" in d:
            d["choices"] = list(d["choices"])
        return d


# ------------------------------------------------------------------ fields

def _field(cls: type, path: str) -> tuple[Any, dict[str, Any]] | None:
    """(type hint, metadata) of a dotted field path of a config dataclass, or None when it is no field.

    ``space_kwargs.NAME`` / ``arch_kwargs.NAME`` are builder arguments: any name, type from the values.
    """
    head, _, rest = path.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        return None
    hint = get_type_hints(cls)[head]
    if not rest:
        return hint, dict(fields[head].metadata)
    if hint is dict:
        return Any, {}
    if dataclasses.is_dataclass(hint):
        return _field(hint, rest)
    return None


def _resolve_name(kind: str, name: str) -> str:
    """The config path of a knob name (compress jobs: bare self-grouping fields mean grouping.NAME)."""
    cls = SearchConfig if kind == "search" else CompressConfig
    if (kind, name) in (("compress", SHARE), ("search", BUDGET)):
        return name
    if _field(cls, name) is not None:
        return name
    if kind == "compress" and _field(SelfGroupingConfig, name) is not None:
        return f"grouping.{name}"
    known = sorted(f.name for f in dataclasses.fields(cls))
    if kind == "compress":
        known = [SHARE] + sorted(f.name for f in dataclasses.fields(SelfGroupingConfig)) + known
    raise ConfigError(f"knob {name!r}: not a setting of the {kind} job; expected one of {', '.join(known)} "
                      "(dotted paths such as data.batch_size or space_kwargs.NAME work too)")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _make_knob(kind: str, name: str, spec: Any) -> Knob:
    """Validate one knob spec (a dict; a list is shorthand for choices)."""
    path = _resolve_name(kind, name)
    if path in _FIXED[kind]:
        raise ConfigError(f"knob {name!r}: {path} is fixed for every trial of a study (it sets where a trial runs or "
                          "writes, or the hard budget); set it on the job, not as a knob")
    if isinstance(spec, (list, tuple)):
        spec = {"choices": list(spec)}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"knob {name!r}: expected {{low, high[, log, step]}} or {{choices: [...]}}, got {spec!r}")
    unknown = set(spec) - {"low", "high", "log", "step", "choices", "per"}
    if unknown:
        raise ConfigError(f"knob {name!r}: unknown key(s) {sorted(unknown)}; expected low, high, log, step, choices"
                          + (", per" if path == SHARE else ""))
    if "per" in spec and path != SHARE:
        raise ConfigError(f"knob {name!r}: 'per' belongs to the share knob only")
    cls = SearchConfig if kind == "search" else CompressConfig
    hint, meta = (Any, {}) if path in (SHARE, BUDGET) else _field(cls, path)
    choices = spec.get("choices")
    if choices is None and (hint is bool or "choices" in meta) and "low" not in spec:
        choices = [False, True] if hint is bool else list(meta["choices"])
    if choices is not None:
        if "low" in spec or "high" in spec:
            raise ConfigError(f"knob {name!r}: give either choices or low/high, not both")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(f"knob {name!r}: the list of choices is empty; give at least one value")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ConfigError(f"knob {name!r}: choices must be numbers, strings, booleans or null, got {choices!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"knob {name!r}: choices repeat a value: {choices!r}")
        return Knob(name=path, kind="categorical", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"knob {name!r}: give low and high (a range) or choices (a list)")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not _is_number(low) or not _is_number(high):
        raise ConfigError(f"knob {name!r}: low and high must be finite numbers, got {low!r} and {high!r}")
    if low > high:
        raise ConfigError(f"knob {name!r}: the range [{low}, {high}] is empty (low > high); swap them")
    if not isinstance(log, bool):
        raise ConfigError(f"knob {name!r}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"knob {name!r}: a log range needs low > 0, got {low}")
    if step is not None and (not _is_number(step) or step <= 0 or log):
        raise ConfigError(f"knob {name!r}: step must be a number > 0 and cannot go with log, got {step!r}")
    if hint is int:
        kind_ = "int"
    elif hint is float:
        kind_ = "float"
    else:
        kind_ = "int" if isinstance(low, int) and isinstance(high, int) and path not in (SHARE, BUDGET) else "float"
    if kind_ == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"knob {name!r}: {path} is an integer setting, got the range [{low}, {high}]")
    if kind_ == "int":
        low, high = int(low), int(high)
    per = None
    if path == SHARE:
        per = spec.get("per", "auto")
        if per not in _SHARE_PER:
            raise ConfigError(f"knob {name!r}: per must be one of {', '.join(_SHARE_PER)}, got {per!r}")
        if not 0 < low <= high <= 1:
            raise ConfigError(f"knob {name!r}: shares are weights in (0, 1], got [{low}, {high}]")
    return Knob(name=path, kind=kind_, low=low, high=high, log=log, step=step, per=per)


# ------------------------------------------------------------------ spaces

def default_knobs(kind: str, objective: str, *, budget_range: tuple[float, float] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """The knob space a study uses unless told otherwise (the knobs nobody can set by hand).

    Search: the regularizer strength (lambda or exponent), the gate learning rate and the
    weight learning rate; in the pareto modes also the search's own budget, up to the hard one.
    Compress: per-layer (or per-stage) shares of the budget, the cluster count, the
    fine-tuning learning rate.
    """
    if kind == "search":
        knobs: dict[str, dict[str, Any]] = {
            "reg_strength": {"low": 0.05, "high": 5.0, "log": True},
            "gate_lr": {"low": 0.003, "high": 0.3, "log": True},
            "lr": {"low": 0.01, "high": 0.2, "log": True},
        }
        if objective in ("pareto", "pareto-latency") and budget_range is not None:
            lowest, hard = budget_range
            knobs[BUDGET] = {"low": round(min(hard, max(lowest, 0.4 * hard)), 4), "high": hard}
        return knobs
    if kind == "compress":
        return {
            SHARE: {"low": 0.2, "high": 1.0, "per": "auto"},
            "clusters": {"low": 2, "high": 16, "log": True},
            "lr": {"low": 0.002, "high": 0.05, "log": True},
        }
    raise ConfigError(f"unknown job kind {kind!r}: expected search or compress")


def parse_knobs(kind: str, objective: str, user: Mapping[str, Any] | None, *,
                budget_range: tuple[float, float] | None = None) -> dict[str, Knob]:
    """The study's knobs: the defaults, with the user's entries replacing them (None drops one).

    Raises:
        ConfigError: an unknown or fixed setting, an empty range or list of choices, a bad key.
    """
    merged: dict[str, Any] = dict(default_knobs(kind, objective, budget_range=budget_range))
    for name, spec in (user or {}).items():
        merged[str(name)] = spec
    knobs: dict[str, Knob] = {}
    for name, spec in merged.items():
        if spec is None:
            continue
        knob = _make_knob(kind, name, spec)
        if knob.name in knobs:
            raise ConfigError(f"knob {name!r} names the same setting as another knob ({knob.name})")
        knobs[knob.name] = knob
    if BUDGET in knobs and budget_range is not None:
        knob = knobs[BUDGET]
        lo_fit, hard = budget_range
        if knob.kind == "categorical" or not 0 < knob.low <= 1:
            raise ConfigError("knob 'budget': give a range of fractions of the dense MACs (0 < low <= high <= 1)")
        if knob.low > hard:
            raise ConfigError(f"knob 'budget': the range [{knob.low}, {knob.high}] lies above the hard budget "
                              f"({hard:.4f} of dense), so no sample would fit; lower it")
        if knob.high < lo_fit:
            raise ConfigError(f"knob 'budget': the range [{knob.low}, {knob.high}] lies below what the most grouped "
                              f"network costs ({lo_fit:.4f} of dense), so no sample can be met; raise it")
        knobs[BUDGET] = dataclasses.replace(knob, low=max(knob.low, lo_fit), high=min(knob.high, hard))
    if not knobs:
        raise ConfigError("the knob space is empty: every default knob was dropped and none was given")
    return knobs


def check_enqueued(kind: str, knobs: Mapping[str, Knob], enqueued: Iterable[Mapping[str, Any]],
                   share_names: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Validate known-good settings to enqueue: knob names (or share:GROUP) and values in range.

    Returns them keyed by the trial parameter names (config paths), as Optuna records them.
    """
    out = []
    share_names = set(share_names)
    for i, params in enumerate(enqueued):
        row = {}
        for name, value in params.items():
            if name in share_names:
                key, knob = name, knobs.get(SHARE)
            else:
                try:
                    key = _resolve_name(kind, name)
                except ConfigError:
                    key = name
                knob = knobs.get(key)
            if knob is None:
                raise ConfigError(f"enqueue[{i}]: {name!r} is not a knob of this study; knobs: "
                                  f"{', '.join(sorted(set(knobs) - {SHARE}) + sorted(share_names))}")
            if not knob.contains(value):
                raise ConfigError(f"enqueue[{i}]: {name} = {value!r} is outside the knob's range ({knob.describe()})")
            row[key] = value
        out.append(row)
    return out


# ------------------------------------------------------------------ apply

def _set_path(values: dict[str, Any], path: str, value: Any) -> None:
    node = values
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def apply_knobs(base: SearchConfig | CompressConfig, params: Mapping[str, Any], **fixed: Any
                ) -> SearchConfig | CompressConfig:
    """A copy of ``base`` with sampled ``params`` (config paths) and ``fixed`` fields set.

    An integer cluster count ``K`` becomes the rule ``upto:K``, so narrow layers get at most
    their number of filters.
    """
    values = config_to_dict(base)
    for path, value in {**params, **fixed}.items():
        if path in (SHARE, BUDGET) or path.startswith(SHARE + ":"):
            continue
        if path == "grouping.clusters" and isinstance(value, int) and not isinstance(value, bool):
            value = f"upto:{value}"
        _set_path(values, path, value)
    return config_from_dict(type(base), values)


# ------------------------------------------------------------------ shares

def knob_groups(layer_names: list[str], per: str) -> dict[str, str]:
    """Layer name -> share group: the layer itself, or its stage (the first name component).

    ``auto`` gives every layer its own share up to 8 prunable layers, and one share per stage
    above that (a ResNet's layer1/layer2/layer3, fc).
    """
    if per == "auto":
        per = "layer" if len(layer_names) <= _MAX_LAYER_SHARES else "stage"
    if per == "layer":
        return {n: n or "<model>" for n in layer_names}
    return {n: (n.split(".")[0] if n else "<model>") for n in layer_names}


def share_param(group: str) -> str:
    """The Optuna parameter name of a group's share (kept readable in tables and plots)."""
    return f"{SHARE}:{re.sub(r'[^A-Za-z0-9_.:<>-]', '_', group)}"


def project_shares(layers: list[tuple[str, int, int, float]], fixed_macs: int, budget_macs: int,
                   weights: Mapping[str, float]) -> dict[str, float]:
    """Per-layer pruned fractions whose planned MACs fit ``budget_macs``, in proportion to ``weights``.

    Args:
        layers: (name, MACs, connections, cap) of each prunable layer: a layer that keeps
            ``k`` of its connections costs at most ``floor(k * connections) * (MACs // connections)``.
        fixed_macs: MACs of everything that is not pruned.
        weights: a weight per layer in (0, 1]; a layer keeps ``clip(t * weight, 1 - cap, 1)`` of
            its connections, with one scale ``t`` found by bisection so the MACs meet the budget.

    Raises:
        ConfigError: the budget is below what the layers cost at their caps.
    """
    def fractions(t: float) -> dict[str, float]:
        return {n: min(cap, 1.0 - min(1.0, max(1.0 - cap, t * weights[n]))) for n, _, _, cap in layers}

    def macs(f: Mapping[str, float]) -> int:  # exactly as the self-grouping plan counts (LayerPlan.macs_after)
        return fixed_macs + sum(math.floor((1.0 - f[n]) * c + 1e-9) * (m // c) if c else m for n, m, c, _ in layers)

    lowest = fractions(0.0)
    if macs(lowest) > budget_macs:
        raise ConfigError(f"shares cannot meet {budget_macs:,} MACs: at their caps the layers still cost "
                          f"{macs(lowest):,}")
    top = 1.0 / min(weights.values())
    if macs(fractions(top)) <= budget_macs:
        return {n: 0.0 for n, _, _, _ in layers}
    lo, hi = 0.0, top
    for _ in range(60):
        mid = (lo + hi) / 2
        if macs(fractions(mid)) <= budget_macs:
            lo = mid
        else:
            hi = mid
    return fractions(lo)
