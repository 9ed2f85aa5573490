"""``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): Hydra's submitit launcher, plus a watch for jobs
that vanish from a cluster without accounting.

Why: submitit learns a job's end from its result file, or from ``sacct``. On a cluster without accounting (``sacct``
disabled: common on small clusters) a job killed without writing its result (``scancel --signal=KILL``, a node
lost, the out-of-memory killer) leaves submitit asking forever: the sweep command never ends. submitit's own state
is used wherever it has one (with accounting it raises for such a job itself); what it lacks is added here: while
the launcher waits, :class:`LostJobWatch` lists the sweep's jobs every ``CLIPQA_SLURM_POLL_S`` seconds (5) with
``squeue``; a job that has left the queue without a result file for ``CLIPQA_SLURM_LOST_AFTER_S`` seconds (30: a
few polls; a job writes its result before it leaves) gets the result submitit waits for written in its place: a
FAILED job whose error (:class:`JobLostError`) names the job and its log. The sweep then goes on as for any failed
job: Hydra's basic sweeper stops the sweep with that error (exit non-zero), and the Optuna sweeper fails the trial
and retries it, as it does a dead worker's (``job_lost = True``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

try:  # (Hydra imports every module under hydra_plugins at start-up: nothing here without the submitit launcher)
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:  # pragma: no cover
    SubmititSlurmLauncher = None

log = logging.getLogger(__name__)


class JobLostError(RuntimeError):
    """A SLURM job that left the queue without writing its result."""

    job_lost = True  # the Optuna sweeper (hydra_plugins/clipqa_optuna_sweeper) retries such a job's trial


if SubmititSlurmLauncher is not None:

    class SlurmLauncher(SubmititSlurmLauncher):
        """submitit's SLURM launcher, its jobs watched while it waits for them (:class:`LostJobWatch`)."""

        def launch(self, job_overrides, initial_job_idx: int):
            with LostJobWatch(self.params["submitit_folder"]):
                return super().launch(job_overrides, initial_job_idx)


def queued_job_ids() -> set[str] | None:
    """The ids of this user's jobs SLURM still holds (pending, running, requeued; array tasks as ``ARRAY_TASK``), or
    None when ``squeue`` does not answer (the controller restarting: nothing is judged lost then)."""
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--me", "--format=%i"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line.strip() for line in out.splitlines() if line.strip()}


class LostJobWatch:
    """A thread, while the launcher waits: each job submitted since it started (submitit's ``*_submitted.pkl``)
    that is out of ``squeue`` without a result file for ``lost_after_s`` gets a FAILED result written for it."""

    def __init__(self, submitit_folder: str, poll_s: float | None = None, lost_after_s: float | None = None):
        from submitit.core.utils import JobPaths

        self.root = JobPaths.get_first_id_independent_folder(submitit_folder)
        self.folder = submitit_folder
        self.poll_s = poll_s or float(os.environ.get("CLIPQA_SLURM_POLL_S", 5))
        self.lost_after_s = lost_after_s or float(os.environ.get("CLIPQA_SLURM_LOST_AFTER_S", 30))
        self.since = time.time()
        self._gone: dict[str, float] = {}  # job id -> when it was first seen out of the queue without a result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipqa-slurm-watch", daemon=True)

    def __enter__(self) -> LostJobWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _jobs(self) -> dict[str, Any]:
        """job id -> submitit's paths, for the jobs of this launch still without a result."""
        from submitit.core.utils import JobPaths

        jobs = {}
        for submitted in self.root.rglob("*_submitted.pkl") if self.root.is_dir() else ():
            if submitted.stat().st_mtime < self.since - 1:
                continue  # an earlier launch's (a re-run of the sweep)
            job_id = submitted.name[: -len("_submitted.pkl")]
            paths = JobPaths(self.folder, job_id=job_id, task_id=0)
            if not paths.result_pickle.exists():
                jobs[job_id] = paths
        return jobs

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as e:  # the watch must never stop the sweep
                log.warning("watching the SLURM jobs failed this time: %s", e)

    def check(self) -> list[str]:
        """One poll; the ids of the jobs found lost (their results written)."""
        jobs = self._jobs()
        queued = queued_job_ids() if jobs else None
        if queued is None:
            return []
        now, lost = time.time(), []
        for job_id, paths in jobs.items():
            if job_id in queued or any(q.startswith(job_id.split("_")[0] + "_[") for q in queued):  # (123_[2-5])
                self._gone.pop(job_id, None)
                continue
            first = self._gone.setdefault(job_id, now)
            if now - first >= self.lost_after_s and not paths.result_pickle.exists():
                write_lost_result(job_id, paths, now - first)
                lost.append(job_id)
        return lost


def write_lost_result(job_id: str, paths, gone_s: float) -> None:
    """The result submitit waits for, in the job's place: a FAILED Hydra job whose error names the job and its log."""
    from submitit.core.utils import cloudpickle_dump, temporary_save_path

    error = JobLostError(
        f"SLURM job {job_id} FAILED: it left the queue {gone_s:.0f} s ago without writing its result (killed, its "
        f"node lost, out of memory?); its log: {paths.stdout} (and {paths.stderr.name})"
    )
    log.error("%s", error)
    ret = JobReturn(status=JobStatus.FAILED, _return_value=error, working_dir=str(paths.folder))
    with temporary_save_path(paths.result_pickle) as tmp:
        cloudpickle_dump(("success", ret), tmp)
