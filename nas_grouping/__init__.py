"""nas-grouping: learn how to group the channels of CNNs, then export models that are really smaller and faster.

DGConv2d (GroupNet, ICCV 2019) is a differentiable search operator whose number
of groups is learned; the self-grouping pass (SG-CNN, 2020) compresses any
trained model into diverse group convolutions. MACs are multiply-accumulates.
Progress and summaries are logged to the ``nas_grouping`` logger (silent unless the
application shows it; the ``nas-grouping`` command prints them).
"""

import logging

from nas_grouping.channels.pruning import ChannelPruning, prune_channels
from nas_grouping.convert import arch_parameters, conversion_plan, convert_to_dgconv, dgconv_layers, weight_parameters
from nas_grouping.errors import (BudgetError, ConfigError, DataError, ExportError, MissingDependencyError,
                                 NasGroupingError)
from nas_grouping.export.model import export_model, load_model, save_model
from nas_grouping.macs import count_macs, count_parameters, layer_macs
from nas_grouping.ops import DGConv2d, PermutedGroupConv2d
from nas_grouping.pipeline.hybrid import HybridCompression
from nas_grouping.self_grouping.grouping import SelfGrouping, self_group

__version__ = "0.1.0"

logging.getLogger("nas_grouping").addHandler(logging.NullHandler())  # the library convention

# Loaded on first use: config imports the data loaders (torchvision), tune imports Optuna. The job
# functions stay in their modules (nas_grouping.search.loop.search, .compress.compress, .tune.tune): a
# package attribute of the same name as a submodule is replaced when the submodule is imported.
_LAZY = {"SearchConfig": "config", "SelfGroupingConfig": "config", "CompressConfig": "config",
         "TuneConfig": "config", "TuneResult": "tune"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DGConv2d", "PermutedGroupConv2d",
    "convert_to_dgconv", "conversion_plan", "dgconv_layers", "arch_parameters", "weight_parameters",
    "count_macs", "count_parameters", "layer_macs",
    "export_model", "save_model", "load_model",
    "ChannelPruning", "prune_channels", "HybridCompression",
    "SearchConfig", "SelfGrouping", "self_group", "SelfGroupingConfig", "CompressConfig",
    "TuneConfig", "TuneResult",
    "NasGroupingError", "ConfigError", "BudgetError", "DataError", "ExportError", "MissingDependencyError",
]
