"""Post-search compression of any trained model: channel pruning, then self-grouping, fine-tuned, measured; and the
hybrid of channels and DGConv groups held to a measured latency budget."""

from nas_grouping.pipeline.compress import CompressResult, compress
from nas_grouping.pipeline.hybrid import HybridCompression, HybridResult

__all__ = ["compress", "CompressResult", "HybridCompression", "HybridResult"]
