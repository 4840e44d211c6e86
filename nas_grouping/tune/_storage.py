"""Where a study lives, and the locks that keep its workers from losing or duplicating trials.

Storages: a SQLite file in the run folder (one process; resumable; optuna-dashboard reads
it), a journal file (several processes on one machine), or a PostgreSQL/MySQL server (workers
on many machines; heartbeats fail the trials of dead workers and retry them once).

Two locks:
- the *worker lock* (``.workers.lock`` in the run folder): every process working on the
  study holds it shared; one that gets it exclusively is alone, so trials still marked
  running were left by a crash and can be failed and retried at once;
- the *claim lock*: held from "may another trial start?" until the new trial exists, so the
  study stops at exactly ``trials`` trials. A file lock in the run folder serves processes
  on one machine; on PostgreSQL an advisory lock serves every machine.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import random
import re
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas_grouping.errors import ConfigError, MissingDependencyError

__all__ = ["StorageSpec", "resolve_storage", "open_storage", "mask_url", "WorkerLock", "ClaimLock"]

SQLITE_FILE = "study.db"
JOURNAL_FILE = "study.journal"
_DRIVERS = {"postgresql": "psycopg2-binary (or psycopg[binary] with postgresql+psycopg://)",
            "mysql": "PyMySQL (with mysql+pymysql://)"}


@dataclass(frozen=True)
class StorageSpec:
    """A resolved storage: ``kind`` is sqlite, journal or server; ``url`` a URL or a journal file path."""

    kind: str
    url: str

    @property
    def local(self) -> bool:
        """Files on this machine (SQLite or journal): the worker lock tells whether a worker is alive."""
        return self.kind in ("sqlite", "journal")

    @property
    def display(self) -> str:
        return mask_url(self.url)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and files)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def resolve_storage(spec: str | None, out: Path, workers: int) -> StorageSpec:
    """The storage a study uses: ``spec`` (None, 'sqlite', 'journal', a URL or a journal file path).

    None picks the file already in ``out`` (a resumed run keeps its storage), else SQLite for
    one worker and a journal file for several.

    Raises:
        ConfigError: SQLite with several workers; a spec that is neither keyword, URL nor path.
    """
    if spec is None:
        if (out / JOURNAL_FILE).exists():
            spec = "journal"
        elif (out / SQLITE_FILE).exists():
            spec = "sqlite"
        else:
            spec = "journal" if workers > 1 else "sqlite"
    if spec == "sqlite":
        result = StorageSpec("sqlite", f"sqlite:///{(out / SQLITE_FILE).resolve()}")
    elif spec == "journal":
        result = StorageSpec("journal", str((out / JOURNAL_FILE).resolve()))
    elif "://" in spec:
        scheme = spec.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme not in ("sqlite", "postgresql", "postgres", "mysql"):
            raise ConfigError(f"storage {mask_url(spec)!r}: unknown scheme {scheme!r}; expected sqlite:///FILE, "
                              "postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB or mysql+pymysql://...")
        if scheme == "postgres":
            raise ConfigError(f"storage {mask_url(spec)!r}: SQLAlchemy spells the scheme postgresql://, "
                              "not postgres://")
        result = StorageSpec("sqlite" if scheme == "sqlite" else "server", spec)
    elif spec.endswith((".journal", ".log")):
        result = StorageSpec("journal", str(Path(spec).resolve()))
    else:
        raise ConfigError(f"storage {spec!r}: expected 'sqlite', 'journal', a journal file (*.journal), or a "
                          "database URL such as postgresql+psycopg2://user:password@host:5432/db")
    if result.kind == "sqlite" and workers > 1:
        raise ConfigError(f"--workers {workers} on SQLite ({result.display}): SQLite is not for parallel workers; "
                          "use --storage journal (one machine) or a PostgreSQL/MySQL URL (many machines), or a new "
                          "--out (its default storage is a journal file when --workers > 1)")
    return result


def open_storage(spec: StorageSpec, *, heartbeat: int = 60) -> Any:
    """The Optuna storage of ``spec``, connected: an unreachable server fails here, before any trial.

    Raises:
        ConfigError: the server cannot be reached or refuses the login.
        MissingDependencyError: the database driver is not installed.
    """
    import optuna

    if spec.kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(spec.url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(spec.url))
    import sqlalchemy.exc

    kwargs: dict[str, Any] = {}
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if spec.kind == "sqlite":
        Path(spec.url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        if spec.url.startswith("postgresql"):
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
        elif spec.url.startswith("mysql"):
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
        kwargs = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat}
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
        if retry is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                kwargs["heartbeat_stale_trial_callback"] = retry(max_retry=1)
        else:
            kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=1)
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(spec.url, engine_kwargs=engine_kwargs, **kwargs)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers starting together on a new database race to create Optuna's tables: the loser
                # retries and finds them made
                if attempt == 4:
                    raise
                time.sleep(0.5 + random.random())
        raise AssertionError("unreachable")
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
        scheme = spec.url.split("://", 1)[0]
        driver = _DRIVERS.get(scheme.split("+", 1)[0], "its driver")
        hint = f"pip install {driver}"
        if scheme == "postgresql" and importlib.util.find_spec("psycopg2") is not None:
            hint = ("SQLAlchemy reads a bare postgresql:// URL as psycopg 3, which is not installed, while psycopg2 "
                    "is: write the URL as postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB, or pip install "
                    "'psycopg[binary]'")
        raise MissingDependencyError(f"storage {spec.display}: the database driver for {scheme!r} is missing "
                                     f"({exc}); {hint}") from exc
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.ArgumentError) as exc:
        first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ConfigError(f"cannot reach the study storage {spec.display}: {first}. Check that the server runs "
                          "and the URL's host, port, user, password and database are right (the README's Tuning "
                          "section shows how to start PostgreSQL)") from exc


class _FileLock:
    """An fcntl lock on a file (released when the process dies, so a crash never leaves it held)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def _open(self) -> int:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        return self.fd

    def lock(self, mode: int) -> None:
        fcntl.flock(self._open(), mode)

    def try_lock(self, mode: int) -> bool:
        try:
            fcntl.flock(self._open(), mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class WorkerLock:
    """Held shared by every process working on a study from one run folder.

    ``acquire()`` returns True when the caller is alone (it got the lock exclusively; it then
    keeps it shared), which makes running trials of local storages stale for sure.
    """

    def __init__(self, out: Path) -> None:
        self._lock = _FileLock(out / ".workers.lock")

    def acquire(self) -> bool:
        alone = self._lock.try_lock(fcntl.LOCK_EX)
        self._lock.lock(fcntl.LOCK_SH)  # from exclusive: a downgrade; else wait for a starting peer
        return alone

    def release(self) -> None:
        self._lock.close()


class ClaimLock:
    """Serializes "may another trial start?" with the creation of that trial.

    ``acquire()`` / ``release()`` may be called from the objective (which releases it as soon as
    its trial exists); ``release()`` does nothing when the lock is not held.
    """

    def __init__(self, out: Path, storage: Any = None, study_name: str = "") -> None:
        self._file = _FileLock(out / ".claim.lock")
        self._engine = None
        self._conn = None
        self._key = zlib.crc32(f"nas-grouping:{study_name}".encode()) - 2**31
        engine = getattr(storage, "engine", None)
        if engine is not None and engine.dialect.name == "postgresql":
            self._engine = engine
        self.held = False

    def acquire(self) -> None:
        self._file.lock(fcntl.LOCK_EX)
        if self._engine is not None:
            from sqlalchemy import text

            self._conn = self._engine.connect()
            self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._conn is not None:
            from sqlalchemy import text

            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            finally:
                self._conn.close()
                self._conn = None
        fcntl.flock(self._file._open(), fcntl.LOCK_UN)

    def __enter__(self) -> "ClaimLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
