"""Optuna RDB storage: a SQLite file in the output directory, or a shared database for many workers.

Heartbeats are on: a worker that dies mid-trial stops beating, and the next worker to start a
trial marks that trial FAIL and (through Optuna's retry callback) enqueues a copy of it, so
nothing is lost and the study stays usable.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from torchslim._optional import require
from torchslim.errors import CheckpointError, ConfigError

__all__ = ["sqlite_url", "redact", "open_storage", "trial_counts", "STUDY_ATTR"]

STUDY_ATTR = "torchslim_search"  # study user attribute: what the study searches (checked on join)
_ALLOWED = "sqlite:///PATH, or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (any SQLAlchemy URL Optuna supports)"


def sqlite_url(out: str | Path) -> str:
    """The default storage: ``OUT/study.db``."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and reports)."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def open_storage(url: str, *, heartbeat: int = 10, grace: int | None = None, max_retry: int = 1) -> Any:
    """Connect to ``url`` as an Optuna ``RDBStorage`` with heartbeats and retry of failed trials.

    Args:
        url: a SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``).
        heartbeat: seconds between a running trial's heartbeats.
        grace: seconds without a heartbeat after which a running trial counts as dead
            (default ``2 * heartbeat``).
        max_retry: how often a dead worker's trial is re-enqueued.

    Raises:
        ConfigError: the URL is malformed, its driver is missing, or the database is unreachable.
        CheckpointError: the SQLite file is damaged or not a database.
    """
    optuna = require("optuna", "torchslim search")
    import sqlalchemy.exc

    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"storage URL {url!r} is not a database URL; allowed: {_ALLOWED}")
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1:
        raise ConfigError(f"heartbeat must be a whole number of seconds >= 1; got {heartbeat!r}")
    url = _with_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    elif url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise ConfigError(f"storage {url!r}: folder {str(path.parent)!r} does not exist")
        _check_sqlite_file(path)
        engine_kwargs = {"connect_args": {"timeout": 30}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats and their retry callback are "experimental"
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        if retry is not None:  # Optuna >= 4.9
            hooks = {"heartbeat_stale_trial_callback": retry(max_retry=max_retry)}
        else:
            hooks = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)}
    try:
        for attempt in range(6):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=heartbeat,
                        grace_period=grace if grace is not None else 2 * heartbeat,
                        **hooks,
                    )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers that start together race to create Optuna's tables in an empty database:
                # the losers wait and find the tables there
                if attempt == 5:
                    raise
                time.sleep(0.3 * (attempt + 1))
        raise AssertionError("unreachable")
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot open storage {redact(url)!r}: {first}; allowed: {_ALLOWED}") from exc


def _check_sqlite_file(path: Path) -> None:
    """An existing SQLite study file must open and pass SQLite's ``quick_check`` (structure of every
    page, index and table): a damaged one is one CheckpointError naming it, not a database
    traceback half-way through a search. An empty file is a new database; a locked one is left to
    the connection's own timeout."""
    import sqlite3

    try:
        if not path.is_file() or path.stat().st_size == 0:
            return
    except OSError:
        return
    fix = "restore it, or delete it (or use another --out) to start the study over"
    try:
        con = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=30)
        try:
            row = con.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            con.close()
    except sqlite3.OperationalError:  # locked, busy, unreadable: not evidence of damage
        return
    except sqlite3.DatabaseError as exc:
        raise CheckpointError(f"{path} is damaged or not an SQLite database ({exc}); {fix}") from None
    if not row or row[0] != "ok":
        detail = " ".join(str(row[0] if row else "no result").split())[:200]
        raise CheckpointError(f"{path} is damaged: SQLite's integrity check fails ({detail}); {fix}")


def _with_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3,
    torchslim's ``search`` extra installs psycopg2."""
    import importlib.util

    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain) and importlib.util.find_spec("psycopg") is None \
                and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len(plain):]
    return url


def trial_counts(study: Any) -> dict[str, int]:
    """Trials of the study by state: ``complete``, ``pruned``, ``failed``, ``running``, ``waiting``, ``total``."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    return {
        "complete": count[TrialState.COMPLETE],
        "pruned": count[TrialState.PRUNED],
        "failed": count[TrialState.FAIL],
        "running": count[TrialState.RUNNING],
        "waiting": count[TrialState.WAITING],
        "total": len(trials),
    }
