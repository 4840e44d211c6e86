"""Optional integrations with other tools. Each loads its tool lazily: ``import nas_grouping`` never needs them.

- ``nas_grouping.integrations.nni``: DGConv2d as a Microsoft NNI search operator
  (``pip install "nas-grouping[nni]"``).
"""

from __future__ import annotations

import importlib.util

__all__ = ["nni_available"]


def nni_available() -> bool:
    """Whether Microsoft NNI is installed (without importing it)."""
    try:
        return importlib.util.find_spec("nni") is not None
    except (ImportError, ValueError):  # a broken or blocked entry in sys.modules
        return False
