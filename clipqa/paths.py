"""Where things are: the project folder, config folders named from any working directory, absolute SQLite URLs."""

from __future__ import annotations

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]  # holds conf/, sweeps/ and the default mlflow.db / optuna.db
CONF_DIR = PROJECT_DIR / "conf"


def config_dir(folder: str) -> Path:
    """A ``-cd`` folder: as given if it exists from the working directory, else the project's folder of that name.

    So ``python train.py -cd sweeps -cn paper`` (and ``clipqa-cache -cd sweeps``) work from any working directory.
    """
    given = Path(folder).expanduser()
    if not given.is_dir() and not given.is_absolute() and (PROJECT_DIR / folder).is_dir():
        return PROJECT_DIR / folder
    return given.resolve()


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
