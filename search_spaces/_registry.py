"""A registry of search spaces by name, in the manner of ``torchvision.models.get_model``."""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, TypeVar

from torch import nn

from nas_grouping.errors import ConfigError

__all__ = ["register_space", "get_space", "get_space_builder", "list_spaces", "default_input_size"]

BuilderFn = TypeVar("BuilderFn", bound=Callable[..., nn.Module])

_SPACES: dict[str, Callable[..., nn.Module]] = {}
_INPUT_SIZES: dict[str, tuple[int, int, int]] = {}


def register_space(
    name: str, *, input_size: tuple[int, int, int] | None = None
) -> Callable[[BuilderFn], BuilderFn]:
    """Register a builder under ``name``, with the (C, H, W) input it is designed for.

    Raises:
        ConfigError: when ``name`` is already registered.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a search space name must be a non-empty string, got {name!r}")
    if input_size is not None:
        if len(input_size) != 3 or any(not isinstance(s, int) or s < 1 for s in input_size):
            raise ConfigError(f"input_size of space '{name}' must be (C, H, W) positive ints, got {input_size!r}")

    def wrapper(fn: BuilderFn) -> BuilderFn:
        if name in _SPACES:
            raise ConfigError(f"a search space named '{name}' is already registered ({_SPACES[name].__qualname__})")
        _SPACES[name] = fn
        if input_size is not None:
            _INPUT_SIZES[name] = tuple(input_size)
        return fn

    return wrapper


def list_spaces() -> list[str]:
    """The registered search space names, sorted."""
    return sorted(_SPACES)


def get_space_builder(name: str) -> Callable[..., nn.Module]:
    """The builder function registered under ``name``."""
    try:
        return _SPACES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown search space {name!r}; known spaces: {', '.join(list_spaces())}") from None


def default_input_size(name: str) -> tuple[int, int, int]:
    """The (C, H, W) input size that space ``name`` is designed for (with its default ``in_channels``)."""
    get_space_builder(name)
    if name not in _INPUT_SIZES:
        raise ConfigError(f"search space '{name}' was registered without an input_size")
    return _INPUT_SIZES[name]


def get_space(name: str, /, **kwargs: Any) -> nn.Module:
    """Build the search space ``name`` with the builder's keyword arguments.

    ``dense=True`` builds the dense baseline (``conv_layer=nn.Conv2d``); the
    searchable conv itself cannot be passed, so that the arguments stay
    JSON-serialisable. The model gets a plain attribute
    ``nas_grouping_recipe = {"space": name, "kwargs": {..., "dense": dense}}``;
    ``get_space(recipe["space"], **recipe["kwargs"])`` rebuilds it, e.g. to load
    saved weights.

    Raises:
        ConfigError: for an unknown name, a ``conv_layer`` argument, arguments
            the builder does not take, or arguments JSON cannot hold.
    """
    builder = get_space_builder(name)
    if "conv_layer" in kwargs:
        raise ConfigError(
            f"get_space('{name}'): conv_layer cannot be recorded in the recipe; pass dense=True for "
            "nn.Conv2d (the default is the searchable DGConv2d), or call the builder directly"
        )
    dense = kwargs.pop("dense", False)
    if not isinstance(dense, bool):
        raise ConfigError(f"get_space('{name}'): dense must be True or False, got {dense!r}")
    params = inspect.signature(builder).parameters
    if dense and "conv_layer" not in params:
        raise ConfigError(f"get_space('{name}'): dense=True needs a builder with a conv_layer argument")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [
            n for n, p in params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and n != "conv_layer"
        ]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ConfigError(
                f"get_space('{name}'): unexpected argument(s) {', '.join(unknown)}; "
                f"it takes {', '.join(accepted + ['dense'])}"
            )
    try:
        recorded = json.loads(json.dumps(kwargs, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"get_space('{name}'): the arguments must be JSON-serialisable to be recorded in the recipe: {exc}"
        ) from None
    model = builder(**recorded, conv_layer=nn.Conv2d) if dense else builder(**recorded)
    model.nas_grouping_recipe = {"space": name, "kwargs": {**recorded, "dense": dense}}
    return model
