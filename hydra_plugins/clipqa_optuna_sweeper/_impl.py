"""The sweep: ask -> launch -> tell in batches of ``n_jobs`` until the study holds ``n_trials`` trials.

One sweep, step by step (:meth:`OptunaSweeperImpl.sweep`): check the settings (:meth:`~OptunaSweeperImpl._settings`,
after the hooks' defaults), open the storage and the study (its direction checked), read the search space
(:mod:`._space`), then run batches (:meth:`~OptunaSweeperImpl._run`): each trial asked under the study's lock and
given a heartbeat (:mod:`._workers`), the batch launched through Hydra's launcher (basic, joblib, submitit) with each
job's trial in its environment (:mod:`.trial`), each outcome told (:mod:`._results`); at the end write
``optimization_results.yaml`` and call the hooks (:mod:`.hooks`). Everything the host app adds (tags in a tracking
server, its default storage) comes through the hooks: this module knows no app.
"""

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import _results, _workers
from ._space import SearchSpace, grid, search_space
from ._storage import absolute_storage_url, make_storage, open_study, shown_url
from .errors import SweeperError
from .hooks import Study, build_hooks, call
from .trial import STORAGE_ENV, TRIAL_ENV, TrialJob, make_pruner

log = logging.getLogger(__name__)


def _target_name(sampler_cfg: Any) -> str:
    return str(sampler_cfg.get("_target_", "")).rsplit(".", 1)[-1]


def _show_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "no searched parameters"


@dataclass
class _Run:
    """One sweep's state, built by the set-up steps and used by the loop."""

    study: Any
    storage: Any
    url: str | None  # with its password (never logged); None: in memory
    space: SearchSpace
    n_trials: int
    grid: bool
    job_pruner: dict | None  # what the jobs get (None: not pruned)
    info: Study
    failures: list[str] = field(default_factory=list)
    launched: int = 0


class OptunaSweeperImpl(Sweeper):
    def __init__(self, sampler: Any, direction: Any, n_trials: int, n_jobs: int, storage: Any,
                 study_name: str | None, pruner: Any, params: dict[str, str] | None = None,
                 metric_names: list[str] | None = None, max_failure_rate: float = 1.0,
                 custom_search_space: str | None = None, heartbeat_interval: int | None = 10, grace_period: int = 30,
                 max_retry: int = 1, hooks: Any = None) -> None:  # fmt: skip
        self.sampler_cfg, self.pruner_cfg, self.hooks_cfg = sampler, pruner, hooks
        self.direction, self.n_trials, self.n_jobs = direction, int(n_trials), max(1, int(n_jobs))
        self.storage_url, self.study_name = storage, study_name
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.metric_names = list(metric_names) if metric_names else None
        self.max_failure_rate = float(max_failure_rate)
        self.custom_search_space = custom_search_space
        self.heartbeat_interval = int(heartbeat_interval) if heartbeat_interval else None
        self.grace_period, self.max_retry = int(grace_period), int(max_retry)
        self.hooks: list[Any] = []
        self._reseeded = False
        self._info: Study | None = None  # the study as the hooks see it, once open (reaping needs it)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.hooks = build_hooks(self.hooks_cfg)

    # --- the sweep, step by step ---------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self._sweep(arguments)
        except SweeperError as e:  # the hooks learn why (e.g. a tracking run ends FAILED with the reason)
            call(self.hooks, "on_sweep_failed", self.config, str(e))
            raise

    def _sweep(self, arguments: list[str]) -> Any:
        dirs = self._directions()
        self._hook_defaults(dirs)  # 1. the host's defaults for what the user left null
        names, custom = self._settings(dirs)  # 2. the settings checked before the storage is touched
        url, storage, where = self._open_storage()  # 3. the storage, then the study in it
        space = search_space(self.params, arguments)
        study = self._study(storage, where, dirs, space.distributions)
        if names and study.metric_names != names:
            import optuna

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        n_trials, is_grid = self._budget(space)  # 4. how many trials; what the jobs are pruned with
        info = self._start(study, url, dirs, names)  # 5. the sweep folder; the study as the hooks see it
        run = _Run(study, storage, url, space, n_trials, is_grid, self._job_pruner(dirs), info)
        log.info(
            "Optuna study %r in %s: %d trial(s) so far, n_trials=%d, %s %s, sampler %s, search space %s",
            self.study_name, where, len(study.trials), n_trials, "directions" if len(dirs) > 1 else "direction",
            dirs if len(dirs) > 1 else dirs[0], type(study.sampler).__name__,
            {k: str(v) for k, v in space.distributions.items()},
        )  # fmt: skip
        call(self.hooks, "on_study_start", run.info)
        self._run(run, custom)  # 6. ask -> launch -> tell until the study is full
        self._finish(run)  # 7. results file, hooks
        if run.failures:
            log.error("failed trials:\n  %s", "\n  ".join(run.failures))
        if run.launched and len(run.failures) == run.launched:
            raise SweeperError(f"all {run.launched} trials failed:\n  " + "\n  ".join(run.failures))
        return study

    def _hook_defaults(self, dirs: list[str]) -> None:
        """storage, study_name, metric_names left null: the first hook that gives one sets it."""
        for hook in self.hooks:
            given = (hook.defaults(self.config, dirs) if hasattr(hook, "defaults") else None) or {}
            if self.storage_url is None and given.get("storage") is not None:
                self.storage_url = str(given["storage"])
            if self.study_name is None and given.get("study_name") is not None:
                self.study_name = str(given["study_name"])
            if self.metric_names is None and given.get("metric_names") is not None:
                self.metric_names = list(given["metric_names"])

    def _settings(self, dirs: list[str]):
        """(metric names, custom search space function), every other setting checked."""
        names = self._metric_names(dirs)
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise SweeperError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: use a fraction in [0, 1].")
        custom = None
        if self.custom_search_space:
            from hydra.utils import get_method

            try:
                custom = get_method(self.custom_search_space)
            except Exception as e:
                raise SweeperError(
                    f"hydra.sweeper.custom_search_space={self.custom_search_space}: cannot import it ({e}); give "
                    "'module.function', importable from where the sweep runs."
                ) from None
        self.study_name = self.study_name or str(self.config.hydra.job.name)
        return names, custom

    def _directions(self) -> list[str]:
        d = self.direction
        raw = list(d) if isinstance(d, list | tuple | ListConfig) else [d]
        dirs = [str(getattr(x, "name", x)).lower() for x in raw]
        if not dirs or any(x not in ("maximize", "minimize") for x in dirs):
            raise SweeperError(
                f"hydra.sweeper.direction={d}: use maximize or minimize, or one per objective for a multi-objective "
                "study (hydra.sweeper.direction=[maximize,minimize]; the app then returns a list or tuple)."
            )
        return dirs

    def _metric_names(self, dirs: list[str]) -> list[str] | None:
        names = self.metric_names
        if names is not None and len(names) != len(dirs):
            raise SweeperError(
                f"hydra.sweeper.metric_names={names} names {len(names)} objective(s), hydra.sweeper.direction={dirs} "
                f"has {len(dirs)}: give one name per direction."
            )
        return names

    def _open_storage(self) -> tuple[str | None, Any, str]:
        """(URL with its password or None, storage, the URL as shown). null: in memory, as Hydra's sweeper (no
        resume, no job-side pruning)."""
        import optuna

        if self.storage_url is None:
            return None, optuna.storages.InMemoryStorage(), "memory (hydra.sweeper.storage=null)"
        url = absolute_storage_url(str(self.storage_url))  # jobs open the same storage whatever their folder
        os.environ[STORAGE_ENV] = url  # the jobs' way to the password (they inherit this process's environment)
        storage = make_storage(url, self.heartbeat_interval, self.grace_period, self.max_retry, self._reaped)
        return url, storage, shown_url(url)

    def _reaped(self, study, trial, reason: str) -> None:
        """A trial failed here for its dead worker, or lost by its launcher: the hooks end what it left open."""
        if self._info is not None:
            call(self.hooks, "on_trial_reaped", self._info, trial, reason)

    def _sampler(self, n_existing: int, distributions: dict[str, Any]):
        """The sampler of hydra.sweeper.sampler (``_target_`` + its arguments). A resumed study (n_existing trials)
        gets seed + n_existing, so its random start-up trials are not the first run's again; grid and qmc keep
        their seed: their order of points belongs to the study."""
        from hydra.utils import instantiate

        cfg = self.sampler_cfg
        name = _target_name(cfg)
        kwargs: dict[str, Any] = {}
        if cfg.get("seed") is not None and name not in ("GridSampler", "QMCSampler"):
            kwargs["seed"] = int(cfg.seed) + n_existing
        if name == "GridSampler":
            kwargs["search_space"] = grid(distributions)
        try:
            return instantiate(cfg, **kwargs, _convert_="all")
        except Exception as e:
            cause = e.__cause__ or e
            hint = " (pip install cmaes)" if "cmaes" in str(cause) else ""
            raise SweeperError(
                f"hydra.sweeper.sampler ({cfg.get('_target_')}): cannot create it: {type(cause).__name__}: "
                f"{cause}{hint}. Pick another with hydra/sweeper/sampler=tpe|random|grid|cmaes|qmc|nsgaii, or fix its "
                "arguments."
            ) from None

    def _pruner(self):
        return make_pruner(self.pruner_cfg)

    def _study(self, storage, where: str, dirs: list[str], distributions: dict[str, Any]):
        """Open the study (created if new: two workers creating it at once both get it, the race retried) and check
        that it optimizes in hydra.sweeper.direction."""
        import optuna

        probe = open_study(storage, self.study_name, dirs)
        existing = [d.name.lower() for d in probe.directions]
        if existing != dirs:
            shown = lambda x: x[0] if len(x) == 1 else "[" + ",".join(x) + "]"  # noqa: E731
            raise SweeperError(
                f"hydra.sweeper.direction={shown(dirs)} does not match the study {self.study_name!r} in {where}, "
                f"which was created with direction {shown(existing)} and holds {len(probe.trials)} trial(s). Run "
                f"with hydra.sweeper.direction={shown(existing)} to continue it, or start a new study with another "
                "hydra.sweeper.study_name (or hydra.sweeper.storage)."
            )
        n_existing = len(probe.get_trials(deepcopy=False))
        pruner = self._pruner() if len(dirs) == 1 else optuna.pruners.NopPruner()
        sampler = self._sampler(n_existing, distributions)
        return optuna.load_study(study_name=self.study_name, storage=storage, sampler=sampler, pruner=pruner)

    def _budget(self, space: SearchSpace) -> tuple[int, bool]:
        """(n_trials, whether the sampler is the grid): a grid caps n_trials at its number of points."""
        is_grid = _target_name(self.sampler_cfg) == "GridSampler"
        n_trials = self.n_trials
        if is_grid:
            size = math.prod(len(v) for v in grid(space.distributions).values())
            if size < n_trials:
                log.info("grid of %d points: n_trials %d -> %d", size, n_trials, size)
            n_trials = min(n_trials, size)
        return n_trials, is_grid

    def _job_pruner(self, dirs: list[str]) -> dict | None:
        pruner = OmegaConf.to_container(self.pruner_cfg) if self.pruner_cfg is not None else None
        if len(dirs) > 1:
            if pruner and pruner.get("name") != "none":
                log.info("pruning is off: Optuna cannot prune a multi-objective study (hydra.sweeper.direction=%s)",
                         dirs)  # fmt: skip
            return None
        return pruner

    def _start(self, study, url: str | None, dirs: list[str], names: list[str] | None) -> Study:
        """The sweep folder with its multirun.yaml; the study as the hooks see it."""
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self._info = Study(self.config, study, self.study_name, shown_url(url), dirs, names, sweep_dir)
        return self._info

    # --- the loop --------------------------------------------------------------------------------------------------
    def _run(self, run: _Run, custom) -> None:
        job_idx = 0
        self._reseeded = False
        with _workers.Heartbeats(run.storage) as beats:
            while True:
                trials = self._ask_batch(run, beats, custom)
                if not trials:
                    if _workers.wait_for_other_workers(run.study, run.url, run.storage, beats, self.grace_period):
                        continue  # a dead worker's trial came back to be retried
                    return
                returns = self._launch(run, trials, job_idx)
                job_idx += len(trials)
                run.launched += len(trials)
                for trial, ret in zip(trials, returns, strict=True):
                    reason = _results.tell(
                        run.study, run.storage, trial, ret, len(run.info.directions), run.grid, self.grace_period
                    )
                    beats.discard(trial._trial_id)
                    frozen = run.storage.get_trial(trial._trial_id)
                    if reason is not None and _results.job_lost(ret):  # vanished: retried as a dead worker's
                        _workers.retry_trial(run.study, frozen, self.max_retry)
                        _workers.reap(self._reaped, run.study, frozen, f"{reason}; reaped by {_workers.worker_name()}")
                    call(self.hooks, "on_trial_end", run.info, frozen, reason)
                    if reason is not None:
                        run.failures.append(f"trial {trial.number} ({_show_params(trial.params)}): {reason}")
                if run.failures and len(run.failures) / run.launched > self.max_failure_rate:
                    self._finish(run)
                    raise SweeperError(
                        f"{len(run.failures)} of the {run.launched} trials launched failed, more than "
                        f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; the sweep stopped:\n  "
                        + "\n  ".join(run.failures)
                    )

    def _reseed(self, run: _Run, n_there: int) -> None:
        """Once per sweep, at its first ask: the sampler seeded by the trials there now (two workers that start
        together differ)."""
        if not self._reseeded:
            run.study.sampler = self._sampler(n_there, run.space.distributions)
            self._reseeded = True

    def _ask_batch(self, run: _Run, beats, custom) -> list:
        """Up to n_jobs trials (the study's count checked before each ask, under its lock), custom space applied."""
        trials: list = []
        while len(trials) < self.n_jobs:
            trial = _workers.ask(
                run.study, run.storage, run.url, run.space.distributions, run.n_trials, run.grid, beats,
                lambda n: self._reseed(run, n),
            )  # fmt: skip
            if trial is None:
                break
            trials.append(trial)
            if custom is not None:
                try:
                    custom(self.config, trial)
                except Exception as e:
                    _results.tell_failed(run.study, trials, f"custom_search_space raised {type(e).__name__}: {e}")
                    raise SweeperError(
                        f"hydra.sweeper.custom_search_space={self.custom_search_space} raised "
                        f"{type(e).__name__}: {e}. It is called as function(config, trial) after each ask."
                    ) from None
            call(self.hooks, "on_trial_start", run.info, trial)
        return trials

    def _launch(self, run: _Run, trials: list, job_idx: int):
        """Each trial as a Hydra job: its overrides, and its TrialJob in the job's environment."""
        storage = shown_url(run.url) if run.url else None
        batch = []
        for trial in trials:
            names = run.info.metric_names
            job = TrialJob(trial.number, trial._trial_id, self.study_name, storage, run.job_pruner, names)
            batch.append([*run.space.overrides(trial.params), f"++hydra.job.env_set.{TRIAL_ENV}='{job.to_env()}'"])
        try:
            self.validate_batch_is_legal(batch)
        except Exception as e:
            _results.tell_failed(run.study, trials, f"the overrides do not compose: {e}")
            raise SweeperError(
                f"A trial's overrides do not compose with the app's config ({' '.join(str(e).split())}). "
                "Check the keys of hydra.sweeper.params (a key the config lacks needs a + prefix: "
                "'+extra: choice(1, 2)')."
            ) from None
        try:
            return self.launcher.launch(batch, initial_job_idx=job_idx)
        except BaseException as e:  # Ctrl-C or a launcher problem: the trials must not stay RUNNING
            _results.tell_failed(run.study, trials, f"the sweep stopped: {type(e).__name__}: {e}")
            raise

    def _finish(self, run: _Run) -> None:
        results = _results.write_results(
            run.study, run.info.storage, run.info.directions, run.info.metric_names, run.info.sweep_dir, run.launched
        )
        call(self.hooks, "on_sweep_end", run.info, results)
