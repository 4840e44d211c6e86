"""How the self-grouping settings name layers: cluster-count rules, per-layer mappings, CLI text.

A per-layer setting (cluster count, pruned fraction) is one value for every layer, or a
mapping of fnmatch patterns over module names (``{"layer3.*": 8, "*": 16}``; the first
pattern that matches a layer wins). Cluster counts may also be rules, picked by name from
a small registry (``"upto:16"``, ``"per:8"``, ``"sqrt"``), so one setting fits layers of
any width.
"""

from __future__ import annotations

import fnmatch
import json
import math
from typing import Any, Callable, Mapping

from nas_grouping.errors import ConfigError

__all__ = ["register_cluster_rule", "list_cluster_rules", "resolve_clusters", "match_layer",
           "parse_clusters", "parse_fraction", "parse_patterns"]

ClusterRule = Callable[[int, int | None], int]
_RULES: dict[str, tuple[ClusterRule, bool, str]] = {}


def register_cluster_rule(name: str, *, needs_argument: bool, help: str) -> Callable[[ClusterRule], ClusterRule]:
    """Register ``rule(filters, argument) -> clusters`` under ``name`` (written ``name`` or ``name:N``)."""
    def wrapper(fn: ClusterRule) -> ClusterRule:
        if name in _RULES:
            raise ConfigError(f"a cluster rule named {name!r} is registered already")
        _RULES[name] = (fn, needs_argument, help)
        return fn
    return wrapper


def list_cluster_rules() -> dict[str, str]:
    """Rule names and what each does."""
    return {name: help for name, (_, _, help) in sorted(_RULES.items())}


@register_cluster_rule("upto", needs_argument=True, help="upto:K = min(K, filters): K clusters, fewer in narrow layers")
def _upto(filters: int, k: int | None) -> int:
    return min(int(k), filters)


@register_cluster_rule("per", needs_argument=True, help="per:N = filters // N: clusters of about N filters")
def _per(filters: int, n: int | None) -> int:
    return max(1, filters // int(n))


@register_cluster_rule("sqrt", needs_argument=False, help="sqrt = round(sqrt(filters))")
def _sqrt(filters: int, _: int | None) -> int:
    return max(1, round(math.sqrt(filters)))


def _check_rule(text: str) -> tuple[str, int | None]:
    name, _, arg = text.partition(":")
    if name not in _RULES:
        raise ConfigError(f"cluster rule {text!r}: unknown rule {name!r}; expected an int or one of "
                          + ", ".join(f"{n} ({h})" for n, h in list_cluster_rules().items()))
    needs = _RULES[name][1]
    if needs and not arg:
        raise ConfigError(f"cluster rule {text!r}: {name} needs a number, e.g. {name}:16")
    if not needs and arg:
        raise ConfigError(f"cluster rule {text!r}: {name} takes no number")
    value = None
    if arg:
        try:
            value = int(arg)
        except ValueError:
            raise ConfigError(f"cluster rule {text!r}: expected an integer after ':', got {arg!r}") from None
        if value < 1:
            raise ConfigError(f"cluster rule {text!r}: the number must be >= 1")
    return name, value


def _check_count(value: Any, where: str) -> int | str:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an int >= 1 or a rule, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where}: a cluster count must be >= 1, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return _check_count(int(text), where)
        _check_rule(text)
        return text
    raise ConfigError(f"{where}: expected an int >= 1 or a rule such as 'upto:16', got {value!r}")


def _maybe_json(text: str) -> Any:
    text = text.strip()
    if text.startswith("{") or text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{text!r} is not valid JSON: {exc}") from None
    return text


def _per_pattern(value: Any, check: Callable[[Any, str], Any], name: str, example: str) -> Any:
    """One value or a {pattern: value} mapping (JSON text too), each entry validated by ``check``."""
    if isinstance(value, str):
        value = _maybe_json(value)
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(f"{name}: the mapping is empty; give at least one pattern, e.g. {example}")
        return {str(k): check(v, f"{name}[{k!r}]") for k, v in value.items()}
    return check(value, name)


def parse_clusters(value: Any) -> int | str | dict[str, int | str]:
    """Validate a cluster setting: an int, a rule, or a {pattern: int or rule} mapping (JSON text too)."""
    return _per_pattern(value, _check_count, "clusters", "{'*': 16}")


def _check_fraction(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number between 0 and 1, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: expected the pruned share of connections, a number in [0, 1], got {value!r}")
    return float(value)


def parse_fraction(value: Any) -> float | dict[str, float] | None:
    """Validate a pruned-fraction setting: None, a number in [0, 1], or a {pattern: number} mapping."""
    if value is None:
        return None
    return _per_pattern(value, _check_fraction, "fraction", "{'*': 0.5}")


def parse_patterns(value: Any) -> list[str]:
    """A list of fnmatch patterns from a list, a JSON list, or comma-separated text."""
    if value is None:
        return []
    if isinstance(value, str):
        value = _maybe_json(value)
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"exclude: expected a list of name patterns such as ['layer4.*'], got {value!r}")
    return list(value)


def match_layer(name: str, mapping: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(pattern, value) of the first pattern that matches ``name``, or None."""
    for pattern, value in mapping.items():
        if fnmatch.fnmatchcase(name, pattern):
            return pattern, value
    return None


def resolve_clusters(setting: int | str | Mapping[str, int | str], name: str, filters: int) -> int:
    """The cluster count of layer ``name`` with ``filters`` output channels.

    Raises:
        ConfigError: no pattern matches the layer, or more clusters than filters.
    """
    value: Any = setting
    if isinstance(setting, Mapping):
        hit = match_layer(name, setting)
        if hit is None:
            raise ConfigError(f"clusters: no pattern of {list(setting)} matches layer {name!r}; "
                              "add a fallback such as '*': 'upto:16'")
        value = hit[1]
    if isinstance(value, str):
        rule, arg = _check_rule(value)
        k = _RULES[rule][0](filters, arg)
    else:
        k = int(value)
    if k > filters:
        raise ConfigError(f"layer {name!r}: {k} clusters but only {filters} filters; use at most {filters} "
                          f"clusters there (a mapping entry for it, or a rule such as 'upto:{k}')")
    return k
