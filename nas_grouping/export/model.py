"""Export searched models to real group convolutions, and save / load them as data.

``export_model`` turns every DGConv2d into the layer its binary gates imply: a
plain ``nn.Conv2d(groups=G)`` when the groups are already contiguous, else a
``PermutedGroupConv2d``, whose channel gathers are then folded into neighbouring
dense layers where that is exact (``fold.py``). The exported model computes what
the masked model computed, at its effective MACs.

``save_model`` writes a folder with ``weights.pt`` (a state dict of tensors, read
with ``torch.load(weights_only=True)``) and ``architecture.json`` (how to build
the base network, the widths of channel-pruned layers, and every replaced layer's
type and configuration). Loading never unpickles code: it rebuilds the base network
from a registered search space or a builder the caller passes, narrows the pruned
layers, swaps in the recorded layers, and loads the tensors.
"""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from nas_grouping.convert import dgconv_layers, set_submodule
from nas_grouping.errors import ConfigError, ExportError, is_out_of_memory
from nas_grouping.export.records import (LAYOUT_ATTR, RECIPE_ATTR, architecture_records, base_model, exportable,
                                         register_exportable, set_widths)
from nas_grouping.files import atomic_write
from nas_grouping.macs import check_input_size
from nas_grouping.ops.dgconv import DGConv2d
from nas_grouping.ops.group_conv import PermutedGroupConv2d, conv_config, conv_from_config

__all__ = [
    "group_permutation", "export_layer", "export_model", "register_exportable", "save_model", "load_model",
    "FORMAT_VERSION",
]

FORMAT_VERSION = "nas-grouping/1"


def _group_ids(num_channels: int, r: int, off_bits: list[int], k: int) -> torch.Tensor:
    """Group id of each channel: the values of its off-gate bits, packed in gate order."""
    b = torch.arange(num_channels) // r
    gid = torch.zeros(num_channels, dtype=torch.long)
    for j in off_bits:
        gid = gid * 2 + ((b >> (k - 1 - j)) & 1)
    return gid


def group_permutation(layer: DGConv2d) -> tuple[list[int], list[int], int]:
    """(in_perm, out_perm, G) that make the layer's relationship matrix block-diagonal."""
    if not layer.gates_are_binary():
        raise ExportError(
            f"{layer._where()} has soft (relaxed) gates; call harden_gates() and fine-tune before exporting"
        )
    gates = layer.gate_values()
    off = [j for j in range(layer.num_gates) if gates[j] == 0]
    k = layer.num_gates
    gin = _group_ids(layer.in_channels, layer.r_in, off, k)
    gout = _group_ids(layer.out_channels, layer.r_out, off, k)
    in_perm = torch.argsort(gin, stable=True).tolist()
    out_perm = torch.argsort(gout, stable=True).tolist()
    return in_perm, out_perm, 2 ** len(off)


def export_layer(layer: DGConv2d) -> nn.Module:
    """The real group convolution a DGConv2d's current binary gates imply (weights copied)."""
    in_perm, out_perm, g = group_permutation(layer)
    w = layer.weight.detach()
    ci, co = layer.in_channels // g, layer.out_channels // g
    ip, op = torch.tensor(in_perm, device=w.device), torch.tensor(out_perm, device=w.device)
    blocks = [w[op[q * co:(q + 1) * co]][:, ip[q * ci:(q + 1) * ci]] for q in range(g)]
    kwargs = conv_config(layer)
    kwargs["groups"] = g
    identity = in_perm == sorted(in_perm) and out_perm == sorted(out_perm)
    new: nn.Module = conv_from_config(kwargs) if identity else PermutedGroupConv2d(
        kwargs, in_perm=in_perm, out_perm=out_perm)
    new.to(device=w.device, dtype=w.dtype)
    conv = new if identity else new.conv
    with torch.no_grad():
        conv.weight.copy_(torch.cat(blocks, dim=0))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias.detach()[op] if not identity else layer.bias.detach())
    return new


def replace_layer(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` at ``name`` (``save_model`` finds it by comparing with the base network)."""
    set_submodule(model, name, layer)


def export_model(model: nn.Module, *, inplace: bool = False, fold: bool = True) -> nn.Module:
    """Replace every DGConv2d of ``model`` by the real group convolution its gates imply.

    With ``fold`` (default) the channel gathers of permuted groups are then folded into
    neighbouring dense layers wherever that is exact (``fold.fold_permutations``).

    Raises:
        ExportError: a DGConv2d has soft gates (names the layer).
    """
    layers = dgconv_layers(model)
    for name, layer in layers:
        if not layer.gates_are_binary():
            raise ExportError(
                f"DGConv2d '{name}' has soft (relaxed) gates; call harden_gates() on it "
                "(and fine-tune with binary gates) before exporting"
            )
    if isinstance(model, DGConv2d):
        return export_layer(model)
    target = model if inplace else copy.deepcopy(model)
    for name, layer in dgconv_layers(target):
        replace_layer(target, name, export_layer(layer))
    if fold:
        from nas_grouping.graph.fold import fold_permutations

        fold_permutations(target, inplace=True)
    return target


# ---------------------------------------------------------------- save / load

def save_model(model: nn.Module, path: str | os.PathLike, *, recipe: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None, builder: Callable[..., nn.Module] | None = None) -> Path:
    """Save ``model`` as ``path/weights.pt`` + ``path/architecture.json``; returns the folder.

    The architecture records every layer that differs from the base network the recipe
    builds (``builder``, as given to ``load_model``, for a recipe that names no space);
    without a base to compare with, every conv, norm and linear layer is recorded.

    Args:
        recipe: how to build the base network: ``{"space": name, "kwargs": {...}}`` for a
            registered search space (``search_spaces.get_space``), or any JSON dict
            that the ``builder`` given to ``load_model`` accepts as ``kwargs``. Defaults
            to the recipe recorded on models built by ``get_space``.
        extra: JSON-serialisable facts to keep beside the architecture (MACs, accuracy...).
        builder: builds the base network from the recipe's kwargs (as ``load_model``'s).
    """
    if any(isinstance(m, DGConv2d) for m in model.modules()):
        raise ExportError("save_model stores exported models: call export_model(model) first")
    recipe = recipe if recipe is not None else getattr(model, RECIPE_ATTR, None)
    if recipe is None:
        raise ExportError(
            "the model carries no recipe (it was not built by search_spaces.get_space): pass "
            "recipe={'kwargs': {...}} and give load_model the builder, e.g. load_model(path, builder=MyNet)"
        )
    base = _build_base(recipe, builder, where="save_model")
    layers, widths = architecture_records(model, base)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    arch = {
        "format": FORMAT_VERSION,
        "recipe": recipe,
        "layers": layers,
        "widths": widths,
        "layout": getattr(model, LAYOUT_ATTR, "nchw"),
        "torch": torch.__version__,
        "extra": extra or {},
    }
    try:
        text = json.dumps(arch, indent=1)
    except TypeError as exc:
        raise ExportError(f"recipe and extra must be JSON-serialisable: {exc}") from exc
    full = model.state_dict()
    state = OrderedDict((k, v.detach().cpu()) for k, v in full.items())
    state._metadata = getattr(full, "_metadata", None)  # type: ignore[attr-defined]  # versions some models need
    atomic_write(folder / "weights.pt", lambda f: torch.save(state, f))
    atomic_write(folder / "architecture.json", lambda f: f.write(text.encode()))
    return folder


def model_folder(path: str | os.PathLike) -> Path:
    """The saved model a path names: the folder itself, or the ``model/`` of a run folder that holds one."""
    folder = Path(path)
    return folder / "model" if (folder / "model" / "architecture.json").is_file() else folder


def saved_input_size(model: nn.Module, given: Any = None, *, folder: str | os.PathLike | None = None
                     ) -> tuple[int, ...]:
    """The sample shape to run a loaded model on: ``given``; else the one its job saved beside it
    (``folder``'s architecture.json); else its search space's own input size."""
    if given is not None:
        return check_input_size(given)
    if folder is not None:
        saved = read_architecture(folder).get("extra", {}).get("input_size")
        if saved is not None:
            return check_input_size(saved)
    recipe = getattr(model, RECIPE_ATTR, None) or {}
    if "space" not in recipe:
        raise ConfigError(f"{folder or 'the model'} records no input size and names no search space: give "
                          "--input-size C,H,W")
    from search_spaces import default_input_size

    size = default_input_size(recipe["space"])
    in_channels = recipe.get("kwargs", {}).get("in_channels")
    return (in_channels or size[0], *size[1:])


def read_architecture(path: str | os.PathLike) -> dict[str, Any]:
    """The architecture JSON of a saved model folder, validated."""
    file = Path(path) / "architecture.json"
    if not file.is_file():
        raise ExportError(f"no saved model at {Path(path).resolve()}: expected {file.name} and weights.pt there")
    try:
        arch = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{file} is not readable JSON: {exc}") from exc
    if not isinstance(arch, dict) or arch.get("format") != FORMAT_VERSION:
        raise ExportError(f"{file} is not a nas-grouping architecture ({FORMAT_VERSION}) file")
    return arch


def load_model(path: str | os.PathLike, *, builder: Callable[..., nn.Module] | None = None,
               map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by ``save_model``; no code is unpickled.

    Args:
        builder: a callable that builds the base network from the recipe's kwargs;
            needed when the recipe names no registered search space.
        map_location: where to put the tensors (a model saved on GPU loads on CPU).

    The model comes back in eval mode, in the memory layout chosen at export; call
    ``.train()`` to fine-tune it.
    """
    arch = read_architecture(path)
    recipe = arch["recipe"]
    model = _build_base(recipe, builder, where=str(path))
    if model is None:
        raise ExportError(f"{path}: the recipe names no search space; pass builder= to load_model")
    for name, rec in arch["layers"].items():
        if not isinstance(rec, dict) or "type" not in rec or "config" not in rec:
            raise ExportError(f"{path}: layer {name!r} in architecture.json has no 'type' and 'config'; the file is "
                              "damaged or from another version")
        entry = exportable(rec["type"]) if isinstance(rec["type"], str) else None
        if entry is None:
            raise ExportError(
                f"{path}: layer {name!r} has type {rec['type']!r}, which is not registered; "
                "import the module that defines it before loading"
            )
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"{path}: the rebuilt base network has no layer {name!r}; wrong builder?") from None
        try:
            layer = entry[2](rec["config"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ExportError(f"{path}: layer {name!r}'s saved config {rec.get('config')!r} cannot rebuild a "
                              f"{rec['type']} ({type(exc).__name__}: {exc}); architecture.json is damaged or from "
                              "another version") from None
        replace_layer(model, name, layer)
    if arch.get("widths"):  # norm and linear layers of the base network narrowed by channel pruning
        set_widths(model, arch["widths"])
    file = Path(path) / "weights.pt"
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"{file} is missing") from None
    except Exception as exc:  # torch raises several types for corrupt files
        if is_out_of_memory(exc):
            raise MemoryError(f"out of memory while reading {file} ({exc}); free memory, or load with "
                              "map_location='cpu' on a machine with more") from exc
        raise ExportError(f"{file} is not a readable weights file: {exc}") from exc
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"{file} does not fit the rebuilt architecture: {exc}") from exc
    setattr(model, RECIPE_ATTR, recipe)
    model = model.to(map_location)
    if arch.get("layout") == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    setattr(model, LAYOUT_ATTR, arch.get("layout", "nchw"))
    return model.eval()


def _build_base(recipe: Any, builder: Callable[..., nn.Module] | None, *, where: str) -> nn.Module | None:
    try:
        return base_model(recipe, builder)
    except TypeError as exc:
        if builder is None:
            raise
        kwargs = recipe.get("kwargs", {}) if isinstance(recipe, dict) else {}
        raise ExportError(f"{where}: builder {getattr(builder, '__qualname__', builder)!r} does not accept the saved "
                          f"recipe's arguments {kwargs}: {exc}") from exc
