"""Toy Hydra app: a quadratic of x and y with its minimum (0) at x=2, y=-1 (like Hydra's Optuna example apps).

It writes what it received (values and their Python types, its working directory) to ``received.json`` in its
output folder, so tests can check that the sweeper's values reach the job exactly as Hydra's grammar means them.
"""

import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path=".", config_name="quadratic")
def main(cfg: DictConfig) -> float:
    value = (cfg.x - 2) ** 2 + (cfg.y + 1) ** 2
    if cfg.report:  # any app can report to its trial, through the sweeper plugin's trial API
        from hydra_plugins.clipqa_optuna_sweeper.trial import current_trial

        trial = current_trial()
        if trial is not None:
            trial.report(value, 0)
    values = OmegaConf.to_container(cfg)
    received = {"values": values, "types": {k: type(v).__name__ for k, v in values.items()}, "cwd": os.getcwd()}
    (Path(HydraConfig.get().runtime.output_dir) / "received.json").write_text(json.dumps(received))
    return value


if __name__ == "__main__":
    main()
