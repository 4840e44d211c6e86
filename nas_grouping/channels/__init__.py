"""Channel pruning: remove whole channels from every set of coupled layers of any traceable model."""

from nas_grouping.channels.pruning import ChannelPruning, ChannelSet, least_ratio, prune_channels, set_widths

__all__ = ["ChannelPruning", "ChannelSet", "prune_channels", "least_ratio", "set_widths"]
