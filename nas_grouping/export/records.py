"""What a saved model needs beyond its base network, derived from the modules themselves at save time.

A pass (export, folding, self-grouping, channel pruning, the choice of forms) only changes
modules; nothing keeps a ledger beside them. ``architecture_records`` rebuilds the base
network from the model's recipe and compares module by module: a layer of a registered
exportable type that differs from the base (another class, or a ``nn.Conv2d`` with other
channels or groups) is recorded by its ``to_config``; a norm or linear layer whose widths
differ is recorded by its widths. Without a rebuildable base every such layer is recorded,
which loads the same model at the price of a longer file.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from nas_grouping.errors import ExportError
from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear
from nas_grouping.ops.group_conv import PermutedGroupConv2d, conv_config, conv_from_config

__all__ = ["register_exportable", "architecture_records", "records_of", "base_model", "widths_of", "set_widths", "exportable",
           "RECIPE_ATTR", "LAYOUT_ATTR", "NORMS"]

#: how to build the base network: ``{"space": name, "kwargs": {...}}`` or ``{"kwargs": {...}}`` for a builder
RECIPE_ATTR = "nas_grouping_recipe"
#: the memory layout chosen for the model (nchw or channels_last)
LAYOUT_ATTR = "nas_grouping_layout"
#: per-channel normalisation layers whose widths channel pruning changes
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

_EXPORTABLE: dict[str, tuple[type, Callable[[nn.Module], dict], Callable[[dict], nn.Module]]] = {}


def register_exportable(cls: type, to_config: Callable[[nn.Module], dict] | None = None,
                        from_config: Callable[[dict], nn.Module] | None = None) -> type:
    """Let ``save_model``/``load_model`` record and rebuild layers of ``cls`` by name."""
    name = cls.__name__
    if name in _EXPORTABLE and _EXPORTABLE[name][0] is not cls:
        raise ExportError(f"an exportable layer named {name!r} is registered already")
    _EXPORTABLE[name] = (cls, to_config or (lambda m: m.to_config()), from_config or cls.from_config)
    return cls


register_exportable(nn.Conv2d, conv_config, conv_from_config)
register_exportable(PermutedGroupConv2d)
register_exportable(DiverseGroupConv2d)
register_exportable(DiverseGroupLinear)


def exportable(type_name: str) -> tuple[type, Callable[[nn.Module], dict], Callable[[dict], nn.Module]] | None:
    """``(class, to_config, from_config)`` of a registered layer type, or None."""
    return _EXPORTABLE.get(type_name)


def _registered(m: nn.Module) -> bool:
    entry = _EXPORTABLE.get(type(m).__name__)
    return entry is not None and entry[0] is type(m)


def widths_of(m: nn.Module) -> list[int]:
    """The widths that channel pruning changes: [features] of a norm, [in, out, groups] of a conv, [in, out]."""
    if isinstance(m, NORMS):
        return [m.num_features]
    if isinstance(m, nn.Conv2d):
        return [m.in_channels, m.out_channels, m.groups]
    return [m.in_features, m.out_features]


def base_model(recipe: Any, builder: Callable[..., nn.Module] | None = None) -> nn.Module | None:
    """The base network that a recipe builds (with ``builder``, or as a registered space), or None.

    A builder that does not take the recipe's kwargs raises its TypeError."""
    if not isinstance(recipe, dict):
        return None
    kwargs = dict(recipe.get("kwargs", {}))
    if builder is not None:
        return builder(**kwargs)
    if "space" in recipe:
        from search_spaces import get_space

        return get_space(recipe["space"], **{**kwargs, "dense": True})
    return None


def architecture_records(model: nn.Module, base: nn.Module | None = None
                         ) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """``(layers, widths)`` that turn the base network into ``model``: ``{name: {"type", "config"}}`` for the
    replaced layers and ``{name: widths}`` for the narrowed norm and linear layers.

    Raises:
        ExportError: a layer differs from the base and is of no registered exportable type.
    """
    base_modules = dict(base.named_modules()) if base is not None else None
    layers: dict[str, dict[str, Any]] = {}
    widths: dict[str, list[int]] = {}
    recorded: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(r + ".") for r in recorded):
            continue
        b = base_modules.get(name) if base_modules is not None else None
        if _registered(m):
            same = (b is not None and type(b) is nn.Conv2d and type(m) is nn.Conv2d
                    and conv_config(b) == conv_config(m))
            if not same:
                cls, to_config, _ = _EXPORTABLE[type(m).__name__]
                layers[name] = {"type": cls.__name__, "config": to_config(m)}
                recorded.append(name)
        elif isinstance(m, NORMS) or type(m) is nn.Linear:
            if b is None or type(b) is not type(m) or widths_of(b) != widths_of(m):
                widths[name] = widths_of(m)
        elif base_modules is not None and (b is None or type(b) is not type(m)):
            raise ExportError(f"{type(m).__name__} at {name!r} replaces the base network's "
                              f"{type(b).__name__ if b is not None else 'nothing'} and is not a registered exportable "
                              "layer (register_exportable)")
    return layers, widths


def set_widths(model: nn.Module, widths: dict[str, list[int]]) -> nn.Module:
    """Give the layers named in ``widths`` those widths, with uninitialised tensors of the new shapes: how
    ``load_model`` rebuilds a pruned network before loading its weights. Raises ``ExportError`` for a name or a
    record that does not fit."""
    for name, w in widths.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"the rebuilt base network has no layer {name!r} to resize; wrong builder?") from None
        fits = isinstance(m, NORMS) and len(w) == 1 or type(m) is nn.Conv2d and len(w) == 3 \
            or type(m) is nn.Linear and len(w) == 2
        if not fits:
            raise ExportError(f"layer {name!r} ({type(m).__name__}) cannot take the recorded widths {w}")
        if isinstance(m, NORMS):
            m.num_features = w[0]
            shapes = {"weight": (w[0],), "bias": (w[0],), "running_mean": (w[0],), "running_var": (w[0],)}
        elif isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = w
            shapes = {"weight": (w[1], w[0] // w[2], *m.kernel_size), "bias": (w[1],)}
        else:
            m.in_features, m.out_features = w
            shapes = {"weight": (w[1], w[0]), "bias": (w[1],)}
        for attr, shape in shapes.items():
            t = getattr(m, attr, None)
            if t is None:
                continue
            new = t.data.new_zeros(shape)
            setattr(m, attr, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                    else new)
    return model


def records_of(model: nn.Module, builder: Callable[..., nn.Module] | None = None
               ) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """``architecture_records`` against the base network of ``model``'s own recipe (what ``save_model`` writes)."""
    return architecture_records(model, base_model(getattr(model, RECIPE_ATTR, None), builder))
