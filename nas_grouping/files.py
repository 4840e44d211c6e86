"""Files of a run: atomic writes (temporary file, fsync, rename), run folders that know their job, config files."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable

from nas_grouping.errors import ConfigError

__all__ = ["atomic_write", "check_run_folder", "claim_run_folder", "read_config_file", "remove_stale_temporaries",
           "run_job"]

#: the file that says which job made a run folder
RUN_FILE = "run.json"
_TMP_MARK = ".tmp-"


def remove_stale_temporaries(folder: str | os.PathLike, *, older_than_s: float = 60.0) -> list[Path]:
    """Delete the temporary files of writes that a killed process never finished (none younger than a minute)."""
    removed = []
    for path in Path(folder).glob(f".*{_TMP_MARK}*"):
        try:
            if path.is_file() and time.time() - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file, then atomically replace ``path`` with it.

    A crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files follow the user's umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def run_job(folder: str | os.PathLike) -> str | None:
    """Which job made a run folder (``search``, ``compress``, ``tune``, ...), or None for a new or empty one.

    Read from its ``run.json``; a folder made before that file existed is recognised by its files.
    """
    folder = Path(folder)
    try:
        if (folder / RUN_FILE).is_file():
            return str(json.loads((folder / RUN_FILE).read_text())["job"])
        if (folder / "tune.json").is_file():
            return "tune"
        if (folder / "config.json").is_file():
            values = json.loads((folder / "config.json").read_text())
            if "budgets" in values and "methods" in values:
                return "bench-quality"
            return "compress" if "grouping" in values else "search" if "space" in values else "unknown"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    return None


def check_run_folder(folder: str | os.PathLike, job: str) -> Path:
    """Refuse, before any work, a run folder that is a file, unwritable, or another job's run (creates nothing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file, not a folder: choose another --out")
    found = run_job(folder)
    if found not in (None, job):
        raise ConfigError(f"--out {folder} holds a {found} run; a {job} run there would overwrite its files: "
                          "choose another --out")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run folder {folder} ({existing} is not writable): choose a writable --out")
    return folder


def claim_run_folder(folder: str | os.PathLike, job: str) -> Path:
    """Create ``folder`` as the run folder of ``job`` (``run.json`` says which), after :func:`check_run_folder`."""
    folder = check_run_folder(folder, job)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        if not (folder / RUN_FILE).is_file():
            atomic_write(folder / RUN_FILE, lambda f: f.write(json.dumps({"job": job}).encode()))
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder {folder} ({exc.strerror or exc}): choose a writable --out") \
            from None
    return folder


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .json or .toml file (keys are the config's field names)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path.resolve()} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ImportError:
        raise ConfigError("TOML config files need Python 3.11+; use JSON") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
