"""The Hydra-facing shim: ``hydra/sweeper=clipqa_optuna`` instantiates :class:`ClipqaOptunaSweeper` with the keys of
:class:`.config.ClipqaOptunaSweeperConf`; the work is :class:`._impl.OptunaSweeperImpl` (as in Hydra's own
hydra-optuna-sweeper). Hydra imports every module under ``hydra_plugins`` to find plugins, so none of them imports
Optuna at the top: it loads when a sweep starts.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from ._impl import OptunaSweeperImpl


class ClipqaOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        settings.pop("_target_", None)
        self.sweeper = OptunaSweeperImpl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
