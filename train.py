"""Hydra entry point: compose the config, run one training job, return the objective for sweepers.

    python train.py experiment=demo
    python train.py -m experiment=demo mapper.num_layers=0,1,2

The run logic is clipqa.train.train (importable, tested directly). User-fixable problems (ClipqaError) are
printed as one paragraph without a traceback, and the process exits with status 2.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clipqa.errors import ClipqaError
from clipqa.metrics import OBJECTIVE

log = logging.getLogger("clipqa")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from clipqa.config import validate

    try:
        validate(cfg)  # bad config values fail here, before torch/transformers load the models
        from clipqa.tracking import hydra_run_info
        from clipqa.train import train

        metrics = train(cfg, HydraConfig.get().runtime.output_dir, hydra_run_info())
    except ClipqaError as e:
        log.error("clipqa: error: %s", e)  # console and the run's train.log, one paragraph, no traceback
        sys.exit(2)
    return metrics[OBJECTIVE]


if __name__ == "__main__":
    main()
