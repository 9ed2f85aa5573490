"""Faults together, on the real services: an Optuna sweep of experiment=smoke by 3 workers on one PostgreSQL study,
logging to the authenticated MLflow server (worker c runs its trials as SLURM jobs on the one-node cluster), while
the test, at moments drawn from a seeded generator, SIGKILLs worker a or b during one of its trials, restarts the
MLflow server once, and preempts c's SLURM job (``scontrol requeue``) or SIGKILLs its training process.

At the end: the study used exactly n_trials trials, none RUNNING or WAITING; no MLflow run is RUNNING (the dead
worker's trial run and sweep parent were reaped: KILLED, tagged clipqa.reaped_by); every COMPLETE trial's MLflow
metrics equal its metrics.json; the last worker's report lists every COMPLETE trial's run once; the study's best
trial is tagged. Three seeds, three schedules of faults; each prints one line of what was injected and recovered.
``CLIPQA_FAULTS_NO_REAPING=1`` runs the same with reaping switched off (tests/helpers/no_reaping.py): it fails.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from clipqa.sweep.reaping import PARENT_ATTR, RUN_ID_ATTR
from clipqa.tracking.reaped import REAPED_TAG
from clipqa.tracking.run_info import PARENT_FILE
from hydra_plugins.clipqa_optuna_sweeper._workers import trials_used
from tests.helpers.mlflow_server import start_auth_server
from tests.helpers.runs import ROOT, SMALL_DEMO
from tests.system.test_slurm import SLURM

pytestmark = pytest.mark.slow

N_TRIALS = 6
SHORT = [*SMALL_DEMO, "data.synthetic.n_train=300", "data.synthetic.n_test=60", "trainer.max_steps=8",
         "trainer.eval_every=4", "trainer.checkpoint_every=2"]  # fmt: skip
NO_REAPING = os.environ.get("CLIPQA_FAULTS_NO_REAPING") == "1"


@pytest.fixture(scope="module")
def fault_server(postgres, tmp_path_factory):
    server = start_auth_server(postgres.create_database("mlflow_faults"), tmp_path_factory.mktemp("mlflow-faults"))
    yield server
    server.stop()


def start_worker(tmp: Path, name: str, seed: int, env: dict, server, slurm: bool) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "sweep=optuna", *SHORT, "tracking=mlflow",
           f"tracking.uri={server.url}", f"tracking.experiment=faults-{seed}", f"hydra.sweeper.n_trials={N_TRIALS}",
           "hydra.sweeper.pruner.name=none", "hydra.sweeper.storage=${oc.env:OPTUNA_STORAGE}",
           "hydra.sweeper.study_name=faults", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=5",
           f"hydra.sweeper.sampler.seed={seed}", f"hydra.sweep.dir={tmp / name}"]  # fmt: skip
    cmd += SLURM if slurm else []
    cmd += ["hydra.sweeper.hooks=[{_target_:tests.helpers.no_reaping.NoReapingHooks}]"] if NO_REAPING else []
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def parent_of(sweep_dir: Path) -> str | None:
    f = sweep_dir / PARENT_FILE
    return json.loads(f.read_text())["run_id"] if f.is_file() else None


class Faults:
    """The schedule drawn from the seed, and what was injected (the summary line)."""

    def __init__(self, seed: int, tmp: Path, cluster, server, study_url: str):
        rng = random.Random(seed)
        self.rng, self.tmp, self.cluster, self.server, self.url = rng, tmp, cluster, server, study_url
        self.victim = rng.choice("ab")
        # before its job's MLflow run exists, or after (alternating with the seed, so the three cover both)
        self.kill_in = ("start-up", "training")[seed % 2]
        self.killed_run: str | None = None  # the run of the trial killed in training: it must be reaped
        self.restart_after = rng.uniform(1, 10)  # s after every worker has asked for its first trial
        self.slurm_fault = rng.choice(["requeue", "kill"])
        self.done: dict[str, str] = {}
        self.started_at: float | None = None
        self.storage = None

    def running_trials(self, parent: str) -> tuple[list, int]:
        """The victim's RUNNING trials, and how many it asked for."""
        self.storage = self.storage or optuna.storages.RDBStorage(self.url)
        study = optuna.load_study(study_name="faults", storage=self.storage)
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(PARENT_ATTR) == parent]
        return [t for t in mine if t.state == TrialState.RUNNING], len(mine)

    def step(self, workers: dict[str, subprocess.Popen]) -> None:
        """Inject what is due now."""
        parents = {n: parent_of(self.tmp / n) for n in workers}
        if self.started_at is None and all(parents.values()):
            if all(self.running_trials(p)[1] for p in parents.values()):  # (each has its MLflow tags set up)
                self.started_at = time.monotonic()
        if "kill" not in self.done and parents[self.victim]:
            running, _ = self.running_trials(parents[self.victim])
            training = [t for t in running if t.user_attrs.get(RUN_ID_ATTR)]
            if running and (self.kill_in == "start-up" or training):
                time.sleep(self.rng.uniform(0.1, 1.0))  # a random moment inside the trial
                now, _ = self.running_trials(parents[self.victim])
                if now and (self.kill_in == "start-up" or now[0].user_attrs.get(RUN_ID_ATTR)):
                    os.kill(workers[self.victim].pid, signal.SIGKILL)
                    self.killed_run = now[0].user_attrs.get(RUN_ID_ATTR)
                    where = f"{self.kill_in} of trial {now[0].number}"
                    self.done["kill"] = f"SIGKILLed worker {self.victim} in the {where}"
        if "restart" not in self.done and self.started_at and time.monotonic() - self.started_at > self.restart_after:
            self.done["restart"] = f"restarted MLflow ({self.server.restart():.0f} s down)"
        if "slurm" not in self.done:
            running = [x.split()[0] for x in self.cluster.queue() if x.split()[1] == "RUNNING"]
            if running:
                job = running[0]
                if self.slurm_fault == "requeue":
                    self.cluster.run("scontrol", "requeue", job)
                else:  # SIGKILL to the job's processes: it dies without writing its result
                    self.cluster.run("scancel", "--signal=KILL", job)
                self.done["slurm"] = f"{'preempted' if self.slurm_fault == 'requeue' else 'SIGKILLed'} SLURM job {job}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_faults_leave_every_trial_and_run_in_a_final_state(seed, tmp_path, postgres, fault_server, slurm_cluster):
    started = time.monotonic()
    url = postgres.create_database(f"faults_{seed}_{os.getpid()}_{time.monotonic_ns()}")
    env = {**slurm_cluster.env, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0", "OPTUNA_STORAGE": url,
           **fault_server.client_env(), "CLIPQA_SLURM_POLL_S": "1", "CLIPQA_SLURM_LOST_AFTER_S": "5"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = {n: start_worker(tmp_path, n, seed, env, fault_server, slurm=n == "c") for n in "abc"}
    faults = Faults(seed, tmp_path, slurm_cluster, fault_server, url)
    try:
        deadline = time.monotonic() + 420
        while any(p.poll() is None for p in workers.values()):
            assert time.monotonic() < deadline, f"workers still running after 420 s; injected: {faults.done}"
            try:
                faults.step(workers)
            except Exception:  # (the study's tables may not exist yet)
                if time.monotonic() - started > 60:
                    raise
            time.sleep(0.2)
    finally:
        for p in workers.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        slurm_cluster.run("scancel", "--full", "--name=clipqa", check=False)
    logs = "\n=====\n".join(f"{n}:\n" + (tmp_path / f"{n}.log").read_text()[-2500:] for n in workers)
    assert set(faults.done) == {"kill", "restart", "slurm"}, f"not all faults injected: {faults.done}\n{logs}"

    # Optuna: exactly n_trials used, every trial finished
    study = optuna.load_study(study_name="faults", storage=url)
    trials = study.trials
    assert trials_used(trials) == N_TRIALS, [(t.number, t.state) for t in trials]
    stuck = [(t.number, t.state.name) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert stuck == [], logs

    # MLflow: nothing RUNNING; the dead worker's runs reaped
    os.environ.update(fault_server.client_env())
    try:
        client = MlflowClient(fault_server.url)
        exp = client.get_experiment_by_name(f"faults-{seed}").experiment_id
        runs = {r.info.run_id: r for r in client.search_runs([exp], max_results=1000)}
        running = [(r.info.run_name, r.data.tags.get("hydra.sweep.dir")) for r in runs.values()
                   if r.info.status == "RUNNING"]  # fmt: skip
        assert running == [], f"MLflow runs left RUNNING: {running}\n{logs}"
        dead_parent = runs[parent_of(tmp_path / faults.victim)]
        assert dead_parent.info.status == "KILLED" and REAPED_TAG in dead_parent.data.tags
        reaped = [r for r in runs.values() if REAPED_TAG in r.data.tags and r.info.run_id != dead_parent.info.run_id]
        if faults.killed_run:  # the killed trial's run: reaped by a survivor
            assert faults.killed_run in {r.info.run_id for r in reaped}, runs[faults.killed_run].info.status

        # every COMPLETE trial: its run's metrics are its metrics.json; the last report lists it once; best tagged
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert complete, logs
        for t in complete:
            run = runs[t.user_attrs[RUN_ID_ATTR]]
            folder = Path(run.data.tags["hydra.sweep.dir"]) / run.data.tags["hydra.job.num"]
            metrics = json.loads((folder / "metrics.json").read_text())
            shared = [k for k in run.data.metrics if k.startswith("test/") and isinstance(metrics.get(k), int | float)]
            assert "test/acc" in shared and all(run.data.metrics[k] == pytest.approx(metrics[k]) for k in shared)
        ended = [r for r in runs.values() if r.data.tags.get("clipqa.sweep") == "true" and r.info.status != "KILLED"]
        last = max((r for r in ended if r.info.end_time),
                   key=lambda r: r.info.end_time)  # fmt: skip
        report = (Path(last.data.tags["hydra.sweep.dir"]) / "report" / "report.csv").read_text()
        assert all(report.count(t.user_attrs[RUN_ID_ATTR]) == 1 for t in complete), report
        best = runs[study.best_trial.user_attrs[RUN_ID_ATTR]]
        assert best.data.tags.get("clipqa.best_trial") == "true"
    finally:
        for k in fault_server.client_env():
            os.environ.pop(k, None)
    retried = sum(1 for t in trials if t.system_attrs.get("retry_history"))
    failed = [t.user_attrs.get("fail_reason", "no heartbeat")[:60] for t in trials if t.state == TrialState.FAIL]
    print(
        f"\nfaults seed {seed}: {'; '.join(faults.done.values())} -> {len(trials)} trials ({len(complete)} complete, "
        f"{retried} retries; failed: {failed}), {len(reaped)} run(s) reaped + the dead worker's parent, none RUNNING "
        f"({time.monotonic() - started:.0f} s)"
    )
