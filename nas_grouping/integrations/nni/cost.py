"""MACs of an NNI DGConv space or super-net: differentiable expectation, current, dense, and per sample.

``ModelCost`` (``nas_grouping.budget``) knows DGConv layers; an NNI super-net may
also hold LayerChoices whose candidates all run in a DARTS forward. Here a
LayerChoice costs the softmax-weighted sum of its candidates' costs (its
architecture weights get the regularizer's gradient too), the chosen candidate
for current MACs, and the most expensive candidate for the dense reference that
a fractional budget refers to. For a space without LayerChoices every number
equals ``ModelCost``'s.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.integrations.nni.compat import require_nni
from nas_grouping.integrations.nni.ops import pattern_groups
from nas_grouping.macs import check_input_size, layer_macs
from nas_grouping.ops.dgconv import DGConv2d

require_nni()

from nni.nas.nn.pytorch import LayerChoice  # noqa: E402

__all__ = ["NniModelCost"]


def _dense_layer_macs(layer: DGConv2d, size: tuple[int, ...]) -> int:
    kh, kw = layer.kernel_size
    return layer.out_channels * layer.in_channels * kh * kw * size[0] * size[1]


def _label(layer: DGConv2d) -> str | None:
    label = getattr(layer, "label", None)
    return label if isinstance(label, str) else None


class _Choice:
    """One LayerChoice: its label, candidate names and their costs."""

    def __init__(self, name: str, module: LayerChoice, input_size: tuple[int, ...]) -> None:
        self.name = name
        self.module = module
        self.label: str = module.label
        self.names = [str(n) for n in module.names]
        self.costs = [NniModelCost(module[n], input_size) for n in module.names]

    def probabilities(self) -> Tensor:
        alpha = getattr(self.module, "_arch_alpha", None)
        if isinstance(alpha, Tensor):
            return torch.softmax(alpha, dim=-1)
        probs = torch.zeros(len(self.names))
        probs[self.names.index(self.chosen())] = 1.0
        return probs

    def chosen(self) -> str:
        """The candidate the module would export now: argmax (DARTS), the sample (path sampling) or the default."""
        alpha = getattr(self.module, "_arch_alpha", None)
        if isinstance(alpha, Tensor):
            return self.names[int(torch.argmax(alpha.detach()))]
        sampled = getattr(self.module, "_sampled", None)
        if sampled is not None and not isinstance(sampled, list):
            return str(sampled)
        return str(getattr(self.module, "_dry_run_choice", self.names[0]))


class NniModelCost:
    """MACs per sample of a model whose searchable parts are DGConv2d layers and NNI LayerChoices.

    Built from one shape-probe forward (eval mode, no gradients) of ``model`` on
    ``input_size``; LayerChoice candidates are probed on the input their choice
    received. Works on a ``DGConvModelSpace``, on its DARTS super-net, and on a
    frozen model. (A RandomOneShot super-net with LayerChoices cannot run a
    forward before its first sample: build the cost on the space instead.)
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int]) -> None:
        size = check_input_size(input_size)
        self.input_size = size
        top = [(n, m) for n, m in model.named_modules() if isinstance(m, LayerChoice) and n]
        choice_names = [n for n, _ in top if not any(n.startswith(o + ".") for o, _ in top if o != n)]
        inputs: dict[str, tuple[int, ...]] = {}
        handles = []
        for n in choice_names:
            def hook(mod, args, _n=n):
                inputs[_n] = tuple(args[0].shape[1:])
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
        root_choice = isinstance(model, LayerChoice)
        try:
            rows = [] if root_choice else layer_macs(model, size)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"counting the MACs of the NNI model failed ({exc}); build the cost on the model space before a "
                "sampling strategy mutates it (its LayerChoices need a sample before a forward)"
            ) from exc
        finally:
            for h in handles:
                h.remove()
        if root_choice:
            choice_names, inputs = [""], {"": size}
        self.choices = [_Choice(n, model.get_submodule(n) if n else model, inputs[n])
                        for n in choice_names if n in inputs]

        def inside(name: str) -> bool:
            return any(name == c or name.startswith(c + ".") for c in choice_names)

        self.layers: list[tuple[str, DGConv2d, tuple[int, ...]]] = []
        self.fixed_macs = 0
        for r in rows:
            if inside(r.name):
                continue
            module = model.get_submodule(r.name) if r.name else model
            if isinstance(module, DGConv2d):
                self.layers.append((r.name, module, r.output_size))
            else:
                self.fixed_macs += r.macs

    # ---------------------------------------------------------------- totals
    def expected_macs(self) -> Tensor:
        """Differentiable MACs: DGConv gates (straight-through) and softmax-weighted LayerChoice candidates."""
        total: Tensor = torch.tensor(float(self.fixed_macs))
        for _, layer, size in self.layers:
            total = total + layer.expected_macs(size)
        for choice in self.choices:
            p = choice.probabilities()
            for i, cost in enumerate(choice.costs):
                total = total + p[i] * cost.expected_macs()
        return total

    def current_macs(self) -> int:
        """MACs of the architecture the model would export now (binary gates, chosen candidates)."""
        total = self.fixed_macs + sum(layer.macs(size) for _, layer, size in self.layers)
        for choice in self.choices:
            total += choice.costs[choice.names.index(choice.chosen())].current_macs()
        return total

    @property
    def dense_macs(self) -> int:
        """Every DGConv dense, every LayerChoice at its costliest candidate: what a budget fraction refers to."""
        return (self.fixed_macs + sum(_dense_layer_macs(m, s) for _, m, s in self.layers)
                + sum(max(c.dense_macs for c in ch.costs) for ch in self.choices))

    @property
    def minimum_macs(self) -> int:
        """The cheapest architecture: every DGConv at its largest group count, every choice at its cheapest."""
        return (self.fixed_macs + sum(_dense_layer_macs(m, s) // m.max_groups for _, m, s in self.layers)
                + sum(min(c.minimum_macs for c in ch.costs) for ch in self.choices))

    def sample_macs(self, sample: dict[str, Any]) -> int:
        """Exact MACs of ``model_space.freeze(sample)``, without a forward pass.

        Labels missing from ``sample`` count at their current value.
        """
        total = self.fixed_macs
        for _, layer, size in self.layers:
            label = _label(layer)
            if label is not None and label in sample:
                total += _dense_layer_macs(layer, size) // pattern_groups(sample[label])
            else:
                total += layer.macs(size)
        for choice in self.choices:
            name = str(sample[choice.label]) if choice.label in sample else choice.chosen()
            if name not in choice.names:
                raise ConfigError(f"choice {choice.label!r}: {name!r} is not one of its candidates {choice.names}")
            total += choice.costs[choice.names.index(name)].sample_macs(sample)
        return total

    def check_budget(self, budget_macs: int) -> None:
        """Raise BudgetError when no architecture of the space fits ``budget_macs``."""
        low, dense = self.minimum_macs, self.dense_macs
        if budget_macs < low:
            raise BudgetError(
                f"a budget of {budget_macs:,} MACs cannot be met: the cheapest architecture of this space costs "
                f"{low:,} MACs ({low / dense:.1%} of dense {dense:,}), of which {self.fixed_macs:,} are in layers that "
                f"are not searched. Raise the budget to at least {low / dense:.3f} of dense, or make more layers "
                "searchable."
            )
