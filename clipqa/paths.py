"""Where things are: the project folder, its config tree (conf/), absolute SQLite URLs."""

from __future__ import annotations

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]  # holds conf/ and the default mlflow.db / optuna.db
CONF_DIR = PROJECT_DIR / "conf"


def project_sqlite(filename: str) -> str:
    """``sqlite:///<project folder>/<filename>``: one store for every run, whatever the working directory."""
    return f"sqlite:///{PROJECT_DIR / filename}"


def absolute_sqlite(url: str) -> str:
    """A relative ``sqlite:///path`` made absolute against the working directory; other URLs unchanged.

    Every job of a sweep then opens the same file, even with ``hydra.job.chdir=true``.
    """
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{Path(url[len('sqlite:///') :]).resolve()}"
    return url
