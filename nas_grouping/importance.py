"""How the self-grouping pass scores connections: importance objects, and the names configs give them.

Below the passes (configs validate names against ``IMPORTANCES`` without importing a pass).

An importance scores every connection o <- i of the layers the pass prunes: one array of
shape (out channels, in channels) per layer name, larger = more important. The pass clusters
the filters by these vectors and prunes the least important connections of each cluster.

    >>> SelfGrouping(importance="taylor")                 # a registered name, as in a config
    >>> SelfGrouping(importance=MagnitudeImportance())    # or an object
    >>> @register_importance("squared")                    # a new name that configs accept
    ... class SquaredImportance(Importance): ...

Importances that read gradients (``needs_calibration``) get the calibration batches of
(inputs, targets) the pass is given: ``calibration=`` of ``apply``/``decide``, or
``calibration_batches`` training batches per step when the pass fine-tunes.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas_grouping.errors import ConfigError


class Prunable(Protocol):
    """What an importance reads of a layer the pass prunes (``self_grouping``'s layers are such)."""

    name: str

    def __init__(self, name: str, module: nn.Module) -> None: ...

    def dense_weight(self) -> torch.Tensor: ...

    def dense_grad(self) -> torch.Tensor: ...

    def parameters(self) -> Iterable[nn.Parameter]: ...

__all__ = ["Importance", "MagnitudeImportance", "TaylorImportance", "IMPORTANCES", "register_importance",
           "make_importance", "magnitude_importance", "taylor_importance"]


class Importance:
    """Scores of the connections of ``layers`` (modules of ``model``): {layer name: array (out, in)}.

    Subclasses implement :meth:`__call__`; one with ``needs_calibration = True`` is given the
    calibration batches (an iterable of (inputs, targets)) and must leave ``model`` unchanged.
    """

    #: the name a config gives it (set by :func:`register_importance`)
    name: str = ""
    #: whether it needs calibration batches of (inputs, targets)
    needs_calibration: bool = False

    def __call__(self, model: nn.Module, layers: list[Prunable],
                 calibration: Iterable | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Importances by the name a config gives (``SelfGroupingConfig.importance``): name -> class built with no argument.
IMPORTANCES: dict[str, type[Importance]] = {}


def register_importance(name: str) -> Callable[[type[Importance]], type[Importance]]:
    """Class decorator: make ``name`` an importance that ``SelfGroupingConfig.importance`` accepts."""
    def register(cls: type[Importance]) -> type[Importance]:
        cls.name = name
        IMPORTANCES[name] = cls
        return cls
    return register


def make_importance(spec: str | Importance) -> Importance:
    """The importance ``spec`` names (a registered name), or ``spec`` itself when it is an Importance object."""
    if isinstance(spec, Importance):
        return spec
    if isinstance(spec, str) and spec in IMPORTANCES:
        return IMPORTANCES[spec]()
    raise ConfigError(f"importance must be one of {', '.join(IMPORTANCES)} or an Importance object, got {spec!r}")


@register_importance("magnitude")
class MagnitudeImportance(Importance):
    """|W[o, i]|_1 over the kernel (the paper's code); needs no data."""

    def __call__(self, model: nn.Module, layers: list[Prunable],
                 calibration: Iterable | None = None) -> dict[str, np.ndarray]:
        return {layer.name: magnitude_importance(layer) for layer in layers}


@register_importance("taylor")
class TaylorImportance(Importance):
    """mean over calibration batches of |sum over the kernel of W dL/dW| (first-order loss change)."""

    needs_calibration = True

    def __call__(self, model: nn.Module, layers: list[Prunable],
                 calibration: Iterable | None = None) -> dict[str, np.ndarray]:
        if calibration is None:
            raise ConfigError("importance='taylor' needs calibration batches of (inputs, targets); pass "
                              "calibration= (or data= to self_group), or use importance='magnitude'")
        work = copy.deepcopy(model)  # gradients and eval mode on a copy: the model stays as it is
        work_layers = [type(layer)(layer.name, work.get_submodule(layer.name) if layer.name else work)
                       for layer in layers]
        return taylor_importance(work, work_layers, calibration)


def magnitude_importance(layer: Prunable) -> np.ndarray:
    """|W[o, i]|_1 over the kernel of the dense equivalent (0 where M is 0): the paper's code."""
    w = layer.dense_weight().float()
    return w.abs().reshape(w.shape[0], w.shape[1], -1).sum(-1).double().cpu().numpy()


def taylor_importance(model: nn.Module, layers: list[Prunable], batches: Iterable) -> dict[str, np.ndarray]:
    """First-order estimate of the loss change from removing each connection, over calibration batches.

    For connection o <- i and batch b: t_b = sum over the kernel of W * dL_b/dW (the first-order
    change of the loss when the connection is zeroed); the importance is mean_b |t_b|. The model
    runs in eval mode (BN statistics and dropout as deployed) and is left unchanged.
    """
    ref = next(model.parameters())
    flags = {m: m.training for m in model.modules()}
    requires = {p: p.requires_grad for p in model.parameters()}
    totals = {layer.name: None for layer in layers}
    count = 0
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            for p in layer.parameters():
                p.requires_grad_(True)
                p.grad = None
        for x, y in batches:
            x = x.to(ref.device)
            y = torch.as_tensor(y).to(ref.device).long()
            with torch.enable_grad():
                loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
            for layer in layers:
                w, g = layer.dense_weight().float(), layer.dense_grad().float()
                t = (w * g).reshape(w.shape[0], w.shape[1], -1).sum(-1).abs()
                totals[layer.name] = t if totals[layer.name] is None else totals[layer.name] + t
                for p in layer.parameters():
                    p.grad = None
            count += 1
    finally:
        for m, t in flags.items():
            m.training = t
        for p, r in requires.items():
            p.requires_grad_(r)
            p.grad = None
    if count == 0:
        raise ConfigError("taylor importance: the calibration data gave no batch")
    return {name: (t / count).double().cpu().numpy() for name, t in totals.items()}


