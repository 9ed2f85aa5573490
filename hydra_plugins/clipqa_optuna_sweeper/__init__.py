"""A Hydra sweeper on current Optuna (>= 4; tested on 5.0), for ``python train.py -cd sweeps -cn optuna``.

Why not ``hydra-optuna-sweeper``: its last release (1.3.0) declares ``optuna<3`` (installing it downgrades Optuna
to 2.10), and forced onto a current Optuna it cannot prune (the trial never reaches the job) and warns that it
breaks with Optuna 6. This one is small: it asks Optuna for trials, launches them through Hydra's launcher
(basic or joblib), hands each job its trial id so the job can report validation accuracy and be pruned, and tells
Optuna the outcome (COMPLETE, PRUNED or FAIL).

``hydra_plugins/`` has no ``__init__.py`` on purpose: it is a namespace package shared with installed Hydra
plugins (joblib, submitit), which an ``__init__.py`` here would hide.
"""

from hydra.core.config_store import ConfigStore

from .config import ClipqaOptunaSweeperConf

ConfigStore.instance().store(
    group="hydra/sweeper", name="clipqa_optuna", node=ClipqaOptunaSweeperConf, provider="clipqa"
)
