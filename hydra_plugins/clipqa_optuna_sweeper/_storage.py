"""Opening Optuna storages and studies, safely from several processes at once, and URLs fit to be shown.

``hydra.sweeper.storage``: any RDB URL (``sqlite:///PATH.db``, ``postgresql://user@host/db``) or
``journal:///PATH.log``; a relative path is made absolute against the working directory, so every job of a sweep
opens the same file even with ``hydra.job.chdir=true``. :func:`make_storage` and :func:`open_study` retry the race of
two processes creating the same tables or study at once (:func:`retry_race`); :func:`shown_url` drops the password
from a URL for logs, files and the jobs' configs. Heartbeats and stale trials: :mod:`._workers`.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SweeperError

log = logging.getLogger(__name__)

# What two processes creating the same tables or study at the same moment run into (SQLite: a lock, a table
# created by the other; PostgreSQL: a unique violation in its catalog or on the study's name).
RACE_MARKERS = ("database is locked", "already exists", "duplicate key", "unique constraint", "deadlock detected")
RACE_ATTEMPTS = 8


def absolute_storage_url(url: str) -> str:
    """A storage URL every job can open, whatever its working directory (``hydra.job.chdir=true``): relative
    ``sqlite:///`` and ``journal:///`` paths made absolute against the working directory; other URLs unchanged."""
    if url.startswith("journal://"):
        return f"journal://{Path(url[len('journal://') :]).expanduser().resolve()}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and ":memory:" not in url:
        return f"sqlite:///{Path(url[len('sqlite:///') :]).resolve()}"
    return url


def shown_url(url: str | None) -> str:
    """A storage URL for logs, files, messages and the jobs' configs: without its password (the user stays: a job
    that connects with this URL then takes the password from PGPASSWORD or ~/.pgpass, as libpq does)."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return "memory"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host))


def is_race(error: BaseException) -> bool:
    """Whether ``error`` is two processes creating the same storage tables or study at once (worth a retry)."""
    import optuna

    if isinstance(error, optuna.exceptions.DuplicatedStudyError):
        return True
    text = str(error).lower()
    return type(error).__module__.startswith("sqlalchemy") and any(m in text for m in RACE_MARKERS)


def retry_race(fn: Callable[[], Any], what: str, attempts: int = RACE_ATTEMPTS, pause: float = 0.2) -> Any:
    """``fn()``, retried (with a growing, jittered pause: about 15 s in all) while it fails with a creation race
    (:func:`is_race`); any other error at once. A race that keeps failing is a SweeperError naming ``what``."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not is_race(e):
                raise
            if attempt == attempts - 1:
                first_line = str(e).strip().splitlines()[0]
                raise SweeperError(
                    f"{what}: still failing after {attempts} attempts, each colliding with another process creating "
                    f"the same tables or study ({type(e).__name__}: {first_line}). Another sweep may hold the "
                    "database locked for long (SQLite on a network file system?); retry, or use PostgreSQL for "
                    "many concurrent workers."
                ) from None
            log.debug("%s: %s; retrying", what, e)
            time.sleep(min(pause * 2**attempt, 4.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def make_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int = 0, on_reaped: Callable[[Any, Any, str], None] | None = None):  # fmt: skip
    """An Optuna storage from a URL: any RDB URL (sqlite:///..., postgresql://...) or ``journal:///path/file.log``.

    A relative path is made absolute, so every job of a sweep opens the same file. With ``heartbeat_interval``
    (RDB storages; ``hydra.sweeper.heartbeat_interval``): a trial whose heartbeat is older than ``grace_period``
    seconds is failed by :func:`._workers.fail_stale_trials` and retried up to ``max_retry`` times with the same
    parameters, then handed to ``on_reaped(study, trial, reason)`` (:func:`._workers.stale_trial_callback`).
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from ._workers import stale_trial_callback

    url = absolute_storage_url(url)
    if url.startswith("journal://"):
        path = Path(url[len("journal://") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs = {"heartbeat_interval": int(heartbeat_interval), "grace_period": int(grace_period or 0) or None}
        kwargs.update(stale_trial_callback(max_retry, grace_period, on_reaped))

    def create():
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna (since 2.0)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}, **kwargs
            )

    try:  # two processes creating the tables of a fresh database at once collide: retried
        return retry_race(create, f"Creating the Optuna storage {shown_url(url)} (hydra.sweeper.storage)")
    except SweeperError:
        raise
    except Exception as e:
        raise SweeperError(
            f"Cannot open the Optuna storage {shown_url(url)!r} (hydra.sweeper.storage): "
            f"{str(e).replace(url, shown_url(url))}. Use sqlite:///PATH.db, journal:///PATH.log or a database URL "
            "such as postgresql://user@host/db (the password in PGPASSWORD or ~/.pgpass)."
        ) from None


def open_study(storage, study_name: str, directions: list[str]):
    """The study, created if it is new; two processes creating it at once both get it (the race is retried)."""
    import optuna

    return retry_race(
        lambda: optuna.create_study(study_name=study_name, storage=storage, directions=directions, load_if_exists=True),
        f"Creating the Optuna study {study_name!r}",
    )
