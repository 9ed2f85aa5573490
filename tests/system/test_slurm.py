"""Sweeps as SLURM jobs (`hydra/launcher=slurm`, conf/hydra/launcher/slurm.yaml) on a real one-node SLURM cluster
that the `slurm_cluster` fixture starts (tests/helpers/slurm_cluster.py): a job array nested under one MLflow parent
with the
sweep's report; a job preempted (`scontrol requeue`: SIGTERM, SLURM requeues) and warned of its time limit (USR2:
submitit requeues) continues from its checkpoint in the same MLflow run, ending with the uninterrupted metrics; a
sweep whose submitting process died is re-submitted and only its unfinished jobs train; a failing job is FAILED in
MLflow and the submitting command says why; an Optuna study (sweep=optuna) runs its trials as SLURM jobs.

Each job is checked through SLURM's own record (the cluster's jobcomp log: job ids, states, exit codes)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.runs import ROOT, SMALL_DEMO, check_test_metrics

pytestmark = pytest.mark.slow

# The launcher config as users start it, sized for the 2-core test node: 1 core and 3 GB per job, so two jobs share it.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3"]
# Long enough to be interrupted twice: 8 epochs x 29 steps, a checkpoint every 7 steps.
LONG = [*SMALL_DEMO, "trainer.epochs=8", "trainer.eval_every=10", "trainer.checkpoint_every=7"]
TIMING = ("train/seconds", "train/examples_per_s")


def tracked(tmp_path: Path, experiment: str) -> list[str]:
    return ["tracking=mlflow", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", f"tracking.experiment={experiment}"]


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", *SLURM, *args]


def submit(cluster, cmd: list[str], log: Path) -> subprocess.Popen:
    """The submitting process (`python train.py -m hydra/launcher=slurm ...`), its output in ``log``."""
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 1200) -> None:
    rc = proc.wait(timeout)
    assert rc == 0, log.read_text()[-4000:]


def wait_for(what: str, condition, proc: subprocess.Popen | None = None, timeout: float = 600, log: Path | None = None):
    deadline = time.time() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {log.read_text()[-3000:] if log else ''}")
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)
    return value


def checkpoint_at_least(job_dir: Path, step: int):
    ckpts = job_dir / "checkpoints"
    return lambda: ckpts.is_dir() and any(p.name >= f"step_{step:08d}.pt" for p in ckpts.glob("step_*.pt"))


def array_ids(sweep: Path) -> list[str]:
    """The SLURM job arrays submitted for a sweep: submitit's <sweep>/slurm/<array id>/<array id>_submission.sh."""
    return sorted((p.parent.name for p in (sweep / "slurm").glob("*/*_submission.sh")), key=int)


def slurm_time(stamp: str) -> float:
    """A jobcomp time (local time, whole seconds) as a Unix time."""
    return datetime.fromisoformat(stamp).timestamp()


def same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def test_a_sweep_runs_as_a_slurm_job_array_nested_under_one_mlflow_parent(slurm_cluster, tmp_path):
    sweep, log = tmp_path / "sweep", tmp_path / "submit.log"
    cmd = sweep_command(*SMALL_DEMO, *tracked(tmp_path, "e"), "trainer.max_steps=6", "mapper.num_layers=0,1,2")
    proc = submit(slurm_cluster, [*cmd, f"hydra.sweep.dir={sweep}"], log)
    finish(proc, log)
    slurm_cluster.wait_idle()

    # SLURM ran the three jobs as one array (its logs in the sweep folder), each to COMPLETED with exit code 0
    (array_id,) = array_ids(sweep)
    rows = [r for r in slurm_cluster.jobs() if r.get("ArrayJobId") == array_id]
    assert sorted(r["ArrayTaskId"] for r in rows) == ["0", "1", "2"], slurm_cluster.jobs()
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in rows), rows
    for task in range(3):
        out = sweep / "slurm" / f"{array_id}_{task}" / f"{array_id}_{task}_0_log.out"  # the job's stdout
        assert "Job completed successfully" in out.read_text()

    layers = []
    for job in range(3):
        d = sweep / str(job)
        assert json.loads((d / "metrics.json").read_text())["steps"] == 6
        check_test_metrics(d)
        assert "test/acc" in (d / "train.log").read_text()
        layers.append(json.loads((d / "metrics.json").read_text())["params/trainable/mapper"] > 0)
    assert layers == [False, True, True]

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 4 and parent.info.status == "FINISHED"
    assert sorted(x.info.run_name for x in children) == [f"mapper.num_layers={n}" for n in range(3)]
    for child in children:
        metrics = json.loads((sweep / child.data.tags["hydra.job.num"] / "metrics.json").read_text())
        assert child.info.status == "FINISHED" and child.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    # the parent existed before SLURM had the jobs (jobcomp times are whole seconds)
    assert parent.info.start_time / 1000 < min(slurm_time(r["SubmitTime"]) for r in rows) + 1
    assert all(child.info.start_time > parent.info.start_time for child in children)
    # the report, written by the submitting process once the jobs were done: one row per job
    report = sweep / "report"
    assert (report / "report.md").is_file() and len((report / "report.csv").read_text().splitlines()) == 1 + 3
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.md"}


def wait_until_resumable(client: MlflowClient, run_id: str, proc, log) -> dict:
    """The job's MLflow run between its stop and the requeued job's start: KILLED and tagged resumable."""

    def stopped():
        run = client.get_run(run_id)
        return run if run.info.status == "KILLED" and run.data.tags.get("clipqa.resumable") == "true" else None

    return wait_for("KILLED resumable MLflow run", stopped, proc, timeout=180, log=log).data.tags


def time_limit_in(cluster, job_id: str, seconds: int) -> str:
    """A TimeLimit (minutes:seconds) that ends ``seconds`` from now for a running job."""
    start = cluster.run("squeue", "--noheader", "--format=%S", f"--jobs={job_id}").stdout.strip()
    total = int(time.time() - slurm_time(start)) + seconds
    return f"{total // 60}:{total % 60:02d}"


def task_pid(cluster, job_id: str) -> int:
    """The job's training process: task 0 of step 0 (submitit's Python, started by srun in the job script)."""
    rows = [line.split() for line in cluster.run("scontrol", "listpids", job_id).stdout.splitlines()[1:]]
    (pid,) = [int(r[0]) for r in rows if r[2:4] == ["0", "0"]]
    return pid


def test_a_preempted_and_timed_out_job_is_requeued_and_ends_with_the_uninterrupted_metrics(slurm_cluster, tmp_path):
    ref = subprocess.Popen(  # the same run without SLURM or interruptions, alongside
        [sys.executable, str(ROOT / "train.py"), *LONG, f"hydra.run.dir={tmp_path / 'ref'}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "ref.log").open("w"),
    )
    sweep, log = tmp_path / "sweep", tmp_path / "submit.log"
    proc = submit(slurm_cluster, [*sweep_command(*LONG, *tracked(tmp_path, "r")), f"hydra.sweep.dir={sweep}"], log)
    job = sweep / "0"
    wait_for("checkpoint at step 40", checkpoint_at_least(job, 40), proc, log=log)
    (line,) = slurm_cluster.queue()
    job_id = line.split()[0]
    run_id = (job / "mlflow_run_id.txt").read_text().strip()
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")

    # 1. preemption: SLURM sends SIGTERM and requeues the job itself (scontrol requeue is what PreemptMode=REQUEUE does)
    slurm_cluster.run("scontrol", "requeue", job_id)
    tags = wait_until_resumable(client, run_id, proc, log)
    assert "stopped by SIGTERM at step" in tags["error"]
    # 2. the time limit: cut to 150 s from now, so SLURM sends USR2 (sbatch --signal=USR2@120, the launcher config's
    #    signal_delay_s) at its next time-limit check (every 30 s); clipqa checkpoints, then submitit requeues the job.
    #    The job's process is held (SIGSTOP) until then, so the signal lands mid-training however fast it trains:
    #    SLURM sends SIGCONT with it.
    wait_for("checkpoint at step 80 after the requeue", checkpoint_at_least(job, 80), proc, log=log)
    pid = task_pid(slurm_cluster, job_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        limit = time_limit_in(slurm_cluster, job_id, 150)
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}")
        tags = wait_until_resumable(client, run_id, proc, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # (only if the test failed: SLURM continued it)
    assert "stopped by SIGUSR2 at step" in tags["error"]
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=240")  # the requeued run: time enough
    finish(proc, log)
    slurm_cluster.wait_idle()
    assert ref.wait(900) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    metrics = json.loads((job / "metrics.json").read_text())
    uninterrupted = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert same(metrics, uninterrupted), {k: (metrics[k], uninterrupted[k]) for k in metrics}
    check_test_metrics(job)
    runs = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    (child,) = [x for x in runs if x.data.tags.get("clipqa.sweep") != "true"]  # one MLflow run, continued twice
    assert child.info.run_id == run_id and child.info.status == "FINISHED"
    assert child.data.tags["clipqa.resumable"] == "false"  # resumed: no longer waiting for it
    assert child.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    train_log = (job / "train.log").read_text()
    assert train_log.count("resuming from") == 2
    assert "handing SIGUSR2 on to SignalHandler.checkpoint_and_try_requeue" in train_log  # submitit requeued it
    # SLURM's record: ended twice to be requeued (the first run's exit status 75 shows as DerivedExitCode), then done
    rows = [r for r in slurm_cluster.jobs() if job_id in (r["JobId"], r.get("ArrayJobId"))]
    assert [r["JobState"] for r in rows][-1] == "COMPLETED" and len(rows) == 3, rows
    assert all(r["JobState"] != "COMPLETED" for r in rows[:-1]), rows


def test_a_sweep_whose_submitting_process_died_is_resubmitted_and_only_unfinished_jobs_train(slurm_cluster, tmp_path):
    sweep, log = tmp_path / "sweep", tmp_path / "submit.log"
    cmd = sweep_command(*LONG, *tracked(tmp_path, "s"), "trainer.epochs=2", "trainer.seed=1,2,3")
    cmd += ["hydra.launcher.array_parallelism=1", f"hydra.sweep.dir={sweep}"]  # one job at a time
    proc = submit(slurm_cluster, cmd, log)
    wait_for("job 0 finished", lambda: (sweep / "0" / ".clipqa_done").is_file(), proc, log=log)
    wait_for("a checkpoint of job 1", checkpoint_at_least(sweep / "1", 14), proc, log=log)
    proc.send_signal(signal.SIGKILL)  # the login node's session is gone; the jobs stay on the cluster
    proc.wait(60)
    (array_id,) = array_ids(sweep)
    slurm_cluster.run("scancel", array_id)  # as a user would before re-submitting: job 1 checkpoints and stops
    slurm_cluster.wait_idle()
    done_0 = (sweep / "0" / ".clipqa_done").stat().st_mtime_ns
    run_ids = [(sweep / str(j) / "mlflow_run_id.txt").read_text() for j in (0, 1)]
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    stopped = client.get_run(run_ids[1])
    assert stopped.info.status == "KILLED" and stopped.data.tags.get("clipqa.resumable") == "true"

    log2 = tmp_path / "resubmit.log"
    finish(submit(slurm_cluster, cmd, log2), log2)  # the same command, the same hydra.sweep.dir
    slurm_cluster.wait_idle()
    assert (sweep / "0" / ".clipqa_done").stat().st_mtime_ns == done_0  # job 0 was not trained again
    assert "already holds this run's results" in (sweep / "0" / "train.log").read_text()
    assert "resuming from" in (sweep / "1" / "train.log").read_text()
    assert [(sweep / str(j) / "mlflow_run_id.txt").read_text() for j in (0, 1)] == run_ids
    for j in range(3):
        check_test_metrics(sweep / str(j))
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]  # the re-submission kept its parent
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(x.info.run_name for x in children) == [f"trainer.seed={i}" for i in (1, 2, 3)]
    assert all(x.info.status == "FINISHED" for x in children) and parent.info.status == "FINISHED"
    assert len(runs) == 4
    # SLURM's record: the first array (job 1 cancelled), then a second array of three completed jobs
    first, second_id = array_ids(sweep)
    assert first == array_id
    second = [r for r in slurm_cluster.jobs() if r.get("ArrayJobId") == second_id]
    assert sorted(r["ArrayTaskId"] for r in second) == ["0", "1", "2"]
    assert all(r["JobState"] == "COMPLETED" for r in second)


def test_a_failing_job_is_failed_in_mlflow_and_reported_by_the_launcher(slurm_cluster, tmp_path):
    sweep, log = tmp_path / "sweep", tmp_path / "submit.log"
    cmd = sweep_command(*SMALL_DEMO, *tracked(tmp_path, "f"), "trainer.max_steps=4")
    cmd += ["trainer.init_from=null,/nonexistent/best.pt", f"hydra.sweep.dir={sweep}"]
    proc = submit(slurm_cluster, cmd, log)
    assert proc.wait(900) != 0
    assert "trainer.init_from=/nonexistent/best.pt: no such file" in log.read_text()  # the submitting command says why
    slurm_cluster.wait_idle()
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("f").experiment_id])
    status = {x.info.run_name: x.info.status for x in runs if x.data.tags.get("clipqa.sweep") != "true"}
    assert status == {"trainer.init_from=null": "FINISHED", "trainer.init_from=/nonexistent/best.pt": "FAILED"}
    (failed,) = [x for x in runs if x.info.status == "FAILED" and x.data.tags.get("clipqa.sweep") != "true"]
    assert "no such file" in failed.data.tags["error"]
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]  # closed, not left RUNNING
    assert parent.info.status == "FAILED"
    assert parent.data.tags["clipqa.jobs"] == "2 jobs: 1 finished, 0 pruned, 1 failed"


def test_an_optuna_study_runs_its_trials_as_slurm_jobs(slurm_cluster, tmp_path):
    import optuna

    sweep, log, storage = tmp_path / "sweep", tmp_path / "submit.log", f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "sweep=optuna", *SLURM, *SMALL_DEMO]
    cmd += [*tracked(tmp_path, "o"), "trainer.max_steps=12", "trainer.eval_every=4"]
    cmd += ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", f"hydra.sweeper.storage={storage}"]
    cmd += ["hydra.sweeper.study_name=s", f"hydra.sweep.dir={sweep}"]
    finish(submit(slurm_cluster, cmd, log), log)
    slurm_cluster.wait_idle()

    # two batches of two trials: two job arrays of two SLURM jobs each
    arrays = array_ids(sweep)
    assert len(arrays) == 2
    for array_id in arrays:
        rows = [r for r in slurm_cluster.jobs() if r.get("ArrayJobId") == array_id]
        assert sorted(r["ArrayTaskId"] for r in rows) == ["0", "1"] and all(r["JobState"] == "COMPLETED" for r in rows)
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("o").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(x.data.tags["optuna.trial"] for x in children) == ["0", "1", "2", "3"] and len(runs) == 5
    assert parent.info.status == "FINISHED" and (sweep / "report" / "report.md").is_file()
