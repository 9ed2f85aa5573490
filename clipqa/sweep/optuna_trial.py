"""clipqa's side of an Optuna trial: its default study, and what ``train.py`` reports and returns.

The trial API itself is the sweeper plugin's (:mod:`hydra_plugins.clipqa_optuna_sweeper.trial`, for any Hydra
app): :class:`TrialJob` is what a job launched by ``hydra/sweeper=clipqa_optuna`` knows about its trial. What is
clipqa's is here:

- the default study: ``sqlite:///<project folder>/optuna.db``, study ``clipqa`` (given to the sweeper by
  :class:`clipqa.sweep.optuna_hooks.MlflowStudyHooks`);
- :func:`pruning_callback`: train.py reports val/acc (:data:`clipqa.metrics.OBJECTIVE`) after each validation, and
  stops when the pruner says so;
- :func:`objective`: what train.py returns, val/acc or the metrics named by ``hydra.sweeper.metric_names`` (keys of
  the run's metrics.json), a ClipqaError naming the key when one is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipqa.errors import ClipqaError
from clipqa.metrics import OBJECTIVE
from clipqa.paths import project_sqlite
from hydra_plugins.clipqa_optuna_sweeper.trial import TrialJob
from hydra_plugins.clipqa_optuna_sweeper.trial import objective as pick_objective

STUDY_NAME = "clipqa"

__all__ = ["STUDY_NAME", "TrialJob", "default_storage", "objective", "objective_names", "pruning_callback"]


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
