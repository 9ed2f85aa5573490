"""Several sweeper processes on one study: the ask lock, heartbeats, and failing and retrying a dead worker's trials.

Workers (sweeper processes on one machine or many, or later sweeps resuming the study) share one study in SQLite or
PostgreSQL. :func:`study_lock` makes "count the trials, then ask for one" atomic across processes, so together they
never pass ``n_trials``; :class:`Heartbeats` records, from the sweeper process, a heartbeat for every trial it asked
for while its job runs (whatever the launcher: the sweeper waits for its jobs), so a trial counts as alive exactly
while the sweeper that asked for it is. Any worker fails the trials of a worker that stopped beating
(:func:`fail_stale_trials`) and retries each with the same parameters up to ``max_retry`` times
(:func:`stale_trial_callback`), then hands it to the host's reaper (the hooks' ``on_trial_reaped``: the dead worker's
tracking runs ended); :func:`trials_used` counts a failed trial and its retry once, so a worker's death
costs no trial of the budget. :func:`ask` and :func:`wait_for_other_workers` are the sweeper's two steps built on them.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _retry_class():
    import optuna

    # Optuna 4.9 renamed RetryFailedTrialCallback (kept until 6.0) to RetryHeartbeatStaleTrialCallback.
    renamed = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return renamed or optuna.storages.RetryFailedTrialCallback


def worker_name() -> str:
    """This sweeper process as reasons name it: ``host pid N``."""
    import os
    import socket

    return f"{socket.gethostname()} pid {os.getpid()}"


def _retry(max_retry: int):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _retry_class()(max_retry=max_retry) if max_retry > 0 else None


def retry_trial(study, trial, max_retry: int) -> bool:
    """A copy of the failed ``trial`` (same parameters, WAITING for the next ask of any worker), as Optuna's retry
    callback makes it, unless it was retried ``max_retry`` times already; True when a copy was added."""
    import optuna

    retry = _retry(max_retry)
    if retry is None or len(retry_history(trial)) >= max_retry:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry(study, trial)
    return True


def stale_trial_callback(max_retry: int, grace_period: int | None = None,
                         on_reaped: Callable[[Any, Any, str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """The RDBStorage argument (its name depends on Optuna's version) called, in whichever worker noticed, for each
    trial failed for want of heartbeats: logged, retried with the same parameters (a new trial, WAITING for the
    next ask of any worker) up to ``max_retry`` times, then ``on_reaped(study, trial, reason)`` (the sweeper's hooks:
    the host ends what the dead worker left open). A reaper that raises is logged: the sweep goes on."""
    import inspect

    import optuna

    def on_stale(study, trial) -> None:
        history = retry_history(trial)
        retried = retry_trial(study, trial, max_retry)
        log.warning(
            "trial %d: no heartbeat from the sweeper that ran it for longer than the grace period (the process or "
            "its machine died): FAIL%s",
            trial.number,
            ", retried with the same parameters" if retried else f" (retried {len(history)} time(s) already)",
        )
        if on_reaped is not None:
            grace = f" for over {grace_period} s (hydra.sweeper.grace_period)" if grace_period else ""
            reap(on_reaped, study, trial, f"no heartbeat from its sweeper{grace}: that worker died; "
                 f"reaped by {worker_name()}")  # fmt: skip

    params = inspect.signature(optuna.storages.RDBStorage).parameters
    name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    return {name: on_stale}


def reap(on_reaped: Callable[[Any, Any, str], None], study, trial, reason: str) -> None:
    """``on_reaped(study, trial, reason)``, an error logged (reaping runs inside another worker's ask)."""
    try:
        on_reaped(study, trial, reason)
    except Exception as e:
        log.warning("trial %d: reaping what it left open failed: %s: %s", trial.number, type(e).__name__, e)


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

        key = zlib.crc32(f"clipqa-optuna-ask:{study_name}".encode())  # (the key older workers use: keep it)
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
    thread of the sweeper process while their jobs run. Nothing happens for a storage without heartbeats. A failed
    write is logged and tried again at the next beat."""

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


def ask(study, storage, url: str | None, space: dict[str, Any], n_trials: int, grid: bool, beats: Heartbeats,
        reseed: Callable[[int], None] | None = None):  # fmt: skip
    """The next trial for this worker, or None when the study has what it needs. Under the study's lock (one
    worker at a time): fail the trials of dead workers (each retried: a WAITING trial), count the trials that use
    the budget (:func:`trials_used`), then ask: a waiting trial first (a retry, or one enqueued by hand), else a new
    one while fewer than ``n_trials`` are used. ``reseed(n_trials_there)`` is called before the ask: the sampler
    seeded by the trials there now, so two workers that start together differ."""
    from optuna.trial import TrialState

    with study_lock(url, storage, study.study_name):
        fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and (trials_used(trials) >= n_trials or (grid and study.sampler.is_exhausted(study))):
            return None
        if reseed is not None:
            reseed(len(trials))
        with warnings.catch_warnings():  # Optuna's "heartbeats are meant for optimize()": here the sweeper beats
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask(space)
        beats.add(trial._trial_id)
    return trial


def wait_for_other_workers(study, url: str | None, storage, beats: Heartbeats, grace_period: int) -> bool:
    """The study has all its trials, but other workers may still run some. A dead worker's trial fails once it
    has had no heartbeat for ``grace_period`` seconds and comes back to be retried: wait that long (the trials
    of live workers then keep running; their workers tell them). True when a retry is waiting to be run."""
    from optuna.trial import TrialState

    if not beats.interval:
        return False
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return False
    patience = grace_period + 2 * beats.interval
    log.info(
        "study %r has all its trials; %d still running in other workers (%s): waiting up to %d s for a dead "
        "worker's trial to come back for a retry (hydra.sweeper.grace_period=%d)",
        study.study_name,
        len(running),
        ", ".join(str(t.number) for t in running),
        patience,
        grace_period,
    )
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        time.sleep(min(beats.interval, max(0.0, deadline - time.monotonic())))
        with study_lock(url, storage, study.study_name):
            fail_stale_trials(study)
            states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.WAITING in states:
            return True
        if TrialState.RUNNING not in states:
            return False
    log.info("the trials still running have live workers (their heartbeats are fresh): those workers tell them")
    return False
