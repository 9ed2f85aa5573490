"""Optuna helpers shared by the sweeper plugin (hydra_plugins/clipqa_optuna_sweeper) and the jobs it launches.

The sweeper hands each job its trial as :class:`TrialJob`, JSON in the environment variable ``CLIPQA_OPTUNA_TRIAL``
(set through Hydra's ``hydra.job.env_set`` while the job runs, with any launcher; not a config override, so
``hydra.job.override_dirname`` and ``overrides.yaml`` stay the user's). The job side:

- any Hydra app: ``trial = current_trial()`` (None outside the sweeper) gives the running ``optuna.Trial``, for
  ``trial.report(value, step)`` and ``trial.should_prune()``;
- clipqa's ``train.py``: :meth:`TrialJob.pruning_callback` reports val/acc after each validation and raises
  ``optuna.TrialPruned`` when the pruner says so; :func:`objective` picks what the job returns
  (``hydra.sweeper.metric_names``, default val/acc).

Shared studies (several sweeper processes, on one machine or many, working on one study in SQLite or PostgreSQL):
:func:`make_storage` and :func:`open_study` retry the races of two processes creating the same tables or study at
once; :func:`study_lock` makes "count the trials, then ask for one" atomic across processes, so the study never
passes ``n_trials``; :class:`Heartbeats` records, from the sweeper process, a heartbeat for every trial it asked for
while its job runs, so that another worker (or the next sweep) fails the trials of a worker that died
(:func:`fail_stale_trials`) and retries each once (:func:`trials_used` counts a retried trial once).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clipqa.errors import ClipqaError
from clipqa.metrics import OBJECTIVE
from clipqa.paths import absolute_sqlite, project_sqlite

log = logging.getLogger(__name__)

TRIAL_ENV = "CLIPQA_OPTUNA_TRIAL"
# The storage URL as given (a password included), for the jobs: the sweeper sets it in its own environment, which
# its jobs inherit (in-process, joblib's workers, SLURM jobs); files and logs only ever see the URL without it.
STORAGE_ENV = "CLIPQA_OPTUNA_STORAGE"
# What two processes creating the same tables or study at the same moment run into (SQLite: a lock, a table
# created by the other; PostgreSQL: a unique violation in its catalog or on the study's name).
RACE_MARKERS = ("database is locked", "already exists", "duplicate key", "unique constraint", "deadlock detected")
RACE_ATTEMPTS = 8


def default_storage() -> str:
    return project_sqlite("optuna.db")


def absolute_storage_url(url: str) -> str:
    """A storage URL every job can open, whatever its working directory (``hydra.job.chdir=true``): relative
    ``sqlite:///`` and ``journal:///`` paths made absolute against the working directory; other URLs unchanged."""
    if url.startswith("journal://"):
        return f"journal://{Path(url[len('journal://') :]).expanduser().resolve()}"
    return absolute_sqlite(url)


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
    (:func:`is_race`); any other error at once. A race that keeps failing is a ClipqaError naming ``what``."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not is_race(e):
                raise
            if attempt == attempts - 1:
                first_line = str(e).strip().splitlines()[0]
                raise ClipqaError(
                    f"{what}: still failing after {attempts} attempts, each colliding with another process creating "
                    f"the same tables or study ({type(e).__name__}: {first_line}). Another sweep may hold the "
                    "database locked for long (SQLite on a network file system?); retry, or use PostgreSQL for "
                    "many concurrent workers."
                ) from None
            log.debug("%s: %s; retrying", what, e)
            time.sleep(min(pause * 2**attempt, 4.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def make_storage(url: str | None, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int = 0):  # fmt: skip
    """An Optuna storage from a URL: any RDB URL (sqlite:///..., postgresql://...) or ``journal:///path/file.log``.

    A relative sqlite path is made absolute, so every job of a sweep opens the same file. With
    ``heartbeat_interval`` (RDB storages; the sweeper's, ``hydra.sweeper.heartbeat_interval``): a trial whose
    heartbeat is older than ``grace_period`` seconds is failed by :func:`fail_stale_trials` and retried up to
    ``max_retry`` times with the same parameters.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = absolute_storage_url(url or default_storage())
    if url.startswith("journal://"):
        path = Path(url[len("journal://") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs = {"heartbeat_interval": int(heartbeat_interval), "grace_period": int(grace_period or 0) or None}
        kwargs[_stale_callback_argument()] = _on_stale_trial(max_retry)

    def create():
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna (since 2.0)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}, **kwargs
            )

    try:  # two processes creating the tables of a fresh database at once collide: retried
        return retry_race(create, f"Creating the Optuna storage {shown_url(url)} (hydra.sweeper.storage)")
    except ClipqaError:
        raise
    except Exception as e:
        raise ClipqaError(
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


def _retry_class():
    import optuna

    # Optuna 4.9 renamed RetryFailedTrialCallback (kept until 6.0) to RetryHeartbeatStaleTrialCallback.
    renamed = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return renamed or optuna.storages.RetryFailedTrialCallback


def _stale_callback_argument() -> str:
    import inspect

    import optuna

    params = inspect.signature(optuna.storages.RDBStorage).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def _on_stale_trial(max_retry: int):
    """Called (in whichever worker noticed) for each trial failed for want of heartbeats: logged, and retried with
    the same parameters (a new trial, WAITING for the next ask of any worker) up to ``max_retry`` times."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = _retry_class()(max_retry=max_retry) if max_retry > 0 else None

    def on_stale(study, trial) -> None:
        history = retry_history(trial)
        retried = retry is not None and len(history) < max_retry
        log.warning(
            "trial %d: no heartbeat from the sweeper that ran it for longer than the grace period (the process or "
            "its machine died): FAIL%s",
            trial.number,
            ", retried with the same parameters" if retried else f" (retried {len(history)} time(s) already)",
        )
        if retry is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry(study, trial)

    return on_stale


def retry_history(trial) -> list[int]:
    """The numbers of the trials this one retries (empty: not a retry); Optuna's retry callback's bookkeeping."""
    return list(trial.system_attrs.get("retry_history", []))


def trials_used(trials: list) -> int:
    """The trials that count toward ``n_trials``: every trial (waiting ones included) except failed trials that a
    retry replaces, so a worker's death costs no trial of the budget."""
    replaced = {n for t in trials for n in retry_history(t)}
    return len(trials) - len(replaced)


def fail_stale_trials(study) -> None:
    """Fail (and retry) the study's trials whose sweeper stopped sending heartbeats; nothing without heartbeats."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def heartbeat_interval(storage) -> int | None:
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter is not None else None


@contextmanager
def study_lock(url: str | None, storage, study_name: str) -> Iterator[None]:
    """Hold the study's ask lock: one worker at a time counts the trials and asks for the next, so concurrent
    workers never pass ``n_trials`` together. SQLite: a lock file beside the database (``<file>.lock``);
    PostgreSQL: an advisory lock; the OS or the server releases either when the process dies. Other storages: no
    lock (two workers asking in the same instant may add a trial more)."""
    if url and url.startswith("sqlite:///") and ":memory:" not in url:
        import fcntl

        path = Path(url[len("sqlite:///") :].split("?", 1)[0] + ".lock")
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif url and url.startswith("postgresql") and hasattr(storage, "engine"):
        from sqlalchemy import text

        key = zlib.crc32(f"clipqa-optuna-ask:{study_name}".encode())
        with storage.engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    else:
        yield


class Heartbeats:
    """The heartbeats of the trials this process asked for, recorded every ``heartbeat_interval`` seconds by one
    thread of the sweeper process while their jobs run (whatever the launcher: the sweeper waits for them), so a
    trial counts as alive exactly while the sweeper that asked for it is. Nothing happens for a storage without
    heartbeats. A failed write is logged and tried again at the next beat."""

    def __init__(self, storage):
        self.storage = storage
        self.interval = heartbeat_interval(storage)
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeats:
        if self.interval:
            self._thread = threading.Thread(target=self._run, name="optuna-heartbeats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def add(self, trial_id: int) -> None:
        """Beat now (a trial with no heartbeat would never be found stale), then at every interval."""
        if self.interval:
            self._beat(trial_id)
            with self._lock:
                self._ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _beat(self, trial_id: int) -> None:
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception as e:  # a busy or unreachable database: the next beat tries again
            log.warning("could not record the heartbeat of trial id %d: %s", trial_id, str(e).splitlines()[0])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = sorted(self._ids)
            for trial_id in ids:
                self._beat(trial_id)


def make_pruner(p):
    """The pruner named by ``hydra.sweeper.pruner`` (median | hyperband | none); the job builds the same one."""
    import optuna

    if p["name"] == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(p["n_startup_trials"]), n_warmup_steps=int(p["n_warmup_steps"])
        )
    if p["name"] == "hyperband":
        max_resource = p["max_resource"] if p["max_resource"] == "auto" else int(p["max_resource"])
        return optuna.pruners.HyperbandPruner(
            min_resource=int(p["min_resource"]), max_resource=max_resource, reduction_factor=int(p["reduction_factor"])
        )
    if p["name"] == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"hydra.sweeper.pruner.name={p['name']!r}: choose median, hyperband or none")


@dataclass
class TrialJob:
    """What a job launched by the sweeper knows about its trial (the sweeper writes it, the job reads it)."""

    number: int  # the trial's number in its study (0, 1, ...)
    trial_id: int  # its id in the storage: optuna.trial.Trial(study, trial_id)
    study_name: str
    storage: str | None  # absolute URL without credentials (shown_url); None: an in-memory study
    pruner: dict | None = None  # hydra.sweeper.pruner; None: no pruning (e.g. a multi-objective study)
    metric_names: list[str] | None = None  # hydra.sweeper.metric_names (clipqa: what train.py returns)

    def to_env(self) -> str:
        """JSON without ``'`` or ``$`` (a Hydra quoted string, never an OmegaConf interpolation)."""
        return json.dumps(asdict(self)).replace("'", "\\u0027").replace("$", "\\u0024")

    @classmethod
    def from_env(cls) -> TrialJob | None:
        """This job's trial, or None when the job was not launched by the clipqa_optuna sweeper."""
        raw = os.environ.get(TRIAL_ENV)
        return cls(**json.loads(raw)) if raw else None

    def trial(self):
        """The running ``optuna.Trial`` (None for an in-memory study, which lives in the sweeper's process only)."""
        import optuna

        if self.storage is None:
            return None
        pruner = make_pruner(self.pruner) if self.pruner else None  # judge as the sweeper does
        study = optuna.load_study(study_name=self.study_name, storage=make_storage(self.storage_url()), pruner=pruner)
        return optuna.trial.Trial(study, self.trial_id)

    def storage_url(self) -> str | None:
        """The URL to connect with: the sweeper's own (with its password, from the environment) when it is this
        storage's, else the one without credentials (PostgreSQL then reads PGPASSWORD or ~/.pgpass)."""
        full = os.environ.get(STORAGE_ENV)
        if self.storage and full and shown_url(full) == self.storage:
            return full
        return self.storage

    def pruning_callback(self):
        """``on_validation(val_acc, step)`` for :func:`clipqa.training.run.train`, reporting to this trial; None when
        the study
        is not pruned on val/acc (pruner off, a multi-objective study, or another objective)."""
        import optuna

        names = self.metric_names or [OBJECTIVE]
        if self.pruner is None or self.pruner["name"] == "none" or names != [OBJECTIVE]:
            if names != [OBJECTIVE]:
                log.info("trial %d: not pruned (the objective is %s, not %s)", self.number, names, OBJECTIVE)
            return None
        trial = self.trial()
        if trial is None:
            return None

        def report(value: float, step: int) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"trial {self.number} pruned at step {step} ({OBJECTIVE} {value:.4f})")

        return report


def current_trial():
    """The ``optuna.Trial`` of this job when the clipqa_optuna sweeper launched it (else None): any Hydra app can
    ``trial.report(value, step)`` and stop when ``trial.should_prune()`` (raise ``optuna.TrialPruned``)."""
    job = TrialJob.from_env()
    return job.trial() if job else None


def objective(metrics: dict[str, Any], job: TrialJob | None) -> float | tuple[float, ...]:
    """What train.py returns to a sweeper: val/acc, or the metrics named by ``hydra.sweeper.metric_names`` (a tuple
    for a multi-objective study)."""
    names = (job.metric_names if job else None) or [OBJECTIVE]
    missing = [n for n in names if n not in metrics]
    if missing:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, int | float))
        raise ClipqaError(
            f"hydra.sweeper.metric_names names {missing}, which this run's metrics.json does not hold; name "
            f"objectives among: {', '.join(numeric)} (e.g. hydra.sweeper.metric_names=[val/acc,params/trainable])."
        )
    values = tuple(float(metrics[n]) for n in names)
    return values[0] if len(values) == 1 else values
