"""Hydra entry point: compose the config, run one training job, return the objective for sweepers.

    python train.py experiment=demo
    python train.py -m experiment=demo mapper.num_layers=0,1,2
    python train.py -m sweep=paper experiment=demo       # a named sweep: conf/sweep/paper.yaml

The run logic is :func:`clipqa.training.run.train` (importable, tested directly). User-fixable problems (ClipqaError)
are
printed as one paragraph without a traceback, and the process exits with status 2.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from clipqa.errors import EXIT_PREEMPTED, ClipqaError, Preempted

log = logging.getLogger("clipqa")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    from clipqa.config import validate
    from clipqa.overrides import warn_replaced_choices
    from clipqa.sweep.optuna_trial import TrialJob, objective, pruning_callback, record_run

    trial = TrialJob.from_env()  # set when the Optuna sweeper (hydra/sweeper=clipqa_optuna) launched this job
    try:
        if trial is not None:  # MLflow tags (optuna.trial) and names ("trial N: ...") the run by its trial
            with open_dict(cfg):
                cfg.optuna = {"trial": trial.number, "study_name": trial.study_name}
        cfg = validate(cfg)  # bad config values fail here, before torch/transformers load the models
        warn_replaced_choices(cfg)  # freeze=staged +paper=V2 runs V2: say so
        from clipqa.tracking.run_info import hydra_run_info
        from clipqa.training.run import train

        info = hydra_run_info()
        if trial is not None:  # clipqa.tracking.run_info.run_name reads the trial number from the overrides
            info.overrides.append(f"+optuna.trial={trial.number}")
        on_validation = pruning_callback(trial)  # val/acc to the trial, so it can prune (None: not pruned)
        out = HydraConfig.get().runtime.output_dir
        with record_run(trial, out):  # its MLflow run id on the trial, for a worker that reaps it if this one dies
            metrics = train(cfg, out, info, on_validation)
        value = objective(metrics, trial)  # val/acc, or hydra.sweeper.metric_names (a tuple for several objectives)
    except Preempted as e:
        log.warning("clipqa: %s", e)
        sys.exit(EXIT_PREEMPTED)
    except ClipqaError as e:
        log.error("clipqa: error: %s", e)  # console and the run's train.log, one paragraph, no traceback
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed job (an Optuna study goes on)
        sys.exit(2)
    return value


if __name__ == "__main__":
    main()
