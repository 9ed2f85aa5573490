"""A Hydra multirun in MLflow: its parent run, the comparison report at its end, and an Optuna study's best trial.

:class:`MlflowSweepCallback` is registered in ``conf/config.yaml`` under ``hydra.callbacks``; the Optuna sweeper
calls :func:`mark_best_trial`. Per-run tracking (what the training loop logs) is :mod:`clipqa.tracking`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from clipqa.report import make_report
from clipqa.tracking import (
    NOT_VARIANT_PREFIXES,
    PARENT_FILE,
    MlflowTracker,
    git_commit,
    override_key,
    read_parent,
    resolve_uri,
)

log = logging.getLogger(__name__)


class MlflowSweepCallback(Callback):
    """Hydra callback: a parent MLflow run per multirun, created before any job starts; closed at the end.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks``. The sweep's comparison report is written into the
    sweep folder and logged as artifacts of the parent run.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if config.tracking.backend == "none":
            return
        overrides = list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
        swept += [override_key(k) for k in (config.hydra.sweeper.get("params") or {})]  # sweeps/*.yaml, Optuna
        uri = resolve_uri(config.tracking.uri)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        existing = read_parent(str(sweep_dir))
        if existing and existing["uri"] == uri:  # the sweep is being re-run (resumed): keep its parent run
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).update_run(existing["run_id"], status="RUNNING")
            log.info("continuing the sweep's MLflow parent run %s", existing["run_id"])
            return
        shown = [o for o in overrides if not override_key(o).startswith(NOT_VARIANT_PREFIXES)]
        name = "sweep: " + (" ".join(shown) or "defaults")
        tags = {"clipqa.sweep": "true", "clipqa.overrides": " ".join(overrides)}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        parent = MlflowTracker(uri, config.tracking.experiment, name, tags)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(json.dumps({"run_id": parent.run_id, "uri": uri, "swept": swept}))
        parent.set_tags({"hydra.sweep.dir": str(sweep_dir)})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend == "none":
            return
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        parent = read_parent(str(sweep_dir))
        if parent is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=parent["uri"])
        run = client.get_run(parent["run_id"])
        try:
            out = sweep_dir / "report"
            make_report(parent["uri"], experiment_id=run.info.experiment_id, parent_run_id=parent["run_id"], out=out)
            for f in sorted(out.iterdir()):
                client.log_artifact(parent["run_id"], str(f), "report")
            log.info("sweep report: %s", out / "report.md")
        except Exception as e:  # a report problem must not hide the sweep's results
            log.warning("could not write the sweep report: %s", e)
        children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent['run_id']}'")
        failed = [c for c in children if c.info.status != "FINISHED"]
        client.set_tag(parent["run_id"], "clipqa.jobs", f"{len(children) - len(failed)}/{len(children)} finished")
        client.set_terminated(parent["run_id"], status="FAILED" if failed else "FINISHED")


def mark_best_trial(config: DictConfig, number: int, value: float) -> None:
    """Tag the MLflow run of an Optuna study's best trial (``clipqa.best_trial``) and note it on the parent run."""
    if config.tracking.backend == "none":
        return
    parent = read_parent(str(Path(config.hydra.sweep.dir).resolve()))
    if parent is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=parent["uri"])
    exp_id = client.get_run(parent["run_id"]).info.experiment_id
    runs = client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{parent['run_id']}' and tags.`optuna.trial` = '{number}'"
    )
    for run in runs:
        client.set_tag(run.info.run_id, "clipqa.best_trial", "true")
    client.set_tag(parent["run_id"], "clipqa.best_trial", f"trial {number}: val/acc {value:.4f}")
