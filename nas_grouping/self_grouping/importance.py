"""How the self-grouping pass scores connections: importance objects, and the names configs give them.

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
from typing import Callable, Iterable

import numpy as np
from torch import nn

from nas_grouping.errors import ConfigError
from nas_grouping.self_grouping._cluster import magnitude_importance, taylor_importance
from nas_grouping.self_grouping._layers import Prunable

__all__ = ["Importance", "MagnitudeImportance", "TaylorImportance", "IMPORTANCES", "register_importance",
           "make_importance"]


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
        work_layers = [Prunable(layer.name, work.get_submodule(layer.name) if layer.name else work)
                       for layer in layers]
        return taylor_importance(work, work_layers, calibration)
