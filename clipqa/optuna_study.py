"""Optuna helpers shared by the sweeper plugin (hydra_plugins/clipqa_optuna_sweeper) and the jobs it launches.

The sweeper hands each job its trial as :class:`TrialJob`, JSON in the environment variable ``CLIPQA_OPTUNA_TRIAL``
(set through Hydra's ``hydra.job.env_set`` while the job runs, with any launcher; not a config override, so
``hydra.job.override_dirname`` and ``overrides.yaml`` stay the user's). The job side:

- any Hydra app: ``trial = current_trial()`` (None outside the sweeper) gives the running ``optuna.Trial``, for
  ``trial.report(value, step)`` and ``trial.should_prune()``;
- clipqa's ``train.py``: :meth:`TrialJob.pruning_callback` reports val/acc after each validation and raises
  ``optuna.TrialPruned`` when the pruner says so; :func:`objective` picks what the job returns
  (``hydra.sweeper.metric_names``, default val/acc).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clipqa.errors import ClipqaError
from clipqa.metrics import OBJECTIVE
from clipqa.paths import absolute_sqlite, project_sqlite

log = logging.getLogger(__name__)

TRIAL_ENV = "CLIPQA_OPTUNA_TRIAL"


def default_storage() -> str:
    return project_sqlite("optuna.db")


def absolute_storage_url(url: str) -> str:
    """A storage URL every job can open, whatever its working directory (``hydra.job.chdir=true``): relative
    ``sqlite:///`` and ``journal:///`` paths made absolute against the working directory; other URLs unchanged."""
    if url.startswith("journal://"):
        return f"journal://{Path(url[len('journal://') :]).expanduser().resolve()}"
    return absolute_sqlite(url)


def make_storage(url: str | None):
    """An Optuna storage from a URL: any RDB URL (sqlite:///..., postgresql://...) or ``journal:///path/file.log``.

    A relative sqlite path is made absolute, so every job of a sweep opens the same file.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = absolute_storage_url(url or default_storage())
    if url.startswith("journal://"):
        path = Path(url[len("journal://") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        )
    except Exception as e:
        raise ClipqaError(
            f"Cannot open the Optuna storage {url!r} (hydra.sweeper.storage): {e}. Use sqlite:///PATH.db, "
            "journal:///PATH.log or a database URL such as postgresql://user:pw@host/db."
        ) from None


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
    storage: str | None  # absolute URL; None: an in-memory study, which a job cannot reach
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
        study = optuna.load_study(study_name=self.study_name, storage=make_storage(self.storage), pruner=pruner)
        return optuna.trial.Trial(study, self.trial_id)

    def pruning_callback(self):
        """``on_validation(val_acc, step)`` for :func:`clipqa.run.train`, reporting to this trial; None when the study
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
