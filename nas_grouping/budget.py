"""MAC budgets and the resource regularizers that drive DGConv gates toward them.

A budget is one object: absolute MACs or a fraction of the dense model.
``ModelCost`` turns a model with DGConv2d layers into a differentiable expected
cost in real MACs (connections x kernel taps x output positions), so the
regularizer acts on what a FLOP budget means, not on the paper's connection
count. Two regularizers: the paper's multiplicative form and an additive penalty; ``register_regularizer``
adds more by name (configs accept every registered name), and ``make_regularizer`` also takes an object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from nas_grouping.convert import dgconv_layers
from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.macs import layer_macs
from nas_grouping.ops.dgconv import DGConv2d

__all__ = ["MacBudget", "ModelCost", "Regularizer", "REGULARIZERS", "register_regularizer", "MultiplicativeRegularizer",
           "AdditiveRegularizer", "make_regularizer", "groups_at_budget"]


@dataclass(frozen=True)
class MacBudget:
    """A MAC budget: ``macs`` per sample, or ``fraction`` of the dense model's MACs."""

    macs: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.macs is None) == (self.fraction is None):
            raise ConfigError("MacBudget: give exactly one of macs= or fraction=")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"MacBudget: fraction must be in (0, 1], got {self.fraction}")
        if self.macs is not None and self.macs <= 0:
            raise ConfigError(f"MacBudget: macs must be > 0, got {self.macs}")

    @classmethod
    def parse(cls, value: float | int | str) -> "MacBudget":
        """``0.5`` -> half the dense MACs; ``12e6`` or ``"12M"`` -> absolute MACs.

        Up to 1 a budget is a fraction; above 1 it is MACs per sample and must be whole
        (``1.5`` is refused rather than read as 1 MAC or as 100%).
        """
        expected = "expected a fraction of the dense MACs in (0, 1] such as 0.5, or MACs per sample such as 12M"
        if isinstance(value, str):
            v = value.strip().upper()
            scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(v[-1:], None)
            try:
                number = float(v[:-1]) * scale if scale else float(v)
            except ValueError:
                raise ConfigError(f"budget {value!r}: {expected}") from None
            value = number
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError(f"budget {value!r}: {expected}")
        if value <= 1:
            return cls(fraction=float(value))
        if not float(value).is_integer():
            raise ConfigError(f"budget {value!r}: above 1 a budget is MACs per sample and must be a whole number "
                              f"(such as 12M); a fraction of the dense model is at most 1")
        return cls(macs=int(value))

    def resolve(self, dense_macs: int) -> int:
        """The budget in MACs for a model whose dense cost is ``dense_macs``."""
        return int(self.macs) if self.macs is not None else int(self.fraction * dense_macs)

    def describe(self, dense_macs: int) -> str:
        target = self.resolve(dense_macs)
        return f"{target:,} MACs ({target / dense_macs:.1%} of dense {dense_macs:,})"


class ModelCost:
    """Differentiable expected MACs of a model whose searchable layers are DGConv2d.

    Output sizes come from one shape-probe forward at construction; the fixed
    part (every layer that is not a DGConv2d) is counted then as well.
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int]) -> None:
        rows = {r.name: r for r in layer_macs(model, input_size)}
        self.layers: list[tuple[str, DGConv2d, tuple[int, int]]] = []
        for name, layer in dgconv_layers(model):
            if name in rows:
                self.layers.append((name, layer, rows[name].output_size))
        searchable = {name for name, _, _ in self.layers}
        self.fixed_macs = sum(r.macs for n, r in rows.items() if n not in searchable)
        self.input_size = tuple(input_size)

    def _sum(self, per_layer) -> int:
        return self.fixed_macs + sum(per_layer(layer, size) for _, layer, size in self.layers)

    @property
    def dense_macs(self) -> int:
        """MACs with every gate on."""
        return self._sum(lambda m, s: m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1] * s[0] * s[1])

    @property
    def minimum_macs(self) -> int:
        """MACs with every gate off (each DGConv2d at its largest group count)."""
        return self._sum(lambda m, s: m.out_channels * m.in_channels // m.max_groups
                         * m.kernel_size[0] * m.kernel_size[1] * s[0] * s[1])

    def current_macs(self) -> int:
        """MACs of the current binary gates (what the exported model will cost)."""
        return self._sum(lambda m, s: m.macs(s))

    def expected_macs(self) -> Tensor:
        """Differentiable MACs (equal to ``current_macs`` for binary gates)."""
        terms = [layer.expected_macs(size) for _, layer, size in self.layers]
        if not terms:
            return torch.tensor(float(self.fixed_macs))
        return self.fixed_macs + torch.stack(terms).sum()

    def layer_savings(self) -> list[tuple[str, DGConv2d, int, int]]:
        """(name, layer, gate index, MACs saved) for every gate that is on: turning it off halves the layer's MACs."""
        out = []
        for name, layer, size in self.layers:
            gates = layer.gate_values()
            for j in range(layer.num_gates):
                if gates[j] > 0.5:
                    out.append((name, layer, j, layer.macs(size) // 2))
        return out

    def check_budget(self, budget_macs: int) -> None:
        """Raise BudgetError when no gate configuration reaches ``budget_macs``."""
        if budget_macs < self.minimum_macs:
            raise BudgetError(
                f"a budget of {budget_macs:,} MACs cannot be met: with every DGConv layer at its largest "
                f"group count the model still costs {self.minimum_macs:,} MACs "
                f"({self.minimum_macs / self.dense_macs:.1%} of dense {self.dense_macs:,}), of which "
                f"{self.fixed_macs:,} are in layers that are not searched. Raise the budget to at least "
                f"{self.minimum_macs / self.dense_macs:.3f} of dense, or make more layers searchable."
            )


def parse_latency_budget(text: str | float, dense_ms: float) -> float:
    """``"2.5ms"`` -> 2.5 ms; ``0.5`` or ``"0.5"`` -> half the dense model's latency."""
    t = str(text).strip().lower()
    try:
        if t.endswith("ms"):
            value = float(t[:-2])
        else:
            fraction = float(t)
            if not 0 < fraction <= 1:
                raise ValueError
            value = fraction * dense_ms
    except ValueError:
        raise ConfigError(f"latency budget {text!r}: expected milliseconds such as 2.5ms or a fraction "
                          "of the dense latency in (0, 1] such as 0.5") from None
    if value <= 0:
        raise ConfigError(f"latency budget {text!r} must be > 0")
    return value


def groups_at_budget(model: nn.Module, input_size: Sequence[int], budget: float | int,
                     max_combinations: int = 200_000, keep_dense: Sequence[str] = ()) -> dict[str, int]:
    """Near-uniform contiguous groups per DGConv layer whose MACs come closest to ``budget`` without passing it.

    The hand-set baseline at equal MACs: every layer takes G, the largest power of two whose
    uniform model still costs more than the budget, and a subset of layers takes 2G, chosen
    (exactly, over classes of layers that save equal MACs) so that the MACs land as close under the budget as the doubling steps
    allow. Layers named in ``keep_dense`` stay at one group (a hand rule, e.g. the layers a search kept
    dense). Sets the groups on ``model`` and returns them. Raises BudgetError when even the
    largest group counts do not fit.
    """
    cost = ModelCost(model, input_size)
    target = MacBudget.parse(budget).resolve(cost.dense_macs)
    cost.check_budget(target)
    unknown = sorted(set(keep_dense) - {name for name, _, _ in cost.layers})
    if unknown:
        raise ConfigError(f"keep_dense: no searchable layer named {', '.join(unknown)}; the searchable layers are "
                          f"{', '.join(name for name, _, _ in cost.layers)}")
    for name, layer, _ in cost.layers:
        if name in keep_dense:
            layer.set_groups(1)
    layers = [entry for entry in cost.layers if entry[0] not in keep_dense]

    def set_uniform(g: int) -> None:
        for _, layer, _ in layers:
            layer.set_groups(min(g, layer.max_groups))

    g = 1
    set_uniform(g)
    while cost.current_macs() > target and any(g * 2 <= layer.max_groups for _, layer, _ in layers):
        set_uniform(g * 2)
        if cost.current_macs() <= target:
            break
        g *= 2
    set_uniform(g)
    # layers that can still double, grouped by the MACs doubling saves (equal layers are interchangeable)
    classes: dict[int, list] = {}
    for name, layer, size in layers:
        if min(g, layer.max_groups) * 2 <= layer.max_groups:
            classes.setdefault(layer.macs(size) // 2, []).append(layer)
    base, need = cost.current_macs(), cost.current_macs() - target
    savings = sorted(classes)
    best: tuple[int, tuple[int, ...]] | None = None
    combos = 1
    for s in savings:
        combos *= len(classes[s]) + 1
    if combos <= max_combinations:
        import itertools

        for counts in itertools.product(*(range(len(classes[s]) + 1) for s in savings)):
            saved = sum(c * s for c, s in zip(counts, savings))
            if saved >= need and (best is None or saved < best[0]):
                best = (saved, counts)
    else:  # greedy: double the largest savers until the budget holds
        counts = [0] * len(savings)
        saved = 0
        for i in reversed(range(len(savings))):
            while saved < need and counts[i] < len(classes[savings[i]]):
                counts[i] += 1
                saved += savings[i]
        best = (saved, tuple(counts)) if saved >= need else None
    if best is None:
        raise BudgetError(f"no near-uniform grouping reaches {target:,} MACs from {base:,}")
    for s, count in zip(savings, best[1]):
        for layer in classes[s][:count]:
            layer.set_groups(min(g, layer.max_groups) * 2)
    return {name: layer.learned_groups for name, layer, _ in cost.layers}


#: A regularizer: (task loss, differentiable expected MACs, budget in MACs) -> the loss to minimise.
Regularizer = Callable[[Tensor, Tensor, int], Tensor]

#: Regularizers by the name a config gives (``SearchConfig.regularizer``): name -> class built as ``cls(strength)``.
REGULARIZERS: dict[str, Callable[[float], Regularizer]] = {}


def register_regularizer(name: str) -> Callable[[type], type]:
    """Class decorator: make ``name`` a regularizer that configs and :func:`make_regularizer` accept.

    The class is built as ``cls(strength)`` and called as ``reg(task_loss, cost, budget_macs)``.
    """
    def register(cls: type) -> type:
        REGULARIZERS[name] = cls
        return cls
    return register


@register_regularizer("additive")
@dataclass(frozen=True)
class AdditiveRegularizer:
    """loss + strength x relu(cost / budget - 1): pressure that does not fade as the loss falls."""

    strength: float = 2.0

    def __call__(self, task_loss: Tensor, cost: Tensor, budget_macs: int) -> Tensor:
        return task_loss + self.strength * torch.relu(cost / budget_macs - 1)


@register_regularizer("multiplicative")
@dataclass(frozen=True)
class MultiplicativeRegularizer:
    """The paper's form: loss x (cost / budget)^exponent while over budget, loss otherwise.

    Equivalent to the paper's L x (o / zeta)^a with a = -exponent.
    """

    exponent: float = 0.5

    def __call__(self, task_loss: Tensor, cost: Tensor, budget_macs: int) -> Tensor:
        ratio = cost / budget_macs
        factor = torch.where(ratio > 1, ratio.clamp_min(1) ** self.exponent, torch.ones_like(ratio))
        return task_loss * factor


def make_regularizer(kind: str | Regularizer, strength: float | None = None) -> Regularizer:
    """The regularizer ``kind`` names, built with ``strength`` (``"additive"``: lambda; ``"multiplicative"``:
    the exponent; None: the class's default), or ``kind`` itself when it is already a regularizer object
    (any callable ``(task_loss, cost, budget_macs) -> loss``; ``strength`` is then not used).

    Raises:
        ConfigError: an unknown name (the message lists the known ones), or a strength that is not > 0.
    """
    if not isinstance(kind, str):
        if not callable(kind):
            raise ConfigError(f"regularizer: expected a name ({', '.join(REGULARIZERS)}) or a callable "
                              f"(task_loss, cost, budget_macs) -> loss, got {kind!r}")
        return kind
    if kind not in REGULARIZERS:
        raise ConfigError(f"unknown regularizer {kind!r}: expected one of {', '.join(map(repr, REGULARIZERS))}")
    if strength is None:
        return REGULARIZERS[kind]()
    if strength <= 0:
        raise ConfigError(f"regularizer strength must be > 0, got {strength}")
    return REGULARIZERS[kind](strength)
