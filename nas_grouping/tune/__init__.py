"""Optuna tuning of the search and compression knobs under hard budgets, on one machine or many."""

from nas_grouping.tune.study import Knob, TuneResult, is_tuning_run, load_tuning_config, print_tuning_run, tune

__all__ = ["tune", "TuneResult", "Knob", "print_tuning_run", "is_tuning_run", "load_tuning_config"]
