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

from torchslim._optional import require
from torchslim.errors import ConfigError

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
