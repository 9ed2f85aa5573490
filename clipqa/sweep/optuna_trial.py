"""clipqa's side of an Optuna trial: its default study, and what ``train.py`` reports and returns.

The trial API itself is the sweeper plugin's (:mod:`hydra_plugins.clipqa_optuna_sweeper.trial`, for any Hydra
app): :class:`TrialJob` is what a job launched by ``hydra/sweeper=clipqa_optuna`` knows about its trial. What is
clipqa's is here:

- the default study: ``sqlite:///<project folder>/optuna.db``, study ``clipqa`` (given to the sweeper by
  :class:`clipqa.sweep.optuna_hooks.MlflowStudyHooks`);
- :func:`pruning_callback`: train.py reports val/acc (:data:`clipqa.metrics.OBJECTIVE`) after each validation, and
  stops when the pruner says so;
- :func:`objective`: what train.py returns, val/acc or the metrics named by ``hydra.sweeper.metric_names`` (keys of
  the run's metrics.json), a ClipqaError naming the key when one is missing;
- :func:`record_run`: the job's MLflow run id on its trial (user attribute ``mlflow_run_id``) as soon as the run
  exists, so a worker that reaps the trial (its sweeper died) ends that run without searching for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clipqa.errors import ClipqaError
from clipqa.metrics import OBJECTIVE
from clipqa.paths import project_sqlite
from clipqa.sweep.reaping import RUN_ID_ATTR
from hydra_plugins.clipqa_optuna_sweeper.trial import TrialJob
from hydra_plugins.clipqa_optuna_sweeper.trial import objective as pick_objective

log = logging.getLogger(__name__)

STUDY_NAME = "clipqa"

__all__ = [
    "STUDY_NAME", "TrialJob", "default_storage", "objective", "objective_names", "pruning_callback", "record_run"
]  # fmt: skip


def default_storage() -> str:
    """One study store for every sweep, whatever the working directory."""
    return project_sqlite("optuna.db")


def objective_names(job: TrialJob | None) -> list[str]:
    """The metrics train.py returns: ``hydra.sweeper.metric_names``, else val/acc."""
    return (job.metric_names if job else None) or [OBJECTIVE]


def pruning_callback(job: TrialJob | None) -> Callable[[float, int], None] | None:
    """``on_validation(val_acc, step)`` for :func:`clipqa.training.run.train`, reporting to the job's trial; None
    outside the sweeper, or when the study is not pruned on val/acc (pruner off, several objectives, another one)."""
    return job.pruning_callback(OBJECTIVE) if job is not None else None


def objective(metrics: dict[str, Any], job: TrialJob | None) -> float | tuple[float, ...]:
    """What train.py returns to a sweeper: val/acc, or the metrics named by ``hydra.sweeper.metric_names`` (a tuple
    for a multi-objective study)."""
    try:
        return pick_objective(metrics, objective_names(job))
    except LookupError as e:
        raise ClipqaError(
            f"{e} (keys of the run's metrics.json, e.g. hydra.sweeper.metric_names=[val/acc,params/trainable])."
        ) from None


@contextmanager
def record_run(job: TrialJob | None, output_dir: str | Path, poll_s: float = 0.2) -> Iterator[None]:
    """While the job trains: as soon as its run folder names its MLflow run (``mlflow_run_id.txt``, written right
    after the run is created or continued), that id becomes the trial's user attribute ``mlflow_run_id``. Nothing
    outside the sweeper, for an in-memory study, or without tracking. A failed write is logged (the reaper then
    finds the run by its tags)."""
    if job is None or job.storage is None:
        yield
        return
    from clipqa.training.run import RUN_ID_FILE  # (training loads torch: not at the sweeper's import)

    path, stop = Path(output_dir) / RUN_ID_FILE, threading.Event()  # a resumed run's file is there at once

    def watch() -> None:
        while True:
            if path.is_file() and (run_id := path.read_text().strip()):
                try:
                    job.trial().set_user_attr(RUN_ID_ATTR, run_id)
                except Exception as e:
                    log.warning("could not note MLflow run %s on trial %d: %s", run_id, job.number, e)
                return
            if stop.wait(poll_s):
                return

    thread = threading.Thread(target=watch, name="clipqa-record-run", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
