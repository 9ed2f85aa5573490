"""Talking to a tracking server before training: fail fast, one clear error for a refused login, a missing
permission or no server (:func:`server_errors`, also around the sweep's parent), and a SQLite store's first use
serialized (:func:`first_use_lock`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from clipqa.errors import ClipqaError
from clipqa.tracking.uris import artifact_location, without_credentials


def fail_fast_http() -> None:
    """Fail within seconds instead of MLflow's default minutes of HTTP retries (4 min for a server that is down)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@contextmanager
def server_errors(uri: str, experiment: str, access: str = "write to", outcome: str = "Nothing was trained."):
    """Turn what a tracking server answers at start-up into one clear :class:`ClipqaError` (exit status 2, before
    any training): no or wrong login (HTTP 401), no permission on the experiment (HTTP 403), server unreachable.
    ``access`` / ``outcome``: what the command needed and what it did not do (clipqa-report reads, writes nothing).

    MLflow's client does not retry 401/403, so a bad login is reported within a second (the tests time it).
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        shown = without_credentials(uri)
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")  # a name, not a secret: the messages show it
        has_password = bool(os.environ.get("MLFLOW_TRACKING_PASSWORD"))
        if e.error_code == "UNAUTHENTICATED":
            if user and has_password:
                why = f"did not accept user {user!r} with the password in MLFLOW_TRACKING_PASSWORD (HTTP 401)"
            else:
                names = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": has_password}
                unset = [n for n, v in names.items() if not v]
                verb = "are" if len(unset) > 1 else "is"
                why = f"asks for a login (HTTP 401), but {' and '.join(unset)} {verb} not set"
            raise ClipqaError(
                f"The MLflow tracking server {shown} <tracking.uri> {why}. Fix: set the environment variables "
                "MLFLOW_TRACKING_USERNAME (your MLflow user name) and MLFLOW_TRACKING_PASSWORD (its password; the "
                f"server's admin creates accounts). {outcome}"
            ) from None
        if e.error_code == "PERMISSION_DENIED":
            raise ClipqaError(
                f"The MLflow tracking server {shown} <tracking.uri> refused user {user or '(none)'!r} access to "
                f"experiment {experiment!r} <tracking.experiment> (HTTP 403): the user has no permission to {access} "
                "it. Fix: ask the experiment's owner or the server's admin for EDIT permission on it, or log to an "
                f"experiment of your own with tracking.experiment=NAME. {outcome}"
            ) from None
        if "failed with exception" in str(e):  # MLflow's wording for a connection that failed (no HTTP answer)
            raise ClipqaError(
                f"Cannot reach the MLflow tracking server {shown} <tracking.uri>: {_first_line(e)}. Start it (or fix "
                f"tracking.uri), or train without tracking: tracking=none. {outcome}"
            ) from None
        raise


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


@contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """SQLite stores: one process at a time sets the database up. Why: MLflow creates and migrates a new database's
    schema on its first use, and two processes doing that at once fail inside MLflow (``Online migration expected to
    match one row``, ``duplicate column name``): two single runs or two sweep workers started together on a fresh
    ``mlflow.db``. A file lock beside the database (``<db>.lock``) serializes that first use; servers need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import filelock

    with filelock.FileLock(uri[len("sqlite:///") :] + ".lock", timeout=300):
        yield


def get_or_create_experiment(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException:  # created by a concurrent process in the meantime
        return client.get_experiment_by_name(name).experiment_id
