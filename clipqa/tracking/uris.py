"""Where runs are tracked: the tracking URI (default: the project's SQLite store) and its artifact folder.

Credentials never live in a URI: a URI with a user name or password is refused (and scrubbed from the files Hydra
already wrote); they come only from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from clipqa.errors import ClipqaError
from clipqa.paths import absolute_sqlite, project_sqlite


def resolve_uri(uri: str | None) -> str:
    """``None`` -> the project's SQLite store; a relative ``sqlite:///`` path -> absolute (cwd-independent).

    A URI with credentials (``http://user:secret@host``) is refused: the override would stay in Hydra's
    ``.hydra/overrides.yaml``, ``config.yaml`` and the MLflow params; credentials come from the environment.
    """
    if uri and without_credentials(uri) != uri:
        scrub_hydra_files(uri)
        raise ClipqaError(
            "tracking.uri (or $MLFLOW_TRACKING_URI) has a user name or password in it (a URI like "
            f"{_with_placeholders(uri)}): config.yaml, Hydra's .hydra/ files and the MLflow params would keep them, so "
            f"clipqa refuses it. Fix: use tracking.uri={without_credentials(uri)} and put the credentials in the "
            "environment variables MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
        )
    return absolute_sqlite(uri) if uri else project_sqlite("mlflow.db")


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
