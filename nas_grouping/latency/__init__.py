"""Measured latency: one timer, the fastest exact forms, latency tables and costs, measured budgets, per-layer reports."""

from nas_grouping.latency.measure import (LatencyCost, LatencyDeviceWarning, LatencyTable, MeasuredLatency,
                                          choose_fastest_forms, fastest_layouts, latency_report, measure_ms,
                                          meet_measured_budget, parse_latency_budget, profile_layers)

__all__ = ["measure_ms", "fastest_layouts", "choose_fastest_forms", "latency_report", "LatencyTable", "profile_layers",
           "LatencyCost", "MeasuredLatency", "meet_measured_budget", "parse_latency_budget", "LatencyDeviceWarning"]
