"""GPU leases: concurrent jobs on one machine (``hydra/launcher=joblib hydra.launcher.n_jobs=N``) each take a GPU of
their own instead of all landing on ``cuda:0``.

A lease is an exclusive ``flock`` on one lock file per GPU, ``<paths.cache_dir>/gpu-leases/<host>/gpu-<UUID>.lock``
(named by the GPU's UUID, not its index, which depends on ``CUDA_VISIBLE_DEVICES``): a job takes the first GPU
whose lock is free and holds it until the job ends. Jobs may finish in any order; a job
that dies (SIGKILL, out of memory) loses its lock with its file descriptors, so the operating system hands the GPU
back with no stale lease to clean up. The host name in the path keeps machines that share one cache folder (the
team setup's shared feature cache) from leasing each other's GPUs. ``filelock`` (already the feature cache's build
lock) does the locking; it opens each lock file with a descriptor of its own, so two leases in one process exclude
each other too.

``trainer.device=cuda:K`` pins a GPU without a lease; ``trainer.gpu_lease=false`` turns leases off (every job on
``cuda``'s default GPU, as plain PyTorch does). When every GPU is leased a job waits for one, saying so every minute.

Test seam: ``CLIPQA_FAKE_GPU_COUNT=N`` makes a machine without CUDA lease among N pretend GPUs (the same code path)
and then run on the CPU; tests use it to check that concurrent jobs never share a GPU.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock
import torch

from clipqa.errors import Preempted

log = logging.getLogger(__name__)

FAKE_COUNT_ENV = "CLIPQA_FAKE_GPU_COUNT"
LEASE_FOLDER = "gpu-leases"


def visible_gpus() -> list[str]:
    """A name for each CUDA GPU this process may use, in index order: the GPU's UUID, so the lease follows the
    physical GPU (two SLURM jobs on one node each see their own GPU as ``cuda:0``; ``CUDA_VISIBLE_DEVICES`` too)."""
    if fake := os.environ.get(FAKE_COUNT_ENV):
        return [f"fake{i}" for i in range(int(fake))]
    if not torch.cuda.is_available():
        return []
    return [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())]


def lease_folder(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / LEASE_FOLDER / socket.gethostname()


@contextmanager
def lease_gpu(
    folder: Path, gpus: list[str], holder: str, stop=None, poll_s: float = 1.0, report_every_s: float = 60.0
) -> Iterator[int]:
    """Hold the first free one of ``gpus`` (:func:`visible_gpus`) for the ``with`` block, yielding its index; wait
    while all are leased.

    ``stop`` (a :class:`clipqa.training.signals.StopRequest`): a SIGTERM/SIGUSR2 while waiting ends the wait with
    :class:`Preempted`, as it would end training (nothing trained yet, so nothing to save)."""
    folder.mkdir(parents=True, exist_ok=True)
    waited_since = time.monotonic()
    next_report = waited_since
    while True:
        for index, gpu in enumerate(gpus):
            lock = filelock.FileLock(folder / f"{gpu}.lock", timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                continue
            # Who holds it, for the waiting jobs' messages (a separate file: the lock file is truncated on open).
            holder_file = folder / f"{gpu}.holder"
            holder_file.write_text(f"{holder} (pid {os.getpid()})\n")
            try:
                yield index
            finally:
                holder_file.unlink(missing_ok=True)
                lock.release()
            return
        now = time.monotonic()
        if now >= next_report:
            holders = [_read(folder / f"{gpu}.holder") for gpu in gpus]
            log.info(
                "all %d GPUs are leased by other jobs (%s); waiting %.0f s so far <trainer.gpu_lease=true>",
                len(gpus),
                "; ".join(f"cuda:{i}: {h}" for i, h in enumerate(holders)),
                now - waited_since,
            )
            next_report = now + report_every_s
        if stop is not None and stop.requested:
            raise Preempted(f"stopped by {stop.reason} while waiting for a free GPU; re-run the same command")
        time.sleep(poll_s)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"
