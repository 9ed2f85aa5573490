"""clipqa's extras for the Optuna sweeper (hydra/sweeper=clipqa_optuna), attached through the plugin's hooks.

Registered by the named Optuna sweeps (conf/sweep/optuna.yaml, conf/sweep/optuna_tradeoff.yaml)::

    hydra:
      sweeper:
        hooks:
          - _target_: clipqa.sweep.optuna_hooks.MlflowStudyHooks

What they add to a sweep of train.py: the project's study (``sqlite:///<project folder>/optuna.db``, study
``clipqa``, objective ``val/acc``) where the sweep leaves them null; the study named on the sweep's MLflow parent run
(so its report covers every worker of a shared study); the best trial (or the Pareto front) tagged in MLflow with the
sweeper's files logged on the parent; and the parent run ended FAILED with the sweeper's message when it stops with
an error; and what a dead worker (or a job lost on the cluster) left RUNNING ended KILLED by whichever worker reaps
its trials (:mod:`clipqa.sweep.reaping`). The MLflow side is :mod:`clipqa.sweep.mlflow_parent`.

Without them (``python train.py -m hydra/sweeper=clipqa_optuna ...`` without ``sweep=optuna``) the sweep still
runs, as for any app: an in-memory study (no resume, no pruning in the jobs), no best-trial tags; the MLflow parent
run is still closed by :class:`clipqa.sweep.mlflow_parent.MlflowSweepCallback` (FINISHED with its report, or
FAILED at exit), which warns at the start that the hooks are missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from clipqa.metrics import OBJECTIVE
from clipqa.sweep.mlflow_parent import fail_sweep, mark_best_trial, mark_pareto_front, mark_study
from clipqa.sweep.optuna_trial import STUDY_NAME, default_storage
from clipqa.sweep.reaping import PARENT_ATTR, reap
from clipqa.tracking.run_info import read_parent
from hydra_plugins.clipqa_optuna_sweeper.errors import SweeperError
from hydra_plugins.clipqa_optuna_sweeper.hooks import Results, Study, SweepHooks

log = logging.getLogger(__name__)


class MlflowStudyHooks(SweepHooks):
    """clipqa's defaults for the study, and its MLflow tags (a no-op with ``tracking=none``)."""

    def defaults(self, config: DictConfig, directions: list[str]) -> dict[str, Any]:
        names = OmegaConf.select(config, "hydra.sweeper.metric_names")
        if names is None and len(directions) > 1:
            raise SweeperError(
                f"hydra.sweeper.direction has {len(directions)} objectives: name them with "
                "hydra.sweeper.metric_names (keys of a run's metrics.json, which train.py then returns), e.g. "
                "hydra.sweeper.direction=[maximize,minimize] hydra.sweeper.metric_names=[val/acc,params/trainable]."
            )
        return {"storage": default_storage(), "study_name": STUDY_NAME, "metric_names": [OBJECTIVE]}

    def on_study_start(self, study: Study) -> None:
        # each worker's MLflow parent run names the study, so its report can cover all of the study
        mark_study(study.config, study.name, study.storage)

    def on_trial_start(self, study: Study, trial: Any) -> None:
        # the sweep's parent run on the trial: a worker that reaps it, if this one dies, ends that parent too
        if (parent := _parent(study.config)) is not None:
            trial.set_user_attr(PARENT_ATTR, parent["run_id"])

    def on_trial_reaped(self, study: Study, trial: Any, reason: str) -> None:
        """End the trial's MLflow run (and its dead worker's parent) KILLED, tagged ``clipqa.reaped_by``. The server
        away (restarting): kept, and tried again at this worker's next hook call."""
        self._pending = [*getattr(self, "_pending", []), (trial, reason)]
        self._reap_pending(study)

    def _reap_pending(self, study: Study) -> None:
        if not getattr(self, "_pending", None) or (parent := _parent(study.config)) is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=parent["uri"])
        for trial, reason in list(self._pending):
            try:
                own = client.get_run(parent["run_id"])
                note = f"{reason} (sweep {study.sweep_dir})"
                reap(client, study.study, trial, note, parent["run_id"], [own.info.experiment_id])
                self._pending.remove((trial, reason))
            except Exception as e:  # the tracking server is away: next time
                log.warning("could not end trial %d's MLflow runs yet: %s", trial.number, str(e).splitlines()[0])
                return

    def on_trial_end(self, study: Study, trial: Any, reason: str | None) -> None:
        self._reap_pending(study)

    def on_sweep_end(self, study: Study, results: Results) -> None:
        self._reap_pending(study)
        if results.best is not None:
            metric = (study.metric_names or ["value"])[0]
            best = results.best
            mark_best_trial(study.config, study.name, best.number, best.value, metric, results.files)
        elif results.front:
            front = [(t.number, list(t.values)) for t in results.front]
            mark_pareto_front(study.config, study.name, front, study.metric_names, results.files)

    def on_sweep_failed(self, config: DictConfig, error: str) -> None:
        fail_sweep(config, error)  # Hydra skips on_multirun_end when a sweeper raises


def _parent(config: DictConfig) -> dict | None:
    """This sweep's MLflow parent (run id, uri), or None without tracking (no network call)."""
    if OmegaConf.select(config, "tracking.backend", default="none") == "none":
        return None
    return read_parent(str(Path(config.hydra.sweep.dir).resolve()))
