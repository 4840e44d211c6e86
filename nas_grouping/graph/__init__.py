"""The torch.fx graph work shared by the passes: tracing, and folding channel gathers into neighbouring layers."""

from nas_grouping.graph.fold import FoldWarning, count_gathers, fold_permutations

__all__ = ["fold_permutations", "count_gathers", "FoldWarning"]
