"""The sweeper's config schema (``hydra/sweeper: clipqa_optuna``) and its defaults, the one place they are set.

sweeps/optuna.yaml sets only the search space (``params``); change a default here, or per run on the command line
(``hydra.sweeper.n_trials=30``).
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid
    seed: int = 42
    n_startup_trials: int = 5  # tpe: random trials before the model kicks in


@dataclass
class PrunerConf:
    name: str = "median"  # median | hyperband | none
    n_startup_trials: int = 2  # median: trials that finish before any pruning
    n_warmup_steps: int = 0  # median: steps before a trial can be pruned
    min_resource: int = 1  # hyperband (in optimizer steps)
    max_resource: str = "auto"
    reduction_factor: int = 3


@dataclass
class ClipqaOptunaSweeperConf:
    _target_: str = "hydra_plugins.clipqa_optuna_sweeper.sweeper.ClipqaOptunaSweeper"
    direction: str = "maximize"  # the objective is train.py's return value: val/acc
    n_trials: int = 20  # total over the study, finished trials of earlier runs included
    n_jobs: int = 1  # trials launched at once (use hydra/launcher=joblib to run them in parallel)
    storage: Any = None  # Optuna storage URL; None: sqlite:///<project folder>/optuna.db; journal:///PATH.log, ...
    study_name: str = "clipqa"
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    # key -> Hydra override grammar: choice(a, b), range(0, 4), interval(1e-5, 1e-3), tag(log, interval(...)),
    # tag(int, interval(1, 8))
    params: dict[str, str] = field(default_factory=dict)
