"""The study storage that a ``tune.storage`` URL names, opened so that several workers share it.

Kinds: SQLite (one machine, several processes), PostgreSQL/MySQL (many machines) and Optuna's
journal file (many machines on a shared file system). RDB storages get a heartbeat: a trial
whose worker died is marked FAIL (and its MLflow run ended) by the next worker.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from liverseg.errors import ParamsError
from liverseg.tuning.objective import end_stale_trial_run
from liverseg.tuning.study import TuningError

# SQLite lets one writer in at a time; the others wait up to this long instead of failing with
# "database is locked" (a trial writes a handful of rows per epoch, far below this).
SQLITE_BUSY_TIMEOUT_S = 60
# RDB storages: a running trial writes a heartbeat this often; a trial whose heartbeat is older
# than the grace period (its process was killed or its machine died) is marked FAIL by the
# next worker that starts a trial, so it does not stay RUNNING forever.
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
# Workers starting together on a fresh database may race to create Optuna's tables.
STORAGE_OPEN_ATTEMPTS = 5
STORAGE_RETRY_S = 0.5

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
JOURNAL_PREFIX = "journal:"


def redact(url: str) -> str:
    """``url`` without its password, for logs, tags and error messages."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL has no password we could find either
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage that ``url`` (``tune.storage``) names.

    * ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: one machine, several
      processes (writers wait for the lock up to ``SQLITE_BUSY_TIMEOUT_S``);
    * ``postgresql://user:pw@host:port/db``, ``mysql://...``: many machines;
    * ``journal:PATH``: an append-only log file, for many machines on a shared file system
      (NFS) where SQLite's locking is unreliable.
    """
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX) :])
        if not str(path) or str(path) == ".":
            raise ParamsError(f"params: tune.storage: {url!r}: journal: needs a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))

    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in RDB_SCHEMES:
        raise ParamsError(
            f"params: tune.storage: {redact(url)!r} is not a study storage; use "
            "sqlite:///PATH, postgresql://USER:PW@HOST:PORT/DB, mysql://... or journal:PATH"
        )
    url = _with_installed_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        path_part = url.split("///", 1)[1] if "///" in url else ""
        db_path = path_part.split("?", 1)[0]
        if not db_path or db_path == ":memory:":
            raise ParamsError(
                f"params: tune.storage: {url!r}: needs a database file (sqlite:///PATH); an "
                "in-memory database cannot be shared or resumed"
            )
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}

    import sqlalchemy.exc

    last: Exception | None = None
    for attempt in range(STORAGE_OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=HEARTBEAT_GRACE_S,
                    heartbeat_stale_trial_callback=end_stale_trial_run,
                )
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            last = exc
            time.sleep(STORAGE_RETRY_S * (attempt + 1))
    raise TuningError(
        f"tune.storage {redact(url)}: cannot open the study storage after "
        f"{STORAGE_OPEN_ATTEMPTS} attempts: {last}"
    )


def _with_installed_driver(url: str) -> str:
    """``postgresql://`` with the psycopg2 driver when psycopg 3 is not installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the project installs
    psycopg2 (``psycopg2-binary``), so without this the documented URL would not load.
    An explicit ``postgresql+DRIVER://`` is left alone.
    """
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url
