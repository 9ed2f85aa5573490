"""A graceful stop: SIGTERM (preemption, ``scancel``, ``scontrol requeue``) or SIGUSR2 (the time-limit warning that
submitit asks SLURM for: ``sbatch --signal=USR2@<signal_delay_s>``) asks the loop to checkpoint and stop.

Under the submitit launcher (``hydra/launcher=slurm``) submitit has handlers of its own on these signals: SIGUSR2
re-submits the job and requeues it (``scontrol requeue``), SIGTERM is only logged. Ours replace them while training
runs and hand the signal on to them once the stop is done (the checkpoint saved, the MLflow run marked resumable), so
a requeued job finds the checkpoint and continues from it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from clipqa.errors import Preempted

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    """Set by the signal handler; the training loop checks it at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self.signals: list[int] = []  # the stop signals received, in order

    @property
    def reason(self) -> str:
        """``SIGTERM``, ``SIGUSR2``, ``SIGTERM+SIGUSR2``, ... (``a stop request`` when set without a signal)."""
        return "+".join(signal.Signals(s).name for s in self.signals) or "a stop request"


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGUSR2 set ``requested`` instead of ending the process. When the block ends
    with :class:`~clipqa.errors.Preempted` (the loop honoured the stop), the handlers that were there before get the
    signals that arrived, in order (submitit's requeue the job); they are back in place after the block either way.
    Outside the main thread (where Python cannot install handlers) nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if not stop.requested:
            log.warning("%s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)
        stop.requested = True
        if signum not in stop.signals:
            stop.signals.append(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    except Preempted:
        _restore(previous)
        _hand_on(stop.signals, previous)
        raise
    finally:
        _restore(previous)


def _restore(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def _hand_on(received: list[int], previous: dict) -> None:
    """Call the earlier Python handlers of the received signals (default and ignore dispositions are left alone:
    the process ends with its own exit status, 75)."""
    for s in received:
        h = previous.get(s)
        if callable(h):
            log.info("handing %s on to %s", signal.Signals(s).name, getattr(h, "__qualname__", h))
            h(s, None)
