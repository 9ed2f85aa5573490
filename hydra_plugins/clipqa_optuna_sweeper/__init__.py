"""A Hydra sweeper on current Optuna (>= 4; tested on 5.0), for any Hydra app: ``-m hydra/sweeper=clipqa_optuna``.

Why not ``hydra-optuna-sweeper``: its last release (1.3.0) declares ``optuna<3`` (installing it downgrades Optuna
to 2.10), and forced onto a current Optuna it cannot prune (the trial never reaches the job) and warns that it
breaks with Optuna 6. This one keeps its config layout (config.py) and adds pruning, resume and failure handling:
it asks Optuna for trials, launches them through Hydra's launcher (basic, joblib, submitit), hands each job its
trial (:mod:`clipqa.sweep.optuna_trial`, through the job's environment) so the job can report and be pruned, and tells
Optuna the outcome (COMPLETE, PRUNED or FAIL with the reason).

``hydra_plugins/`` has no ``__init__.py`` on purpose: it is a namespace package shared with installed Hydra
plugins (joblib, submitit), which an ``__init__.py`` here would hide. Hydra finds this sweeper by importing every
module under ``hydra_plugins``; this file registers its configs.
"""

from hydra.core.config_store import ConfigStore

from .config import SAMPLERS, ClipqaOptunaSweeperConf

_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="clipqa_optuna", node=ClipqaOptunaSweeperConf, provider="clipqa")
for _name, _node in SAMPLERS.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="clipqa")
