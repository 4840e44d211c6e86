"""Post-search compression of any trained model: channel pruning, then self-grouping, fine-tuned, measured."""

from nas_grouping.pipeline.compress import CompressResult, compress

__all__ = ["compress", "CompressResult"]
