"""The DGConv search: train weights and gates toward a MAC (and latency) budget, project, fine-tune, export."""

from nas_grouping.search.loop import SearchResult, build_search_model, project_to_budget, search

__all__ = ["search", "SearchResult", "project_to_budget", "build_search_model"]
