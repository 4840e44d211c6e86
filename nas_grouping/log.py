"""The library's log lines on a console, as the ``nas-grouping`` command shows them.

The library logs to the ``nas_grouping`` logger and shows nothing by itself (a
NullHandler, by convention). ``log_to_console`` is the opt-in handler: the command
installs it, and so does each tuning worker process, at the parent's level (as
``optuna.logging`` offers its default handler).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable

__all__ = ["log_to_console"]


class _ConsoleHandler(logging.Handler):
    """The library's log lines as the commands print them: below WARNING the bare message on stdout,
    from WARNING on ``warning: ...`` (``error: ...``) on stderr. Written with ``tqdm.write`` so a running
    progress bar is not broken, and to the streams of the moment (``sys.stdout`` when the line is written)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            text = self.format(record)
            if record.levelno >= logging.WARNING:
                tqdm.write(f"{record.levelname.lower()}: {text}", file=sys.stderr)
            else:
                tqdm.write(text, file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> Callable[[], None]:
    """Show the records of the ``nas_grouping`` logger from ``level`` on, as the commands print them
    (``--quiet``: WARNING, ``--verbose``: DEBUG), and the library's Python warnings as the same one
    ``warning: ...`` line (not the file and source line). The root logger is left alone. Returns the
    function that undoes it (removes the handler, restores the logger's level and the warning display)."""
    log = logging.getLogger("nas_grouping")
    handler, before = _ConsoleHandler(), log.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' own
        if category.__module__.startswith("nas_grouping."):
            log.warning("%s", message)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show

    def undo() -> None:
        log.removeHandler(handler)
        log.setLevel(before)
        warnings.showwarning = shown

    return undo
