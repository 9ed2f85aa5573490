"""Jobs that vanish on a SLURM cluster without accounting (the `slurm_cluster` fixture has no slurmdbd: `sacct` does
not answer): a job whose training process is SIGKILLed leaves the queue without writing its result. The submitting
command notices within a few polls (clipqa/sweep/slurm_launcher.py) and reports the job FAILED, naming it and its
log: a grid sweep then fails (exit non-zero), an Optuna study fails the trial, retries it and finishes. Bug caught:
the command waiting for ever (submitit learns a job's end from its result file or from sacct, and has neither)."""

import os
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.runs import ROOT, SMALL_DEMO
from tests.system.test_slurm import SLURM, submit, tracked, wait_for

pytestmark = pytest.mark.slow

FAST_WATCH = {"CLIPQA_SLURM_POLL_S": "1", "CLIPQA_SLURM_LOST_AFTER_S": "5"}
LONG = [*SMALL_DEMO, "trainer.epochs=8", "trainer.eval_every=10", "trainer.checkpoint_every=7"]


def kill_job_process(cluster, job_dir, proc, log) -> str:
    """SIGKILL the processes of the job running in ``job_dir`` once it has a checkpoint; its SLURM job id."""
    wait_for(f"a checkpoint in {job_dir}", lambda: any((job_dir / "checkpoints").glob("step_*.pt")), proc, log=log)
    running = [line.split()[0] for line in cluster.queue() if line.split()[1] == "RUNNING"]
    (job_id,) = running  # one job at a time
    cluster.run("scancel", "--signal=KILL", job_id)  # SIGKILL to the job's processes: it dies without a result
    return job_id


def test_a_grid_job_killed_without_its_result_fails_the_sweep_naming_the_job_and_its_log(slurm_cluster, tmp_path):
    sweep, log = tmp_path / "sweep", tmp_path / "submit.log"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *SLURM, *LONG, *tracked(tmp_path, "g"), "trainer.epochs=2"]
    cmd += ["hydra.launcher.array_parallelism=1", f"hydra.sweep.dir={sweep}", "trainer.seed=1,2"]
    os.environ.update(FAST_WATCH)  # (the submitting process inherits it through the cluster's environment)
    try:
        proc = submit(slurm_cluster, cmd, log)
    finally:
        for k in FAST_WATCH:
            os.environ.pop(k)
    job_id = kill_job_process(slurm_cluster, sweep / "0", proc, log)
    started = time.time()
    rc = proc.wait(240)
    out = log.read_text()
    assert rc != 0, out[-3000:]
    assert f"SLURM job {job_id} FAILED: it left the queue" in out, out[-3000:]
    assert f"{job_id}_0_log.out" in out  # its log, named
    assert time.time() - started < 180, "noticed within a few polls, not minutes (the other job ran meanwhile)"
    slurm_cluster.wait_idle()


def test_an_optuna_trial_whose_slurm_job_vanished_fails_is_retried_and_the_study_finishes(slurm_cluster, tmp_path):
    import optuna
    from optuna.trial import TrialState

    sweep, log, storage = tmp_path / "sweep", tmp_path / "submit.log", f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "sweep=optuna", *SLURM, *LONG, *tracked(tmp_path, "o")]
    cmd += ["trainer.epochs=2", "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner.name=none"]
    cmd += [f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=s", f"hydra.sweep.dir={sweep}"]
    os.environ.update(FAST_WATCH)
    try:
        proc = submit(slurm_cluster, cmd, log)
    finally:
        for k in FAST_WATCH:
            os.environ.pop(k)
    job_id = kill_job_process(slurm_cluster, sweep / "0", proc, log)
    rc = proc.wait(600)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    assert f"SLURM job {job_id} FAILED" in out
    slurm_cluster.wait_idle()

    study = optuna.load_study(study_name="s", storage=storage)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL and TrialState.RUNNING not in states and TrialState.WAITING not in states
    (retry,) = [t for t in study.trials if t.system_attrs.get("retry_history") == [0]]
    assert retry.state == TrialState.COMPLETE and retry.params == study.trials[0].params
    assert f"SLURM job {job_id}" in study.trials[0].user_attrs["fail_reason"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    lost = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    # KILLED: by the reaper (clipqa.reaped_by names the job), or by the job itself when SLURM's SIGTERM reached it
    note = lost.data.tags.get("clipqa.reaped_by")
    assert lost.info.status == "KILLED" and (note is None or f"SLURM job {job_id}" in note), note
    runs = client.search_runs([client.get_experiment_by_name("o").experiment_id])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
