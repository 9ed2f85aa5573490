"""A run ended by a reaper that turns out alive: the tag the reaper leaves, and the run's way back to RUNNING.

When a sweeper worker dies, another worker marks its trials FAIL and ends their MLflow runs KILLED with the tag
``clipqa.reaped_by`` (:mod:`clipqa.sweep.reaping`). A worker that was only slow (its heartbeats late, a job on a
cluster that outlived its sweeper) goes on writing to its run: :func:`revive_if_reaped` puts such a run back to
RUNNING and keeps the reaper's note as ``clipqa.revived`` (:class:`clipqa.tracking.tracker.MlflowTracker` calls it
at its next write after a check interval, and before it ends the run).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

REAPED_TAG = "clipqa.reaped_by"  # who ended the run, and why (a dead worker's run, or a job lost on the cluster)
REVIVED_TAG = "clipqa.revived"  # a reaped run that turned out alive: the reaper's note, kept


def revive_if_reaped(client, run_id: str) -> bool:
    """Back to RUNNING if a reaper ended this run (it is alive: it is writing); True when it was."""
    run = client.get_run(run_id)
    note = run.data.tags.get(REAPED_TAG)
    if run.info.status == "RUNNING" or note is None:
        return False
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, REVIVED_TAG, note)
    client.delete_tag(run_id, REAPED_TAG)
    log.warning("MLflow run %s was ended as its worker's (%s), but it is alive: RUNNING again", run_id, note)
    return True
