"""Channel pruning: remove whole channels, together where layers share them.

Grouping keeps every tensor's width, so the per-channel work around the convolutions
(BatchNorm, activations, residual additions, the stem) keeps its cost, and on narrow
layers grouped convolutions can be slower than dense ones. Fewer channels make every
tensor smaller. This pass traces the model (torch.fx), finds the sets of channels that
must go together (a residual addition ties the channels of every layer that feeds it; a
depthwise conv or a BatchNorm carries its input's channels through), scores each channel
by the L1 norm of the filters that produce it, and removes the same share of every set.
The result is the same model with narrower ``nn.Conv2d`` / ``nn.BatchNorm`` / ``nn.Linear``
layers, a plain ``nn.Module`` that a later pass (DGConv conversion, the search, export)
takes as it is. Channels the model's input or output sees, concatenations, reshapes and
layers the trace does not know are left alone, so the outputs keep their shape.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from nas_grouping.channels.importance import ChannelImportance, L1Importance
from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.export.records import NORMS, set_widths
from nas_grouping.graph.tracing import PER_CHANNEL_FUNCTIONS, PER_CHANNEL_METHODS, PER_CHANNEL_MODULES, Tracer
from nas_grouping.macs import check_input_size, count_macs

__all__ = ["ChannelPruning", "ChannelSet", "prune_channels", "least_ratio", "set_widths"]

_ELEMENTWISE = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, torch.add, torch.mul,
                torch.sub}
_ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}


@dataclass
class ChannelSet:
    """Channels that are removed together, and the layers that hold them.

    ``members`` are (module name, role): ``out`` produces the channels (its filters score
    them), ``in`` reads them, ``through`` carries them (BatchNorm, depthwise conv).
    ``prunable`` is False where the model's input or output, or a layer the pass does not
    know, sees them (``why`` says which).
    """

    channels: int
    members: list[tuple[str, str]] = field(default_factory=list)
    prunable: bool = True
    why: str = ""


class _Sets:
    """Union-find over channel sets, one per traced tensor."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.sets: list[ChannelSet] = []

    def new(self, channels: int, why: str = "") -> int:
        self.parent.append(len(self.parent))
        self.sets.append(ChannelSet(channels, prunable=not why, why=why))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            sa, sb = self.sets[a], self.sets[b]
            sa.members += sb.members
            if not sb.prunable:
                self.freeze(a, sb.why)
        return a

    def freeze(self, i: int, why: str) -> None:
        s = self.sets[self.find(i)]
        if s.prunable:
            s.prunable, s.why = False, why

    def add(self, i: int, name: str, role: str) -> None:
        self.sets[self.find(i)].members.append((name, role))

    def roots(self) -> list[ChannelSet]:
        return [self.sets[i] for i in range(len(self.parent)) if self.find(i) == i]


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if _shape(a) is not None else None)
    return found


def _flattens_one_per_channel(node: fx.Node, shape: tuple[int, ...] | None, module: nn.Module | None) -> bool:
    """``flatten(x, 1)`` of an (N, C, 1, 1) tensor: channel c becomes feature c."""
    if shape is None or len(shape) < 2 or any(s != 1 for s in shape[2:]):
        return False
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten or node.op == "call_method" \
            and node.target == "flatten":
        return (tuple(node.args[1:2]) == (1,) or node.kwargs.get("start_dim") == 1) and len(node.args) < 3 \
            and "end_dim" not in node.kwargs
    return False


class ChannelPruning:
    """Remove the least important share of every set of coupled channels of ``model``.

    ``input_size`` is one sample's (C, H, W). ``ignore`` names modules whose output channels
    stay (their inputs may still shrink); ``round_to`` keeps channel counts multiples of it
    (8 or 16 leave powers of two for DGConv to group); ``importance`` scores each set's channels
    (a :class:`~nas_grouping.channels.importance.ChannelImportance`, default ``L1Importance()``). The
    model is traced once; ``prune`` returns a pruned copy, ``prune_to_budget`` the largest share
    within a MAC budget.
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int], *, ignore: Sequence[str] = (),
                 round_to: int = 1, importance: ChannelImportance | None = None) -> None:
        if round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {round_to}")
        self.model, self.input_size, self.round_to = model, check_input_size(input_size), round_to
        #: scores the channels of a set (the lowest go first): L1 of the producing filters unless given
        self.importance = importance if importance is not None else L1Importance()
        known = {n for n, _ in model.named_modules()}
        unknown = [n for n in ignore if n not in known]
        if unknown:
            raise ConfigError(f"ignore: no module named {unknown} in the model")
        self.ignore = {n for n in known if any(n == i or n.startswith(i + ".") or not i for i in ignore)}
        self.sets = self._trace()

    def _trace(self) -> list[ChannelSet]:
        probe = copy.deepcopy(self.model).eval()
        try:
            graph = Tracer().trace(probe)
        except Exception as exc:
            raise ConfigError(f"channel pruning traces the model with torch.fx, which failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        gm = fx.GraphModule(probe, graph)
        like = next(iter(probe.parameters()), torch.zeros(()))
        try:  # ShapeProp prints the traceback of a failing node to stderr before raising: the error says it once
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(gm).propagate(torch.zeros(1, *self.input_size, dtype=like.dtype, device=like.device))
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(f"the model does not run on an input of size {self.input_size} (C, H, W): "
                              f"{type(cause).__name__}: {cause}") from exc
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        sets, of = _Sets(), {}

        def freeze_inputs(node: fx.Node, why: str) -> None:
            for a in _tensor_args(node):
                if a in of:
                    sets.freeze(of[a], why)

        for node in graph.nodes:
            shape = _shape(node)
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            src = of.get(first) if first is not None else None
            module = self.model.get_submodule(node.target) if node.op == "call_module" else None
            label = f"{node.op} {node.target}" if module is None else f"{type(module).__name__} {node.target!r}"
            if node.op == "output":
                freeze_inputs(node, "the model's output")
                continue
            if shape is None:  # a size, a shape: reading the batch size or the rank does not tie the channels
                benign = node.op == "call_method" and (node.target == "size" and node.args[1:] == (0,)
                                                       or node.target == "dim")
                if not benign:
                    freeze_inputs(node, f"read by {label}")
                continue
            channels = shape[1] if len(shape) >= 2 else 0
            if node.op == "placeholder" or node.op == "get_attr":
                of[node] = sets.new(channels, "the model's input" if node.op == "placeholder" else "a tensor attribute")
                continue
            out, why = None, ""
            if src is not None and module is not None and calls[node.target] == 1:
                name = node.target
                if type(module) is nn.Conv2d and module.groups == 1 or type(module) is nn.Linear and len(shape) == 2:
                    sets.add(src, name, "in")
                    out = sets.new(channels)
                    sets.add(out, name, "out")
                elif type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels:
                    out = src
                    sets.add(out, name, "through")
                elif type(module) in NORMS and len(shape) in (2, 4):
                    out = src
                    sets.add(out, name, "through")
                if out is not None and name in self.ignore:
                    sets.freeze(out, f"ignored ({name})")
            if out is None and src is not None and len(_tensor_args(node)) == 1:
                stateless = module is not None and next(iter(module.parameters()), None) is None \
                    and next(iter(module.buffers()), None) is None
                if (isinstance(module, PER_CHANNEL_MODULES) and stateless
                        or node.op == "call_function" and node.target in PER_CHANNEL_FUNCTIONS
                        or node.op == "call_method" and node.target in PER_CHANNEL_METHODS
                        or _flattens_one_per_channel(node, _shape(first), module)):
                    out = src
            if out is None and (node.op == "call_function" and node.target in _ELEMENTWISE
                                or node.op == "call_method" and node.target in _ELEMENTWISE_METHODS):
                args = _tensor_args(node)
                shapes = {(len(_shape(a)), _shape(a)[1] if len(_shape(a)) > 1 else 0) for a in args}
                if args and all(a in of for a in args) and len(shapes) == 1 and shapes == {(len(shape), channels)}:
                    out = of[args[0]]
                    for a in args[1:]:
                        out = sets.union(out, of[a])
            if out is None:
                why = f"read by {label}"
                freeze_inputs(node, why)
                out = sets.new(channels, why)
            of[node] = out
        # a layer whose tensors are also read directly (a tied weight) has readers the rules above do not see
        read = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
        for s in sets.roots():
            if any(name in read for name, _ in s.members):
                s.prunable, s.why = False, s.why or "a layer's tensors are read directly"
        return [s for s in sets.roots() if s.members]

    def prunable(self) -> list[ChannelSet]:
        """The channel sets that can shrink: not frozen, with at least one producing layer."""
        return [s for s in self.sets if s.prunable and any(r == "out" for _, r in s.members)]

    def _importance(self, s: ChannelSet) -> torch.Tensor:
        """Per channel of ``s``: its score by ``self.importance`` (default: L1 of the producing filters)."""
        return self.importance(self.model, s)

    def _keep(self, channels: int, ratio: float) -> int:
        keep = max(1, math.ceil(channels * (1 - ratio)))
        return min(channels, math.ceil(keep / self.round_to) * self.round_to)

    def prune(self, ratio: float) -> nn.Module:
        """A copy of the model with ``ratio`` of every prunable channel set removed (lowest L1 first)."""
        if not 0 <= ratio < 1:
            raise ConfigError(f"ratio must be in [0, 1), got {ratio}")
        if ratio > 0 and not self.prunable():
            raise ConfigError(f"no channel of this {type(self.model).__name__} can be pruned (every set of coupled "
                              "channels is seen by the model's input or output, a reshape, a concatenation or an "
                              "operation the pass does not know, as in attention blocks); it would come back unchanged")
        model = copy.deepcopy(self.model)
        for s in self.prunable():
            keep = self._keep(s.channels, ratio)
            if keep == s.channels:
                continue
            index = self._importance(s).topk(keep).indices.sort().values
            for name, role in s.members:
                _shrink(model.get_submodule(name), role, index)
        return model

    def prune_to_budget(self, budget_macs: int, *, max_ratio: float = 0.9, steps: int = 12
                        ) -> tuple[nn.Module, float]:
        """The smallest uniform ratio (bisection, ``steps``) whose model has at most ``budget_macs`` MACs."""
        if count_macs(self.model, self.input_size) <= budget_macs:
            return copy.deepcopy(self.model), 0.0
        if not self.prunable():
            raise BudgetError("no channel of this model can be pruned (every set is seen by its input, its output "
                              "or a layer the pass does not know); the MAC budget cannot be met by channel pruning")
        least = count_macs(self.prune(max_ratio), self.input_size)
        if least > budget_macs:
            raise BudgetError(f"channel pruning reaches {least:,} MACs at ratio {max_ratio} (the channels that "
                              f"must stay keep the rest); the budget of {budget_macs:,} MACs cannot be met")
        ratio = least_ratio(lambda r: count_macs(self.prune(r), self.input_size) <= budget_macs, max_ratio, steps)
        return self.prune(ratio), ratio

    def prune_to_latency(self, budget_ms: float, measure: Callable[[nn.Module], float], *,
                         budget_macs: int | None = None, max_ratio: float = 0.9, tries: int = 4,
                         tolerance: float = 0.05) -> tuple[nn.Module, float, dict[str, Any]]:
        """The least pruned model whose *measured* latency (``measure``: model -> ms) meets ``budget_ms``,
        within ``budget_macs`` too; else the fastest tried (up to ``max_ratio``).

        Starts from the ratio the MAC budget needs (0 without one) and moves it by the secant
        method on measurements (``latency.meet_measured_budget``, with MACs as the predictor).
        Returns the model, its ratio and a report with every try.
        """
        from nas_grouping.latency.measure import meet_measured_budget

        dense_macs = count_macs(self.model, self.input_size)
        start, low = self.prune_to_budget(budget_macs, max_ratio=max_ratio) if budget_macs is not None \
            else (copy.deepcopy(self.model), 0.0)
        start_ms = measure(start)
        unit = start_ms / max(count_macs(start, self.input_size), 1)  # ms per MAC at the start: the prediction
        fastest_macs = count_macs(self.prune(max_ratio), self.input_size)

        def attempt(target: float | None) -> dict[str, Any]:
            macs = budget_macs if target is None else int(target / unit)
            if target is not None and macs < fastest_macs:
                model, ratio, stuck = self.prune(max_ratio), max_ratio, True
            elif budget_macs is not None and macs >= budget_macs or macs >= dense_macs:
                model, ratio, stuck = copy.deepcopy(start), low, False
            else:
                model, ratio = self.prune_to_budget(macs, max_ratio=max_ratio)
                stuck = False
            made = count_macs(model, self.input_size)
            return {"ratio": ratio, "macs": made, "measured_ms": measure(model), "stuck": stuck,
                    "_reached": made * unit, "_model": model}

        if start_ms <= budget_ms:
            return start, low, {"met": True, "measured_ms": start_ms, "ratio": low, "tries": []}
        best, tried = meet_measured_budget(attempt, budget_ms, table_dense_ms=start_ms, reference_ms=start_ms,
                                           floor=0.0, tries=tries, tolerance=tolerance)
        report = {"met": best["met"], "measured_ms": best["measured_ms"], "ratio": best["ratio"],
                  "start_ms": start_ms, "tries": tried}
        if not best["met"] and best["measured_ms"] >= start_ms:  # pruning more never helped: the start is fastest
            return start, low, {**report, "measured_ms": start_ms, "ratio": low}
        return best["_model"], best["ratio"], report


def least_ratio(fits: Callable[[float], bool], max_ratio: float, steps: int) -> float:
    """The least pruning ratio in (0, ``max_ratio``] for which ``fits`` holds (``fits(max_ratio)`` must),
    by ``steps`` bisections: pruning grows with the ratio, so its cost falls."""
    lo, hi = 0.0, max_ratio
    for _ in range(steps):
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _shrink(m: nn.Module, role: str, index: torch.Tensor) -> None:
    """Keep only the channels ``index`` of module ``m`` in its ``role`` (out, in, through)."""
    def take(name: str, dim: int) -> None:
        t = getattr(m, name, None)
        if t is None:
            return
        kept = t.data.index_select(dim, index.to(t.device)).clone()
        if isinstance(t, nn.Parameter):
            setattr(m, name, nn.Parameter(kept, requires_grad=t.requires_grad))
        else:
            setattr(m, name, kept)

    k = len(index)
    if isinstance(m, NORMS):
        for name in ("weight", "bias", "running_mean", "running_var"):
            take(name, 0)
        m.num_features = k
    elif isinstance(m, nn.Conv2d) and role == "through":
        take("weight", 0)
        take("bias", 0)
        m.in_channels = m.out_channels = m.groups = k
    elif role == "out":
        take("weight", 0)
        take("bias", 0)
        setattr(m, "out_channels" if isinstance(m, nn.Conv2d) else "out_features", k)
    else:
        take("weight", 1)
        setattr(m, "in_channels" if isinstance(m, nn.Conv2d) else "in_features", k)


def prune_channels(model: nn.Module, input_size: Sequence[int], *, ratio: float | None = None,
                   budget_macs: int | None = None, ignore: Sequence[str] = (), round_to: int = 1,
                   importance: ChannelImportance | None = None) -> nn.Module:
    """``model`` with whole channels removed: ``ratio`` of every coupled set, or the largest ratio
    within ``budget_macs`` (exactly one of the two). See ``ChannelPruning``."""
    if (ratio is None) == (budget_macs is None):
        raise ConfigError("prune_channels: give exactly one of ratio and budget_macs")
    pruning = ChannelPruning(model, input_size, ignore=ignore, round_to=round_to, importance=importance)
    return pruning.prune(ratio) if ratio is not None else pruning.prune_to_budget(budget_macs)[0]
