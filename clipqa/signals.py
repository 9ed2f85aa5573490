"""A graceful stop: SIGTERM (what SLURM sends before preempting a job) asks the loop to checkpoint and stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class StopRequest:
    """Set by the signal handler; the training loop checks it at step boundaries."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """Within the block, SIGTERM sets ``requested`` instead of ending the process; the previous handler returns
    after it. Outside the main thread (where Python cannot install handlers) nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        stop.requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
