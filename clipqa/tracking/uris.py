"""Where runs are tracked: the tracking URI (flag or ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the
project's SQLite store) and its artifact folder.

Credentials never live in a URI: a URI with a user name or password is refused (and scrubbed from the files Hydra
already wrote); they come only from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from clipqa.errors import ClipqaError
from clipqa.paths import absolute_sqlite, project_sqlite

ENV_URI = "MLFLOW_TRACKING_URI"


def resolve_uri(uri: str | None, key: str = "tracking.uri", must_exist: bool = False) -> str:
    """The one rule for every entry point: ``uri`` (``key``: ``tracking.uri`` or ``--tracking-uri``), else
    ``$MLFLOW_TRACKING_URI`` (MLflow's convention), else the project's SQLite store; a relative ``sqlite:///`` path
    is made absolute (cwd-independent).

    A URI with credentials (``http://user:secret@host``), from either source, is refused: it would stay in Hydra's
    ``.hydra/overrides.yaml``, ``config.yaml`` and the MLflow params; credentials come from the environment.
    ``must_exist`` (the read-only tools: clipqa-eval, -predict, -report): a SQLite store that is not there is an
    error, rather than an empty database created by opening it.
    """
    env = os.environ.get(ENV_URI) or None
    if not uri:
        uri, source = env, f"${ENV_URI}" if env else "the project's default"
    else:  # conf/tracking/mlflow.yaml reads the variable into tracking.uri: name where the value came from
        source = f"{key} (from ${ENV_URI})" if uri == env else key
    if uri and without_credentials(uri) != uri:
        scrub_hydra_files(uri)
        fix = f"{key}={without_credentials(uri)}" if source == key else f"export {ENV_URI}={without_credentials(uri)}"
        raise ClipqaError(
            f"{source} has a user name or password in it (a URI like "
            f"{_with_placeholders(uri)}): config.yaml, Hydra's .hydra/ files and the MLflow params would keep them, so "
            f"clipqa refuses it. Fix: use {fix} and put the credentials in the "
            "environment variables MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
        )
    resolved = absolute_sqlite(uri) if uri else project_sqlite("mlflow.db")
    if must_exist and resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///") :]).is_file():
        raise ClipqaError(
            f"No MLflow store at {resolved} (from {source}): nothing was tracked there. Fix: pass {key} with the store "
            f"your training used, or export {ENV_URI}=... (e.g. http://host:5000 or sqlite:////path/to/mlflow.db)."
        )
    return resolved


def scrub_hydra_files(uri: str) -> None:
    """Replace ``uri`` by its credential-free form in the files Hydra wrote before the run started (the run's or
    the sweep's ``.hydra/*.yaml`` and ``multirun.yaml``): a refused URI must not stay on disk."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    folders = {Path(hc.sweep.dir)} if hc.mode == RunMode.MULTIRUN else set()
    if output_dir := OmegaConf.select(hc, "runtime.output_dir"):
        folders.add(Path(output_dir))
    for folder in folders:
        for f in [*folder.glob("*.yaml"), *folder.glob(".hydra/*.yaml"), *folder.glob("*.log")]:
            text = f.read_text(errors="replace")
            if uri in text:
                f.write_text(text.replace(uri, without_credentials(uri)))


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def _with_placeholders(uri: str) -> str:
    """``http://bob:secret@host`` -> ``http://USER:PASSWORD@host``: the shape of a refused URI, without its secret."""
    scheme, _, rest = without_credentials(uri).partition("://")
    return f"{scheme}://USER:PASSWORD@{rest}"


def without_credentials(uri: str) -> str:
    """``http://user:secret@host`` -> ``http://host``: credentials come from the environment, never from files."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


@contextmanager
def process_wide(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to ``uri`` inside (the fluent API, ``models:/`` URIs and
    ``pyfunc.log_model`` follow them), and everything as before after, ``$MLFLOW_TRACKING_URI`` and
    ``$MLFLOW_REGISTRY_URI`` included: ``mlflow.set_tracking_uri`` also writes the variable, so restoring only the
    URI left the variable pointing at the store the block used (the next ``clipqa-eval`` in the same process then
    read that store instead of the user's)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    saved = {k: os.environ.get(k) for k in (ENV_URI, "MLFLOW_REGISTRY_URI")}
    # What was set explicitly (None: nothing, follow the environment). MLflow has no public getter for that:
    # get_tracking_uri() resolves the default, and setting that back would pin the process to it for good.
    previous = getattr(tracking, "_tracking_uri", None), getattr(registry, "_registry_uri", None)
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
