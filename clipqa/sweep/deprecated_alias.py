"""The deprecated ``python train.py -cd sweeps -cn NAME``: a warning naming the command that replaces it.

``sweeps/NAME.yaml`` is a stub that composes ``conf/config.yaml`` with ``sweep=NAME`` (``conf/sweep/NAME.yaml``) and
registers :class:`DeprecatedAlias` under ``hydra.callbacks``; Hydra then calls it before the first job starts.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def new_command(sweep: str, overrides: list[str]) -> str:
    """``python train.py -m sweep=NAME [overrides]``: what the alias with these overrides now runs."""
    return " ".join(["python train.py -m", f"sweep={sweep}", *map(shlex.quote, overrides)])


class DeprecatedAlias(Callback):
    """Print one deprecation line, with the user's overrides, on stderr when the run or multirun starts."""

    def __init__(self, sweep: str) -> None:
        self.sweep = sweep

    def _warn(self, config: DictConfig) -> None:
        given = [*config.hydra.overrides.hydra, *config.hydra.overrides.task]
        overrides = [o for o in given if not o.startswith("hydra.mode=")]  # -m says it
        print(
            f"clipqa: warning: `-cd sweeps -cn {self.sweep}` is deprecated and will be removed; "
            f"use: {new_command(self.sweep, overrides)}",
            file=sys.stderr,
            flush=True,
        )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._warn(config)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:  # hydra.mode=RUN given on the command line
        self._warn(config)
