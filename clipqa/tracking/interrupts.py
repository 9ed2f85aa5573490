"""Holding a Ctrl-C that arrives during an MLflow write until the write has finished."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager


@contextmanager
def ctrl_c_after():
    """Hold a Ctrl-C (SIGINT) that arrives during an MLflow write until the write has finished, then raise it.

    Why: a KeyboardInterrupt inside a write can leave its database transaction open (an SQLite store stays locked),
    and the run's last write, the one that marks it KILLED, then waits on that lock for minutes. Python runs signal
    handlers in the main thread only, so elsewhere this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
        elif caught and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)  # the operating system's default: end the process
