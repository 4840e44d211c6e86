"""The SG-CNN self-grouping pass: cluster filters by input-channel importance, prune per cluster, fine-tune."""

from nas_grouping.self_grouping.grouping import (GroupingPlan, LayerOutcome, LayerPlan, SelfGrouping,
                                                 SelfGroupingResult, grouping_outcomes, self_group)

__all__ = ["SelfGrouping", "self_group", "GroupingPlan", "LayerPlan", "LayerOutcome", "SelfGroupingResult",
           "grouping_outcomes"]
