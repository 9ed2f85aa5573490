"""A Hydra sweeper on current Optuna (>= 4; tested on 5.0), for any Hydra app: ``-m hydra/sweeper=clipqa_optuna``.

It depends on Hydra and Optuna only (SQLAlchemy comes with Optuna; matplotlib, if installed, draws the Pareto front).
Why not ``hydra-optuna-sweeper``: its last release (1.3.0) declares ``optuna<3`` (installing it downgrades Optuna
to 2.10), and forced onto a current Optuna it cannot prune (the trial never reaches the job) and warns that it
breaks with Optuna 6. This one keeps its config layout and adds pruning, resume, several workers on one study,
failure handling and hooks for the host app. The manual: docs/optuna-plugin.md.

The modules, one concern each:

- ``config.py``: the config schema (``hydra.sweeper.*``) and its defaults; ``sweeper.py``: the class Hydra
  instantiates, a shim over ``_impl.py``: the sweep, step by step (ask -> launch -> tell);
- ``_space.py``: Hydra's override grammar -> Optuna distributions, and values back to overrides;
- ``_storage.py``: storages and studies opened safely from many processes, URLs without passwords;
- ``_workers.py``: several workers on one study: the ask lock, heartbeats, dead workers' trials failed and retried;
- ``_results.py``: outcomes told to Optuna, optimization_results.yaml, pareto_front.png;
- ``hooks.py``: the interface a host app implements to add its extras (``hydra.sweeper.hooks``);
- ``trial.py``: the job side, for any app: its trial, reporting and pruning, what to return;
- ``errors.py``: :class:`~.errors.SweeperError`, a one-paragraph message naming the key.

``hydra_plugins/`` has no ``__init__.py`` on purpose: it is a namespace package shared with installed Hydra
plugins (joblib, submitit), which an ``__init__.py`` here would hide. Hydra finds this sweeper by importing every
module under ``hydra_plugins``; this file registers its configs.
"""

from hydra.core.config_store import ConfigStore

from .config import SAMPLERS, ClipqaOptunaSweeperConf

_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="clipqa_optuna", node=ClipqaOptunaSweeperConf, provider="clipqa_optuna")
for _name, _node in SAMPLERS.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="clipqa_optuna")
