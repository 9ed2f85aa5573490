"""ClipqaOptunaSweeper: Optuna trials launched as Hydra jobs, with pruning, resume and failure handling."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def distribution(override: Override):
    """An Optuna distribution from one search-space entry written in Hydra's override grammar."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step or 1
        if all(float(x).is_integer() for x in (start, stop, step)):
            return IntDistribution(int(start), int(stop) - int(step), step=int(step))
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, IntervalSweep):
        tags = set(value.tags or ())
        if "int" in tags:
            return IntDistribution(int(value.start), int(value.end), log="log" in tags)
        return FloatDistribution(float(value.start), float(value.end), log="log" in tags)
    if not override.is_sweep_override():
        return CategoricalDistribution([override.value()])
    raise ValueError(
        f"hydra.sweeper.params.{key}: use choice(...), range(...), interval(...) or tag(log, interval(...))"
    )


class ClipqaOptunaSweeper(Sweeper):
    def __init__(
        self,
        direction: str,
        n_trials: int,
        n_jobs: int,
        storage: Any,
        study_name: str,
        sampler: Any,
        pruner: Any,
        params: dict[str, str] | None,
        _target_: str | None = None,
    ) -> None:
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, max(1, n_jobs)
        self.storage_url, self.study_name = storage, study_name
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # --- building blocks -------------------------------------------------------------------------------------------
    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        parser = OverridesParser.create()
        space, fixed = {}, []
        for key, expr in self.params.items():
            (override,) = parser.parse_overrides([f"{key}={expr}"])
            space[key] = distribution(override)
        for override in parser.parse_overrides(arguments):  # command-line sweeps join the search space
            if override.is_sweep_override():
                space[override.get_key_element()] = distribution(override)
            else:  # a plain value on the command line fixes that key: it leaves the search space
                space.pop(override.get_key_element(), None)
                fixed.append(override.input_line)
        return space, fixed

    def _sampler(self, n_existing: int, space: dict[str, Any]):
        import optuna

        s = self.sampler_cfg
        seed = int(s.seed) + n_existing  # a resumed study must not replay the same random start-up trials
        if s.name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(s.n_startup_trials))
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s.name == "grid":
            grid = {k: list(d.choices) if hasattr(d, "choices") else _grid_values(d) for k, d in space.items()}
            return optuna.samplers.GridSampler(grid, seed=seed)
        raise ValueError(f"hydra.sweeper.sampler.name={s.name!r}: choose tpe, random or grid")

    def _pruner(self):
        from clipqa.optuna_study import make_pruner

        return make_pruner(self.pruner_cfg)

    def _study(self, storage, space):
        """Create or load the study (creation retried: two processes creating one at once can collide)."""
        import optuna

        for attempt in range(5):
            try:
                probe = optuna.create_study(
                    study_name=self.study_name, storage=storage, direction=self.direction, load_if_exists=True
                )
                break
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)
        n_existing = len(probe.get_trials(deepcopy=False))
        return optuna.load_study(
            study_name=self.study_name, storage=storage, sampler=self._sampler(n_existing, space), pruner=self._pruner()
        )

    # --- the sweep -----------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        from clipqa.optuna_study import default_storage, make_storage
        from clipqa.sweep import mark_best_trial

        url = self.storage_url or default_storage()
        storage = make_storage(url)
        space, fixed = self._space(arguments)
        study = self._study(storage, space)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(
            "Optuna study %r in %s: %d trial(s) so far, n_trials=%d, search space %s",
            self.study_name,
            url,
            len(study.trials),
            self.n_trials,
            {k: str(v) for k, v in space.items()},
        )
        # The job re-opens the study and must judge with the same pruner (a loaded study gets Optuna's default).
        pc = self.pruner_cfg
        pruner_override = "{" + ",".join(f"{k}:{pc[k]}" for k in pc) + "}"
        failures: list[str] = []
        launched = 0
        job_idx = 0
        while True:
            existing = len(study.get_trials(deepcopy=False))  # all states: other processes' trials count too
            batch_size = min(self.n_jobs, self.n_trials - existing)
            if batch_size <= 0:
                break
            trials = [study.ask(space) for _ in range(batch_size)]
            batch = []
            for trial in trials:
                sampled = [f"{k}={v}" for k, v in trial.params.items()]
                batch.append(
                    [
                        *fixed,
                        *sampled,
                        f"+optuna.trial={trial.number}",
                        f"+optuna.trial_id={trial._trial_id}",  # Trial(study, id) in the job needs it
                        f"+optuna.study_name={self.study_name}",
                        f"+optuna.pruner={pruner_override}",
                        f"+optuna.storage={url}",
                    ]
                )
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=job_idx)
            job_idx += len(batch)
            launched += len(batch)
            for trial, ret in zip(trials, returns, strict=True):
                if ret.status == JobStatus.COMPLETED:
                    study.tell(trial, float(ret.return_value))
                elif isinstance(ret._return_value, optuna.TrialPruned):
                    study.tell(trial, state=TrialState.PRUNED)
                    log.info("trial %d pruned", trial.number)
                else:
                    err = ret._return_value
                    failures.append(
                        f"trial {trial.number} ({', '.join(f'{k}={v}' for k, v in trial.params.items())})"
                        f": {type(err).__name__}: {err}"
                    )
                    study.tell(trial, state=TrialState.FAIL)
                    log.error("trial %d failed: %s", trial.number, err)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        log.info(
            "study %r: %d trials (%d complete, %d pruned, %d failed); launched %d now",
            self.study_name,
            len(study.trials),
            len(done),
            len(study.get_trials(states=(TrialState.PRUNED,))),
            len(study.get_trials(states=(TrialState.FAIL,))),
            launched,
        )
        if done:
            best = study.best_trial
            log.info("best trial %d: val/acc %.4f with %s", best.number, best.value, best.params)
            mark_best_trial(self.config, best.number, best.value)
        if failures:
            log.error("failed trials:\n  %s", "\n  ".join(failures))
        if launched and len(failures) == launched:
            raise RuntimeError(f"all {launched} trials failed:\n  " + "\n  ".join(failures))
        return study


def _grid_values(d) -> list:
    if hasattr(d, "step") and d.step and not getattr(d, "log", False):
        return list(range(int(d.low), int(d.high) + 1, int(d.step)))
    raise ValueError(f"sampler=grid needs choice(...) or range(...) params, not {d}")
