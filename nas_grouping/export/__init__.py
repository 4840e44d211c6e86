"""Export searched models to real group convolutions, and save / load them as data (no pickled code)."""

from nas_grouping.export.model import (FORMAT_VERSION, export_layer, export_model, group_permutation, load_model,
                                       register_exportable, save_model)

__all__ = ["group_permutation", "export_layer", "export_model", "register_exportable", "save_model", "load_model",
           "FORMAT_VERSION"]
