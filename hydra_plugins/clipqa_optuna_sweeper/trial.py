"""The job side: what a Hydra job launched by this sweeper knows about its Optuna trial, for any Hydra app.

The sweeper hands each job its trial as :class:`TrialJob`, JSON in the environment variable ``CLIPQA_OPTUNA_TRIAL``
(set through Hydra's ``hydra.job.env_set`` while the job runs, with any launcher; not a config override, so
``hydra.job.override_dirname`` and ``overrides.yaml`` stay the user's). In the job::

    from hydra_plugins.clipqa_optuna_sweeper.trial import TrialJob, current_trial

    trial = current_trial()          # the running optuna.Trial, or None (not launched by the sweeper, in memory)
    trial.report(value, step)        # and stop when trial.should_prune(): raise optuna.TrialPruned

    job = TrialJob.from_env()        # number, study name, storage, pruner, metric names (None outside the sweeper)
    report = job.pruning_callback("val/acc")   # report(value, step): reports, raises optuna.TrialPruned
    return objective(metrics, job.metric_names or ["val/acc"])  # what to return: one float or a tuple

The job reaches its trial through the study's storage (a database or journal file), so an in-memory study
(``hydra.sweeper.storage=null``) gives no trial to its jobs: they cannot be pruned.
"""

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ._storage import make_storage, shown_url

log = logging.getLogger(__name__)

TRIAL_ENV = "CLIPQA_OPTUNA_TRIAL"
# The storage URL as given (a password included), for the jobs: the sweeper sets it in its own environment, which
# its jobs inherit (in-process, joblib's workers, SLURM jobs); files and logs only ever see the URL without it.
STORAGE_ENV = "CLIPQA_OPTUNA_STORAGE"


def make_pruner(p: Mapping[str, Any]):
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
    metric_names: list[str] | None = None  # hydra.sweeper.metric_names: the objectives the job returns, in order

    def to_env(self) -> str:
        """JSON without ``'`` or ``$`` (a Hydra quoted string, never an OmegaConf interpolation)."""
        return json.dumps(asdict(self)).replace("'", "\\u0027").replace("$", "\\u0024")

    @classmethod
    def from_env(cls) -> "TrialJob | None":
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

    def pruning_callback(self, metric: str) -> Callable[[float, int], None] | None:
        """``report(value, step)``: reports ``metric``'s value to this trial and raises ``optuna.TrialPruned`` when the
        pruner says so. None when the study is not pruned on ``metric``: pruner off, a multi-objective study, an
        objective named otherwise (``hydra.sweeper.metric_names``), or an in-memory study."""
        import optuna

        names = self.metric_names or [metric]
        if self.pruner is None or self.pruner["name"] == "none" or names != [metric]:
            if names != [metric]:
                log.info("trial %d: not pruned (the objective is %s, not %s)", self.number, names, metric)
            return None
        trial = self.trial()
        if trial is None:
            return None

        def report(value: float, step: int) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"trial {self.number} pruned at step {step} ({metric} {value:.4f})")

        return report


def current_trial():
    """The ``optuna.Trial`` of this job when the clipqa_optuna sweeper launched it (else None): any Hydra app can
    ``trial.report(value, step)`` and stop when ``trial.should_prune()`` (raise ``optuna.TrialPruned``)."""
    job = TrialJob.from_env()
    return job.trial() if job else None


def objective(metrics: Mapping[str, Any], names: list[str]) -> float | tuple[float, ...]:
    """What a job returns to the sweeper, picked from its ``metrics`` by name: one float, or a tuple for several
    objectives (in the order of ``hydra.sweeper.metric_names``). A LookupError names the missing metrics and the
    numeric ones there are."""
    missing = [n for n in names if n not in metrics]
    if missing:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool))
        raise LookupError(
            f"hydra.sweeper.metric_names names {missing}, which this run's metrics do not hold; name objectives "
            f"among: {', '.join(numeric)}"
        )
    values = tuple(float(metrics[n]) for n in names)
    return values[0] if len(values) == 1 else values
