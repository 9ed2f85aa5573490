"""Toy Hydra app for several sweeper processes on one study (tests/system/test_shared_optuna.py): a "training" of
``steps`` steps of ``step_seconds`` each that reports ``x`` to its trial at every step and stops when the pruner
says so.

It writes ``started.json`` (its trial's number, the sweeper's process id) into its output folder when it starts, so a
test can tell which worker runs which trial and kill a worker while a trial of it runs. ``wait_for_complete: N``
holds the first report until the study has N complete trials (a pruner's start-up trials, run by another worker).
"""

import json
import os
import time
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hydra_plugins.clipqa_optuna_sweeper.trial import current_trial


@hydra.main(version_base="1.3", config_path=".", config_name="steps")
def main(cfg: DictConfig) -> float:
    trial = current_trial()
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "started.json").write_text(json.dumps({"trial": trial.number, "pid": os.getpid()}))
    while cfg.wait_for_complete and len(
        trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ) < int(cfg.wait_for_complete):
        time.sleep(0.2)
    for step in range(cfg.steps):
        time.sleep(cfg.step_seconds)
        trial.report(cfg.x, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}")
    return cfg.x


if __name__ == "__main__":
    main()
