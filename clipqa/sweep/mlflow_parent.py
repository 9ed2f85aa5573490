"""A Hydra multirun in MLflow: its parent run, the comparison report at its end, and an Optuna study's best trial.

Every multirun leaves its report in ``<sweep dir>/report/``: a tracked one from its MLflow runs (also logged on the
parent run), one with tracking off (``tracking=none``, ``experiment=smoke``) from its job folders
(:func:`clipqa.report.comparison.make_folder_report`).

:class:`MlflowSweepCallback` is registered in ``conf/config.yaml`` under ``hydra.callbacks``; the Optuna sweeper's
hooks (:class:`clipqa.sweep.optuna_hooks.MlflowStudyHooks`) call :func:`mark_study` at its start,
:func:`mark_best_trial` / :func:`mark_pareto_front` at its end (and :func:`fail_sweep` when it stops with an error).

An Optuna study worked on by several sweeper processes (or resumed by later sweeps) has one parent run per sweep
process; each parent is tagged with the study (``clipqa.optuna_study``, ``clipqa.optuna_storage``), and the report
written at the end of each sweep covers every trial run of the study, under any of those parents: the last worker to
finish writes the report of the whole study.
Per-run tracking (what the training loop logs) is :mod:`clipqa.tracking.tracker`.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from clipqa.errors import ClipqaError
from clipqa.metrics import OBJECTIVE
from clipqa.report.comparison import make_folder_report, make_report
from clipqa.tracking.preflight import server_errors
from clipqa.tracking.run_info import NOT_VARIANT_PREFIXES, PARENT_FILE, git_commit, override_key, read_parent
from clipqa.tracking.tracker import MlflowTracker
from clipqa.tracking.uris import resolve_uri

log = logging.getLogger(__name__)


class MlflowSweepCallback(Callback):
    """Hydra callback: a parent MLflow run per multirun, created before any job starts; closed at the end.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks``. The sweep's comparison report is written into the
    sweep folder and logged as artifacts of the parent run; with tracking off, there is no parent run and the report
    is made from the job folders.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _warn_without_optuna_hooks(config)
        try:  # the tracking preflight (login, permission, credentials in tracking.uri): exit 2 before any job
            self._start_parent(config)
        except ClipqaError as e:  # (Hydra would turn the exception into a warning and run every job anyway)
            log.error("clipqa: error: %s", e)
            sys.exit(2)
        # Hydra's basic sweeper raises as soon as it reads a failed job's result, and then skips on_multirun_end:
        # without this the parent run would stay RUNNING with no report. At exit, a sweep that did not reach its end
        # is closed here (FAILED, with the report of the jobs that ran); one that did is left alone.
        self._ended = False
        atexit.register(self._close_if_unended, config)

    def _close_if_unended(self, config: DictConfig) -> None:
        if self._ended:
            return
        if config.tracking.backend == "none":
            log.warning("the sweep stopped before its end (a job failed?): the report covers the jobs that finished")
            _folder_report(config)
            return
        if (found := _parent_client(config)) is None:
            return
        client, run_id, _ = found
        if client.get_run(run_id).info.status != "RUNNING":  # the Optuna sweeper closed it (fail_sweep)
            return
        log.warning("the sweep stopped before its end (a job failed?): closing its MLflow parent run as FAILED")
        self._end(config, error="the sweep stopped before all of its jobs ran (see the sweep command's output)")

    def _start_parent(self, config: DictConfig) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if config.tracking.backend == "none":
            return
        overrides = list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
        swept += [override_key(k) for k in (config.hydra.sweeper.get("params") or {})]  # conf/sweep/*.yaml, Optuna
        uri = resolve_uri(config.tracking.uri)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        existing = read_parent(str(sweep_dir))
        if existing and existing["uri"] == uri:  # the sweep is being re-run (resumed): keep its parent run
            from mlflow.tracking import MlflowClient

            with server_errors(uri, config.tracking.experiment):
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
        self._ended = True
        self._end(config)

    def _end(self, config: DictConfig, error: str | None = None) -> None:
        """Write the report of the sweep's jobs and close the parent run (FAILED if a job failed or ``error``); with
        tracking off, the report of its job folders."""
        if config.tracking.backend == "none":
            _folder_report(config)
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
            runs = _study_runs(client, run)
            if runs is None:  # this sweep's jobs
                make_report(
                    parent["uri"], experiment_id=run.info.experiment_id, parent_run_id=parent["run_id"], out=out
                )
            else:  # an Optuna study shared with other sweeps: all of its trials
                ids = ", ".join(f"'{r}'" for r in runs)
                make_report(
                    parent["uri"], experiment_id=run.info.experiment_id, filter_string=f"attributes.run_id IN ({ids})",
                    out=out, sweep_run_id=parent["run_id"],
                )  # fmt: skip
            for f in sorted(out.iterdir()):
                client.log_artifact(parent["run_id"], str(f), "report")
            log.info("sweep report: %s", out / "report.md")
        except Exception as e:  # a report problem must not hide the sweep's results
            log.warning("could not write the sweep report: %s", e)
        _close_parent(client, parent["run_id"], run.info.experiment_id, error=error)


def _folder_report(config: DictConfig) -> None:
    """The report of an untracked sweep, from its job folders, into ``<sweep dir>/report/``."""
    sweep_dir = Path(config.hydra.sweep.dir).resolve()
    try:
        out = sweep_dir / "report"
        make_folder_report(sweep_dir, out)
        log.info("sweep report: %s (from the job folders: tracking is off <tracking.backend=none>)", out / "report.md")
    except Exception as e:  # a report problem must not hide the sweep's results
        log.warning("could not write the sweep report: %s", e)


STUDY_TAG, STORAGE_TAG = "clipqa.optuna_study", "clipqa.optuna_storage"
OPTUNA_HOOKS = "clipqa.sweep.optuna_hooks.MlflowStudyHooks"


def _warn_without_optuna_hooks(config: DictConfig) -> None:
    """hydra/sweeper=clipqa_optuna picked without the named sweep: clipqa's study and MLflow tags are missing."""
    hooks = config.hydra.sweeper.get("hooks")  # only the Optuna sweeper's schema has the key
    if hooks is not None and not any(h.get("_target_") == OPTUNA_HOOKS for h in hooks):
        log.warning(
            "hydra/sweeper=clipqa_optuna without clipqa's hooks (hydra.sweeper.hooks): the study is in memory "
            "unless hydra.sweeper.storage is set, and MLflow gets no best-trial tags. Use sweep=optuna (or "
            "sweep=optuna_tradeoff), or add 'hydra.sweeper.hooks=[{_target_:%s}]'",
            OPTUNA_HOOKS,
        )


def _study_runs(client, parent) -> list[str] | None:
    """The runs of all trials of the parent's Optuna study, under every sweep parent of that study (workers that ran
    alongside, earlier sweeps of a resumed study); None when the parent is not an Optuna study's or is its only
    sweep (then the report is the parent's children, as for any multirun)."""
    study, storage = parent.data.tags.get(STUDY_TAG), parent.data.tags.get(STORAGE_TAG)
    if study is None or storage is None or "'" in study + storage:  # (a quote cannot be searched for)
        return None
    exp = parent.info.experiment_id
    parents = client.search_runs([exp], f"tags.`{STUDY_TAG}` = '{study}' and tags.`{STORAGE_TAG}` = '{storage}'")
    if len(parents) < 2:
        return None
    ids = []
    for p in parents:
        children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{p.info.run_id}'", max_results=50000)
        ids += [c.info.run_id for c in children]
    return ids or None


def mark_study(config: DictConfig, study_name: str, storage: str) -> None:
    """Name the Optuna study on the sweep's parent run (``storage`` without credentials), so that the end-of-sweep
    report covers every sweep that worked on the study."""
    if (found := _parent_client(config)) is not None:
        client, parent_id, _ = found
        client.set_tag(parent_id, STUDY_TAG, study_name)
        client.set_tag(parent_id, STORAGE_TAG, storage)


def job_counts(children: list) -> dict[str, int]:
    """The sweep's jobs by outcome: finished, pruned (an Optuna trial stopped by its pruner: KILLED with tag
    ``clipqa.pruned=true``, the sweeper working as meant) and failed (anything else: FAILED, KILLED, still RUNNING)."""
    finished = sum(c.info.status == "FINISHED" for c in children)
    pruned = sum(c.info.status == "KILLED" and c.data.tags.get("clipqa.pruned") == "true" for c in children)
    return {"finished": finished, "pruned": pruned, "failed": len(children) - finished - pruned}


def _close_parent(client, run_id: str, experiment_id: str, error: str | None = None) -> None:
    """End the parent run: FINISHED unless a job failed (or the sweep stopped with ``error``); tags
    ``clipqa.jobs`` ("6 jobs: 4 finished, 2 pruned, 0 failed") and ``clipqa.failed_jobs``."""
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    n = job_counts(children)
    summary = f"{len(children)} jobs: {n['finished']} finished, {n['pruned']} pruned, {n['failed']} failed"
    client.set_tag(run_id, "clipqa.jobs", summary)
    client.set_tag(run_id, "clipqa.failed_jobs", str(n["failed"]))
    if error:
        client.set_tag(run_id, "clipqa.error", error[:5000])
    client.set_terminated(run_id, status="FAILED" if n["failed"] or error else "FINISHED")


def _parent_client(config: DictConfig):
    """(MlflowClient, parent run id, experiment id) of this sweep, or None (no tracking, or no parent run)."""
    if OmegaConf.select(config, "tracking.backend", default="none") == "none":
        return None
    parent = read_parent(str(Path(config.hydra.sweep.dir).resolve()))
    if parent is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=parent["uri"])
    return client, parent["run_id"], client.get_run(parent["run_id"]).info.experiment_id


def fail_sweep(config: DictConfig, error: str) -> None:
    """The Optuna sweeper stopped with an error (before its first trial, or too many failed): the parent run ends
    FAILED with the message as tag ``clipqa.error`` (Hydra skips ``on_multirun_end`` when a sweeper raises)."""
    if (found := _parent_client(config)) is not None:
        _close_parent(*found, error=error)


def mark_best_trial(
    config: DictConfig,
    study_name: str,
    number: int,
    value: float,
    metric: str = OBJECTIVE,
    files: Sequence[Path] = (),
) -> None:
    """Tag the MLflow run of an Optuna study's best trial ``clipqa.best_trial=true`` (an earlier best of a resumed
    study: ``false``), note it on the parent run and log the sweeper's files (optimization_results.yaml) there
    under ``optuna/``."""
    if (found := _parent_client(config)) is None:
        return
    client, parent_id, exp_id = found
    _tag_trials(client, exp_id, study_name, {number}, "clipqa.best_trial")
    client.set_tag(parent_id, "clipqa.best_trial", f"trial {number}: {metric} {value:.4f}")
    for f in files:
        client.log_artifact(parent_id, str(f), "optuna")


def mark_pareto_front(
    config: DictConfig,
    study_name: str,
    front: list[tuple[int, list[float]]],
    metric_names: list[str],
    files: Sequence[Path] = (),
) -> None:
    """A multi-objective study: tag the runs of its Pareto-optimal trials ``clipqa.pareto_front=true`` (trials of a
    resumed study that left the front: ``false``), list them on the parent run (tag ``clipqa.pareto_front``) and log
    the sweeper's files there under ``optuna/`` (optimization_results.yaml, pareto_front.png)."""
    if (found := _parent_client(config)) is None:
        return
    client, parent_id, exp_id = found
    _tag_trials(client, exp_id, study_name, {n for n, _ in front}, "clipqa.pareto_front")
    shown = "; ".join(
        f"trial {n}: " + ", ".join(f"{m} {v:.4g}" for m, v in zip(metric_names, values, strict=True))
        for n, values in front
    )
    client.set_tag(parent_id, "clipqa.pareto_front", shown[:5000])
    for f in files:
        client.log_artifact(parent_id, str(f), "optuna")


def _tag_trials(client, exp_id: str, study_name: str, numbers: set[int], tag: str) -> None:
    """``tag=true`` on the runs of the study's trials ``numbers`` (in this sweep or an earlier one of the study),
    ``false`` where an earlier sweep set it on another trial."""
    runs = client.search_runs([exp_id], "tags.`optuna.trial` != ''", max_results=50000)
    for run in runs:
        t = run.data.tags
        if t.get("optuna.study_name") != study_name:
            continue
        chosen = t.get("optuna.trial") in {str(n) for n in numbers}
        if chosen or t.get(tag) == "true":
            client.set_tag(run.info.run_id, tag, "true" if chosen else "false")
