"""The sweeper's config schema (``hydra/sweeper: clipqa_optuna``) and its defaults, the one place they are set.

The layout is Hydra's Optuna sweeper's (``hydra-optuna-sweeper``), so its sweep files keep working: ``direction``,
``study_name``, ``storage``, ``n_trials``, ``n_jobs``, ``max_failure_rate``, ``params``, ``custom_search_space``, and
the sampler as a config group (``hydra/sweeper/sampler=tpe|random|grid|cmaes|qmc|nsgaii``) whose ``_target_`` is any
Optuna sampler and whose other keys are its arguments (``+hydra.sweeper.sampler.ARG=...`` passes one not listed
here). Added: ``metric_names``, ``pruner``, ``hooks`` (the host app's extras: :mod:`.hooks`) and, for several
workers on one study, ``heartbeat_interval``, ``grace_period``, ``max_retry``. The manual: docs/optuna-plugin.md.

Change a default here, or per run on the command line (``hydra.sweeper.n_trials=30``,
``hydra/sweeper/sampler=random``).
"""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class SamplerConf:
    _target_: str = MISSING
    # Seeded by default (Hydra's: unseeded). A study resumed with N trials in it gets seed + N, so its random
    # start-up trials are not the first run's again (qmc excepted: its sequence belongs to the study).
    seed: int | None = 42


@dataclass
class TPESamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.TPESampler"
    n_startup_trials: int = 5  # random trials before the model kicks in (Optuna's and Hydra's default: 10)
    n_ei_candidates: int = 24
    multivariate: bool | None = None
    constant_liar: bool = True  # parallel trials (n_jobs > 1) do not all ask for the same point


@dataclass
class RandomSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConf(SamplerConf):
    # The grid is the search space (every choice(...) and range(...) value); n_trials is capped at its size.
    _target_: str = "optuna.samplers.GridSampler"


@dataclass
class CmaEsSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.CmaEsSampler"  # needs the cmaes package (pip install cmaes)
    n_startup_trials: int = 1
    independent_sampler: Any = None  # for categorical parameters; None: random
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    popsize: int | None = None
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False


@dataclass
class QMCSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.QMCSampler"
    qmc_type: str = "sobol"  # sobol | halton | ...
    scramble: bool = False
    independent_sampler: Any = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class NSGAIISamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.NSGAIISampler"  # multi-objective studies
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


SAMPLERS = {
    "tpe": TPESamplerConf,
    "random": RandomSamplerConf,
    "grid": GridSamplerConf,
    "cmaes": CmaEsSamplerConf,
    "qmc": QMCSamplerConf,
    "nsgaii": NSGAIISamplerConf,
}


@dataclass
class PrunerConf:
    # The job reports to its trial (trial.report(value, step), e.g. at every validation) and stops when this says so.
    # Single-objective studies only: Optuna cannot prune a multi-objective one.
    name: str = "median"  # median | hyperband | none
    n_startup_trials: int = 2  # median: trials that finish before any pruning
    n_warmup_steps: int = 0  # median: steps before a trial can be pruned
    min_resource: int = 1  # hyperband (in optimizer steps)
    max_resource: str = "auto"
    reduction_factor: int = 3


@dataclass
class ClipqaOptunaSweeperConf:
    _target_: str = "hydra_plugins.clipqa_optuna_sweeper.sweeper.ClipqaOptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler itself (a resumed study's seed, the grid's points)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING  # the hydra/sweeper/sampler group: tpe | random | grid | cmaes | qmc | nsgaii
    # maximize | minimize, or one per objective: [maximize, minimize] (the app returns a list or tuple).
    # Hydra's default is minimize; ours is maximize (apps mostly return a score, such as an accuracy).
    direction: Any = "maximize"
    # Names of the objectives (optuna-dashboard, optimization_results.yaml; the jobs get them: TrialJob.metric_names,
    # e.g. to pick what to return: [val/acc, params/trainable] with direction [maximize, minimize]). null: a hook's
    # default (hooks.defaults), else unnamed.
    metric_names: list[str] | None = None
    n_trials: int = 20  # total over the study, trials of earlier runs included (capped at the grid's size)
    n_jobs: int = 1  # trials launched at once (use hydra/launcher=joblib to run them in parallel)
    # Stop the sweep (exit non-zero) once more than this fraction of the trials it launched failed. Hydra's default
    # is 0.0 (the first failure stops it); ours goes on, since a failing configuration is an ablation result. A run
    # whose every trial failed always exits non-zero.
    max_failure_rate: float = 1.0
    # Optuna storage URL: sqlite:///PATH.db (a relative path is made absolute), journal:///PATH.log, postgresql://...
    # null: a hook's default (hooks.defaults), else in memory (as Hydra's sweeper: no resume, no job-side pruning).
    storage: Any = None
    study_name: str | None = None  # null: a hook's default, else the app's name (hydra.job.name)
    # Several sweeper processes may work on one study (SQLite or PostgreSQL): each records a heartbeat for the
    # trials it runs every heartbeat_interval seconds; a trial without one for grace_period seconds (its sweeper
    # died) is failed by any other worker (or the next sweep on the study) and retried with the same parameters up
    # to max_retry times (0: left FAIL). A retried trial does not count toward n_trials. Database storages only
    # (not journal:// or in memory); heartbeat_interval=null turns this off.
    heartbeat_interval: int | None = 10
    grace_period: int = 30
    max_retry: int = 1
    pruner: PrunerConf = field(default_factory=PrunerConf)
    # key -> Hydra's override grammar: choice(a, b), range(0, 4), range(1, 10, 3), interval(1e-5, 1e-3),
    # tag(log, interval(...)), int(interval(1, 8)) (or tag(int, interval(1, 8))); a plain value fixes the key.
    params: dict[str, str] | None = None
    # "module.function": called as function(config, trial) after each ask; it may suggest more parameters
    # (trial.suggest_*), which are passed to the job like the others.
    custom_search_space: str | None = None
    # The host app's extras (docs/optuna-plugin.md, "Hooks"): a list of {_target_: module.Class, ...args}, each built
    # with hydra.utils.instantiate and called at the study's start, each trial's end, the sweep's end or failure.
    hooks: list[Any] = field(default_factory=list)
