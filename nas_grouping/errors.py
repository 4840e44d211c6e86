"""One base exception for everything nas-grouping raises on purpose.

Each subclass also inherits the builtin that fits (ValueError, FileNotFoundError,
ImportError), so callers that catch builtins keep working.
"""

__all__ = ["NasGroupingError", "ConfigError", "BudgetError", "DataError", "ExportError", "MissingDependencyError",
           "WorkerError"]


class NasGroupingError(Exception):
    """Base class of the errors nas-grouping raises for bad input or state."""


class ConfigError(NasGroupingError, ValueError):
    """A setting or argument that cannot work (wrong shape, range, type)."""


class BudgetError(NasGroupingError, ValueError):
    """A MAC or latency budget that no configuration can meet."""


class DataError(NasGroupingError, FileNotFoundError):
    """A data set that is missing or malformed."""


class ExportError(NasGroupingError, ValueError):
    """A model that cannot be exported or loaded as asked."""


class MissingDependencyError(NasGroupingError, ImportError):
    """An optional package that a feature needs is not installed."""


class WorkerError(NasGroupingError, RuntimeError):
    """A worker process (of a tuning study) died or failed; the shared state it worked on is kept."""
