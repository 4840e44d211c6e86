"""Fold the channel permutations of exported group convs into their neighbours.

A ``PermutedGroupConv2d`` gathers its input channels into group order and its
output channels back; on a CPU those two copies can cost as much as the MACs
grouping saved. Where the channels reach the layer from a dense convolution
through per-channel layers only (BatchNorm, activations), the input order can be
produced there instead: the producer's output rows (and the BatchNorm's
statistics) are permuted once, at export, and the gather goes. Likewise the output
order can be absorbed by a dense consumer's input columns (a conv, or a linear
layer after a flatten that leaves one value per channel). Between two permuted group convs the two gathers
become one. Residual additions, concatenations and layers used twice stop a fold:
there the order is seen by more than one reader. Outputs are unchanged.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, fx, nn

from nas_grouping.graph.tracing import PER_CHANNEL_FUNCTIONS, PER_CHANNEL_METHODS, PER_CHANNEL_MODULES, Tracer
from nas_grouping.ops.group_conv import PermutedGroupConv2d

__all__ = ["fold_permutations", "count_gathers", "FoldWarning"]


class FoldWarning(UserWarning):
    """Permutations were left in place (the model could not be traced)."""


def count_gathers(model: nn.Module) -> int:
    """Channel gathers the model's permuted group convs run (layers in the dense form run none)."""
    return sum((m.in_index is not None) + (m.out_index is not None)
               for m in model.modules() if isinstance(m, PermutedGroupConv2d) and m.form == "grouped")


class _Graph:
    """The traced model's data flow, with how often each module is called."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graph = Tracer().trace(model)
        self.calls: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module" or self.calls.get(node.target) != 1:
            return None  # not a module, or one called twice (its channels have two readers)
        return self.model.get_submodule(node.target)

    def per_channel(self, node: fx.Node) -> bool:
        """Whether ``node`` maps each channel on its own (and has one tensor input)."""
        if node.op == "call_module":
            m = self.model.get_submodule(node.target)
            stateless = next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None
            # a module called twice serves two channel orders, unless it holds nothing per channel (an activation)
            return isinstance(m, PER_CHANNEL_MODULES) and (stateless or self.calls[node.target] == 1)
        if node.op == "call_function":
            return node.target in PER_CHANNEL_FUNCTIONS
        if node.op == "call_method":
            return node.target in PER_CHANNEL_METHODS
        return False

    @staticmethod
    def input_of(node: fx.Node) -> fx.Node | None:
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None

    def upstream(self, node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
        """The layer that makes ``node``'s input, through single-reader per-channel nodes (listed)."""
        chain, current = [], self.input_of(node)
        while current is not None and len(current.users) == 1 and self.per_channel(current):
            chain.append(current)
            current = self.input_of(current)
        if current is None or len(current.users) != 1:
            return None, chain
        return current, chain

    def downstream(self, node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
        """The layer that reads ``node``'s output, through single-reader per-channel nodes (listed);
        a flatten leads on to a linear layer (which takes the fold only when it reads one value per channel)."""
        chain, current = [], node
        while len(current.users) == 1:
            nxt = next(iter(current.users))
            if self.input_of(nxt) is not current:
                return None, chain
            if self.per_channel(nxt) or self.flattens(nxt):
                chain.append(nxt)
                current = nxt
                continue
            return nxt, chain
        return None, chain

    def flattens(self, node: fx.Node) -> bool:
        """``flatten(x, 1)``: with one value per channel left, channel c becomes feature c."""
        if node.op == "call_function" and node.target is torch.flatten:
            return (tuple(node.args[1:2]) == (1,) or node.kwargs.get("start_dim") == 1) and len(node.args) < 3 \
                and "end_dim" not in node.kwargs
        m = self.module(node) if node.op == "call_module" else None
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1

    def permute_chain(self, chain: list[fx.Node], index: Tensor) -> None:
        """Reorder the per-channel parameters of ``chain`` (BatchNorm) by ``index``."""
        for node in chain:
            m = self.module(node) if node.op == "call_module" else None
            if isinstance(m, nn.BatchNorm2d):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(m, name)
                    if t is not None:
                        t.data = t.data[index.to(t.device)].clone()


def _dense_conv(m: nn.Module | None) -> bool:
    return type(m) is nn.Conv2d and m.groups == 1


def _fold_into_producer(g: _Graph, node: fx.Node, layer: PermutedGroupConv2d) -> bool:
    producer, chain = g.upstream(node)
    m = g.module(producer) if producer is not None else None
    index = layer.in_index
    if _dense_conv(m) and m.out_channels == index.numel():
        m.weight.data = m.weight.data[index].clone()
        if m.bias is not None:
            m.bias.data = m.bias.data[index].clone()
    elif isinstance(m, PermutedGroupConv2d) and m is not layer:
        m.set_permutations(out_index=index if m.out_index is None else m.out_index[index])
    else:
        return False
    g.permute_chain(chain, index)
    layer.set_permutations(in_index=None)
    return True


def _fold_into_consumer(g: _Graph, node: fx.Node, layer: PermutedGroupConv2d) -> bool:
    consumer, chain = g.downstream(node)
    m = g.module(consumer) if consumer is not None else None
    perm = torch.tensor(layer.out_perm, device=layer.out_index.device)  # grouped-conv channel c is original perm[c]
    flat = any(g.flattens(n) for n in chain)
    if ((_dense_conv(m) and not flat) or (type(m) is nn.Linear and flat)) and m.weight.shape[1] == perm.numel():
        m.weight.data = m.weight.data[:, perm].clone()
    else:
        return False
    g.permute_chain(chain, perm)
    layer.set_permutations(out_index=None)
    return True


def fold_permutations(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with the channel gathers of its ``PermutedGroupConv2d`` layers folded into
    neighbouring dense layers wherever that is exact (see the module's doc); outputs unchanged.

    Input orders are folded first (into a dense producer, or composed with a permuted
    producer's output order, leaving one gather where there were two), then output orders
    into dense consumers. A model torch.fx cannot trace is returned unchanged, with a
    ``FoldWarning`` saying why. BatchNorm is per channel in training and eval mode alike.
    """
    target = model if inplace else copy.deepcopy(model)
    if not any(isinstance(m, PermutedGroupConv2d) for m in target.modules()):
        return target
    try:
        g = _Graph(target)
    except Exception as exc:  # fx raises many kinds on dynamic control flow
        warnings.warn(f"fold_permutations: the model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                      "its channel gathers stay in place (outputs are still exact)", FoldWarning, stacklevel=2)
        return target
    layers = [(node, g.module(node)) for node in g.graph.nodes if isinstance(g.module(node), PermutedGroupConv2d)]
    with torch.no_grad():
        for node, layer in layers:
            if layer.in_index is not None:
                _fold_into_producer(g, node, layer)
        for node, layer in layers:
            if layer.out_index is not None:
                _fold_into_consumer(g, node, layer)
    return target
