"""Ending in MLflow what a dead sweeper worker (or a job lost on the cluster) left RUNNING.

When the Optuna sweeper fails a trial that its own process will never tell (its worker stopped sending heartbeats, or
its SLURM job vanished), it calls the hooks' ``on_trial_reaped`` in the reaping process
(:class:`clipqa.sweep.optuna_hooks.MlflowStudyHooks`), which calls :func:`reap`:

- the trial's run (its id is the trial's user attribute ``mlflow_run_id``, written by the job as soon as the run
  exists: :func:`clipqa.sweep.optuna_trial.record_run`) ends KILLED with tag ``clipqa.reaped_by`` naming the reaping
  worker and why; a trial killed before its job recorded the run is found by its tags (study, trial number);
- its sweep's parent run (the trial's user attribute ``mlflow_parent_run_id``, written by its sweeper when it asked
  for the trial) ends KILLED too, with its job counts (``clipqa.jobs``), once none of that worker's runs or trials
  is alive; never the reaping worker's own parent.

Only RUNNING runs are touched. A run that turns out alive goes back to RUNNING at its next write
(:func:`clipqa.tracking.reaped.revive_if_reaped`).
"""

from __future__ import annotations

import logging

from clipqa.tracking.reaped import REAPED_TAG

log = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"  # trial user attribute: the MLflow run of the trial's job
PARENT_ATTR = "mlflow_parent_run_id"  # trial user attribute: the MLflow parent run of the sweep that asked for it
REAPED_JOBS_TAG = "clipqa.reaped_jobs"


def trial_run_id(client, study_name: str, trial, experiment_ids: list[str]) -> str | None:
    """The trial's MLflow run: its user attribute, else (the job died before recording it) a RUNNING run tagged
    with the trial's study and number."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        run = client.get_run(run_id)
        if run.data.tags.get("optuna.trial") in (None, str(trial.number)):  # (a retry inherits its first's attrs)
            return run_id
    if not experiment_ids:
        return None
    query = f"tags.`optuna.trial` = '{trial.number}' and attributes.status = 'RUNNING'"
    runs = [r for r in client.search_runs(experiment_ids, query) if r.data.tags.get("optuna.study_name") == study_name]
    return runs[0].info.run_id if len(runs) == 1 else None


def reap_run(client, run_id: str, note: str) -> bool:
    """KILLED with ``clipqa.reaped_by=note`` if the run is still RUNNING; True when it was."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, REAPED_TAG, note[:5000])
    client.set_terminated(run_id, status="KILLED")
    log.warning("MLflow run %s: KILLED (%s)", run_id, note)
    return True


def counts(children: list) -> dict[str, int]:
    """A sweep's jobs by outcome: finished, pruned, reaped (ended by a reaper) and failed (anything else)."""
    n = {"finished": 0, "pruned": 0, "reaped": 0, "failed": 0}
    for c in children:
        if c.info.status == "FINISHED":
            n["finished"] += 1
        elif c.info.status == "KILLED" and c.data.tags.get("clipqa.pruned") == "true":
            n["pruned"] += 1
        elif c.info.status == "KILLED" and REAPED_TAG in c.data.tags:
            n["reaped"] += 1
        else:
            n["failed"] += 1
    return n


def reap_parent(client, parent_id: str, alive_trials: list, note: str) -> bool:
    """The dead worker's sweep parent KILLED with its job counts, once none of its runs is RUNNING and none of
    ``alive_trials`` (the study's RUNNING trials) was asked by it; True when it was ended."""
    parent = client.get_run(parent_id)
    if parent.info.status != "RUNNING":
        return False
    if any(t.user_attrs.get(PARENT_ATTR) == parent_id for t in alive_trials):
        return False
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    if any(c.info.status == "RUNNING" for c in children):
        return False
    n = counts(children)
    summary = f"{len(children)} jobs: " + ", ".join(f"{v} {k}" for k, v in n.items())
    client.set_tag(parent_id, "clipqa.jobs", summary)
    client.set_tag(parent_id, "clipqa.failed_jobs", str(n["failed"]))
    client.set_tag(parent_id, REAPED_JOBS_TAG, str(n["reaped"]))
    client.set_tag(parent_id, REAPED_TAG, f"its worker died; {note}"[:5000])
    client.set_terminated(parent_id, status="KILLED")
    log.warning("MLflow sweep parent run %s of a dead worker: KILLED (%s)", parent_id, summary)
    return True


def reap(client, study, trial, note: str, own_parent: str | None, experiment_ids: list[str]) -> list[str]:
    """End the trial's run, then its sweep's parent when that worker has nothing alive left (never ``own_parent``,
    the reaping sweep's); the ids of the runs ended."""
    from optuna.trial import TrialState

    ended = []
    run_id = trial_run_id(client, study.study_name, trial, experiment_ids)
    if run_id and reap_run(client, run_id, f"trial {trial.number}: {note}"):
        ended.append(run_id)
    parent_id = trial.user_attrs.get(PARENT_ATTR)
    if not parent_id and run_id:
        parent_id = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    if parent_id and parent_id != own_parent:
        alive = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if reap_parent(client, parent_id, alive, note):
            ended.append(parent_id)
    return ended
