"""One base exception for everything nas-grouping raises on purpose.

Each subclass also inherits the builtin that fits (ValueError, FileNotFoundError,
ImportError), so callers that catch builtins keep working.
"""

__all__ = ["is_out_of_memory", "NasGroupingError", "ConfigError", "RunExistsError", "BudgetError", "DataError",
           "ExportError", "MissingDependencyError", "WorkerError"]


class NasGroupingError(Exception):
    """Base class of the errors nas-grouping raises for bad input or state."""


class ConfigError(NasGroupingError, ValueError):
    """A setting or argument that cannot work (wrong shape, range, type)."""


class RunExistsError(ConfigError):
    """The output folder already holds a run and resuming was not asked for (a tuning study must not
    treat it as a bad sample of knobs: every later trial would meet the same folder)."""


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


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the machine or the GPU ran out of memory (so that it is not reported as bad input)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text \
        or "can't allocate memory" in text or "failed to allocate" in text
