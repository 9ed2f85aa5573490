"""GPU leases (clipqa/training/gpu_leases.py): concurrent jobs on one machine never share a GPU; a dead job's GPU
comes back.

The lease code is the one that runs on GPU machines; CPU tests reach it with a pretend GPU count
(``CLIPQA_FAKE_GPU_COUNT``), the test seam described in clipqa/training/gpu_leases.py.
"""

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from clipqa.errors import Preempted
from clipqa.training.gpu_leases import lease_gpu
from clipqa.training.signals import StopRequest
from tests.helpers.runs import SMALL_DEMO


def _gpus(count: int) -> list[str]:
    return [f"fake{i}" for i in range(count)]


def _hold(folder: str, count: int, seconds: float, record: str) -> None:
    with lease_gpu(Path(folder), _gpus(count), holder=f"job {os.getpid()}", poll_s=0.05) as index:
        start = time.time()
        time.sleep(seconds)
        end = time.time()
    with open(record, "a") as f:
        f.write(json.dumps({"gpu": index, "start": start, "end": end}) + "\n")


def _overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_concurrent_jobs_never_share_a_gpu_and_all_gpus_are_used(tmp_path):
    """Six jobs, three at a time, on two GPUs (the bug: every job on cuda:0, or two live jobs handed one GPU)."""
    record = tmp_path / "leases.jsonl"
    context = multiprocessing.get_context("fork")
    jobs = [context.Process(target=_hold, args=(str(tmp_path / "locks"), 2, 0.4, str(record))) for _ in range(6)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    leases = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(leases) == 6 and {lease["gpu"] for lease in leases} == {0, 1}
    for i, a in enumerate(leases):
        for b in leases[i + 1 :]:
            assert not (a["gpu"] == b["gpu"] and _overlaps(a, b)), (a, b)


def test_leases_in_one_process_exclude_each_other_and_release_out_of_order(tmp_path):
    """Jobs finish in any order: the GPU a finished job held is the next one handed out."""
    folder = tmp_path / "locks"
    with lease_gpu(folder, _gpus(3), "a") as first:
        with lease_gpu(folder, _gpus(3), "b") as second:
            assert (first, second) == (0, 1)
            with lease_gpu(folder, _gpus(3), "c") as third:
                assert third == 2
        with lease_gpu(folder, _gpus(3), "d") as again:  # "b" ended first, while "a" still runs
            assert again == 1


@pytest.mark.slow
def test_a_killed_jobs_gpu_is_free_again(tmp_path):
    """SIGKILL leaves no stale lease: the operating system drops the dead job's lock (no clean-up step)."""
    folder = tmp_path / "locks"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"""
import time
from pathlib import Path
from clipqa.training.gpu_leases import lease_gpu
with lease_gpu(Path({str(folder)!r}), ["fake0"], "victim") as index:
    print(index, flush=True)
    time.sleep(600)
"""],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "0"
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(_lease_once(folder)))
        waiter.start()
        time.sleep(0.5)
        assert not got, "the only GPU was handed to a second job while its holder was alive"
        holder.send_signal(signal.SIGKILL)
        waiter.join(10)
        assert got == [0]
    finally:
        holder.kill()
        holder.wait()


def _lease_once(folder: Path) -> int:
    with lease_gpu(folder, _gpus(1), "waiter", poll_s=0.05) as index:
        return index


def test_a_stop_signal_ends_the_wait_for_a_gpu(tmp_path):
    """A job preempted while all GPUs are busy stops (re-run to resume) instead of waiting on until SIGKILL."""
    folder = tmp_path / "locks"
    stop = StopRequest()
    stop.requested, stop.signals = True, [signal.SIGTERM]
    with lease_gpu(folder, _gpus(1), "busy"):
        with pytest.raises(Preempted, match="SIGTERM while waiting for a free GPU"):
            with lease_gpu(folder, _gpus(1), "waiting", stop=stop, poll_s=0.01):
                pass


def _job_leases(sweep_dir: Path) -> list[dict]:
    """(gpu, lease time, end time) of each job, from its train.log."""
    leases = []
    for log in sweep_dir.glob("*/train.log"):
        text = log.read_text()
        lease = re.search(r"^\[([^\]]+)\]\[clipqa.training.device\]\[INFO\] - leased GPU (\d+) of 2", text, re.M)
        stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", text, re.M)
        assert lease, f"{log}: no lease line"
        leases.append(
            {
                "gpu": int(lease.group(2)),
                "start": datetime.strptime(lease.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(),
                "end": datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp(),
            }
        )
    return leases


@pytest.mark.slow
def test_parallel_sweep_jobs_each_train_on_their_own_gpu(tmp_path):
    """`hydra/launcher=joblib hydra.launcher.n_jobs=2` on a two-GPU machine: the jobs running at the same time
    lease different GPUs, and both GPUs are used (the bug: all on cuda:0)."""
    sweep = tmp_path / "sweep"
    # No feature cache yet: the jobs build it inside joblib's (loky) worker processes, where DataLoader workers
    # once failed to start (clipqa.data.cocoqa.worker_context). Demo data and backbones are copied, not rebuilt.
    cache = tmp_path / "cache"
    shutil.copytree(os.environ["CLIPQA_CACHE_DIR"], cache, ignore=shutil.ignore_patterns("features", "gpu-leases"))
    env = {**os.environ, "CLIPQA_FAKE_GPU_COUNT": "2", "CLIPQA_CACHE_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *SMALL_DEMO, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "trainer.seed=1,2,3,4", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    leases = _job_leases(sweep)
    assert len(leases) == 4 and {lease["gpu"] for lease in leases} == {0, 1}
    assert any(_overlaps(a, b) for i, a in enumerate(leases) for b in leases[i + 1 :]), "jobs never ran together"
    for i, a in enumerate(leases):
        for b in leases[i + 1 :]:
            assert not (a["gpu"] == b["gpu"] and _overlaps(a, b)), (a, b)


def test_a_pinned_device_takes_no_lease_and_auto_does(tmp_path, monkeypatch):
    """trainer.device=cpu (or cuda:K) is used as given, never waiting behind leased GPUs; trainer.device=auto on a
    several-GPU machine does lease (build.claim_device is what clipqa.training.run.train holds for the whole run)."""
    from clipqa.training.device import claim_device
    from clipqa.training.gpu_leases import lease_folder

    monkeypatch.setenv("CLIPQA_FAKE_GPU_COUNT", "2")
    cache = str(tmp_path / "cache")
    stop = StopRequest()
    stop.requested, stop.signals = True, [signal.SIGUSR2]
    with lease_gpu(lease_folder(cache), _gpus(2), "busy"), lease_gpu(lease_folder(cache), _gpus(2), "busy too"):
        with claim_device("cpu", cache, True, "pinned", stop) as device:
            assert device.type == "cpu"
        with claim_device("auto", cache, False, "lease off", stop) as device:
            assert device.type == "cpu"
        with pytest.raises(Preempted, match="SIGUSR2 while waiting"):
            with claim_device("auto", cache, True, "leasing", stop):
                pass
    with claim_device("auto", cache, True, "leasing") as device:
        assert (lease_folder(cache) / "fake0.holder").read_text().startswith("leasing")
    monkeypatch.setenv("CLIPQA_FAKE_GPU_COUNT", "1")  # one GPU: nothing to choose, so no lease and no waiting
    with lease_gpu(lease_folder(cache), _gpus(1), "busy"), claim_device("auto", cache, True, "alone") as device:
        assert not (lease_folder(cache) / "fake0.holder").read_text().startswith("alone")
