"""A dead worker's MLflow runs are ended by whichever worker reaps its trials (clipqa/sweep/reaping.py, through the
Optuna sweeper's on_trial_reaped hook), and a reaped run that turns out alive is RUNNING again at its next write
(clipqa/tracking/reaped.py). Fast: a SQLite study and a SQLite MLflow store; the dead worker is a trial whose
heartbeat is made an hour old, so no test waits out a grace period."""

import json
import warnings
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from clipqa.sweep.optuna_hooks import MlflowStudyHooks
from clipqa.sweep.reaping import PARENT_ATTR, RUN_ID_ATTR
from clipqa.tracking.reaped import REAPED_TAG, REVIVED_TAG
from clipqa.tracking.run_info import PARENT_FILE
from clipqa.tracking.tracker import MlflowTracker
from hydra_plugins.clipqa_optuna_sweeper._storage import make_storage, open_study
from hydra_plugins.clipqa_optuna_sweeper._workers import Heartbeats, fail_stale_trials, retry_history
from hydra_plugins.clipqa_optuna_sweeper.hooks import Study
from tests.helpers.runs import mlflow_store

SPACE = {"x": optuna.distributions.FloatDistribution(0, 1)}
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


def worker(tmp: Path, name: str, uri: str, client: MlflowClient, exp: str, study) -> Study:
    """A sweeper worker as the hooks see it: its sweep folder naming its MLflow parent run."""
    sweep_dir = tmp / name
    sweep_dir.mkdir()
    parent = client.create_run(exp, run_name=f"sweep {name}", tags={"clipqa.sweep": "true"}).info.run_id
    (sweep_dir / PARENT_FILE).write_text(json.dumps({"run_id": parent, "uri": uri, "swept": []}))
    config = OmegaConf.create({"tracking": {"backend": "mlflow"}, "hydra": {"sweep": {"dir": str(sweep_dir)}}})
    return Study(config, study, "s", "sqlite", ["maximize"], None, sweep_dir)


def trial_run(client, exp: str, parent: str, number: int) -> str:
    tags = {"mlflow.parentRunId": parent, "optuna.trial": str(number), "optuna.study_name": "s"}
    return client.create_run(exp, run_name=f"trial {number}", tags=tags).info.run_id


def make_stale(url: str) -> None:
    """Every heartbeat an hour old: their sweeper "died" long ago."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')"))
    engine.dispose()


def test_the_reaping_worker_ends_a_dead_workers_trial_runs_and_then_its_parent_but_not_a_live_one(tmp_path):
    """Catches: a SIGKILLed worker's trial run and sweep parent left RUNNING for ever (the issue's bug), a parent
    ended while one of its trials still runs, the reaper's own parent ended, and a run found by a search where the
    trial names it."""
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    url = f"sqlite:///{tmp_path / 'o.db'}"
    hooks = MlflowStudyHooks()
    reaper_info: list[Study] = []
    storage = make_storage(url, 60, 30, 1, lambda st, tr, why: hooks.on_trial_reaped(reaper_info[0], tr, why))
    study = open_study(storage, "s", ["maximize"])
    dead, alive = (worker(tmp_path, n, uri, client, exp, study) for n in ("dead", "alive"))
    reaper_info.append(alive)
    dead_parent, alive_parent = (json.loads((w.sweep_dir / PARENT_FILE).read_text())["run_id"] for w in (dead, alive))

    with Heartbeats(storage) as beats:
        done = study.ask(SPACE)  # the dead worker's finished trial
        hooks.on_trial_start(dead, done)
        client.set_terminated(trial_run(client, exp, dead_parent, done.number), "FINISHED")
        study.tell(done, 0.5)
        trials = []
        for _ in range(2):  # two running when it died: the first has recorded its run, the second not yet
            t = study.ask(SPACE)
            beats.add(t._trial_id)
            hooks.on_trial_start(dead, t)
            trials.append((t, trial_run(client, exp, dead_parent, t.number)))
        trials[0][0].set_user_attr(RUN_ID_ATTR, trials[0][1])
        beats.discard(trials[0][0]._trial_id)
        beats.discard(trials[1][0]._trial_id)
    assert study.trials[1].user_attrs[PARENT_ATTR] == dead_parent
    make_stale(url)

    with Heartbeats(storage) as beats:  # the live worker's trial: fresh heartbeat
        mine = study.ask(SPACE)
        beats.add(mine._trial_id)
        hooks.on_trial_start(alive, mine)
        mine_run = trial_run(client, exp, alive_parent, mine.number)
        fail_stale_trials(study)

    states = [t.state for t in study.trials]
    assert states[:4] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING], states
    assert sorted(retry_history(t) for t in study.trials[4:]) == [[1], [2]]  # both retried
    for _, run_id in trials:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", run_id
        note = run.data.tags[REAPED_TAG]
        assert "no heartbeat from its sweeper" in note and "pid" in note and str(alive.sweep_dir) in note
    parent = client.get_run(dead_parent)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["clipqa.jobs"] == "3 jobs: 1 finished, 0 pruned, 2 reaped, 0 failed"
    assert parent.data.tags["clipqa.reaped_jobs"] == "2" and REAPED_TAG in parent.data.tags
    assert client.get_run(alive_parent).info.status == "RUNNING"  # the reaper's own parent: alive
    assert client.get_run(mine_run).info.status == "RUNNING"


def test_a_dead_workers_parent_waits_for_its_trials_that_are_still_alive(tmp_path):
    """A parent with a trial still RUNNING in the study (alive: its heartbeat is fresh) is not ended yet."""
    from clipqa.sweep.reaping import reap_parent

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    parent = client.create_run(exp, run_name="sweep").info.run_id

    class Alive:
        user_attrs = {PARENT_ATTR: parent}

    assert not reap_parent(client, parent, [Alive()], "test")
    assert client.get_run(parent).info.status == "RUNNING"
    assert reap_parent(client, parent, [], "test") and client.get_run(parent).info.status == "KILLED"


def test_a_reaped_run_that_is_alive_is_running_again_at_its_next_write_and_ends_finished(tmp_path):
    """Catches: a slow worker's run left KILLED while it trains (and ends) on, or its metrics refused."""
    from clipqa.sweep.reaping import reap_run

    uri = mlflow_store(tmp_path)
    tracker = MlflowTracker(uri, "e", "trial 0", {})
    client = MlflowClient(uri)
    tracker.log_metrics({"val/acc": 0.1}, step=1)
    assert reap_run(client, tracker.run_id, "trial 0: no heartbeat from its sweeper; reaped by h pid 1")
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    tracker._reaped_checked_at = float("-inf")  # (the check interval has passed)
    tracker.log_metrics({"val/acc": 0.2}, step=2)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING" and REAPED_TAG not in run.data.tags
    assert "reaped by h pid 1" in run.data.tags[REVIVED_TAG] and run.data.metrics["val/acc"] == 0.2
    reap_run(client, tracker.run_id, "again")
    tracker.finish("FINISHED")  # its end is its own, whatever a reaper did meanwhile
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and REAPED_TAG not in run.data.tags


def test_the_job_notes_its_mlflow_run_on_its_trial_as_soon_as_the_run_exists(tmp_path):
    from clipqa.sweep.optuna_trial import TrialJob, record_run

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = open_study(make_storage(url), "s", ["maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask(SPACE)
    job = TrialJob(trial.number, trial._trial_id, "s", url)
    with record_run(job, tmp_path, poll_s=0.01):
        (tmp_path / "mlflow_run_id.txt").write_text("abc123")
        for _ in range(300):
            if study.trials[0].user_attrs.get(RUN_ID_ATTR):
                break
            import time

            time.sleep(0.01)
    assert study.trials[0].user_attrs[RUN_ID_ATTR] == "abc123"
