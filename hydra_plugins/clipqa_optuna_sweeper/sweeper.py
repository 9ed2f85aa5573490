"""ClipqaOptunaSweeper: Optuna trials launched as Hydra jobs of any app, with pruning, resume and failure handling.

One sweep: build the search space from ``hydra.sweeper.params`` and the command line (Hydra's override grammar,
with Hydra's values), open or create the study (its direction checked), then ask -> launch -> tell in batches of
``n_jobs`` until the study holds ``n_trials`` trials; write ``optimization_results.yaml`` (and ``pareto_front.png``
for two objectives) into the sweep folder. Several sweeper processes may work on one study at once (SQLite,
PostgreSQL): each asks under the study's lock while the study holds fewer than ``n_trials``, beats for its running
trials from a thread of this process (the jobs may run elsewhere: their trial lives as long as this process), fails
and retries the trials of workers that stopped beating, and at the end waits a grace period for them to come back.
clipqa's extras (MLflow tags on the parent run, the project's ``optuna.db``, ``val/acc`` as the objective's name)
apply only when the app's config has clipqa's ``tracking`` block.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import time
import warnings
from copy import copy
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException, HydraException, OverrideParseException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
FRONT_PLOT = "pareto_front.png"
_PRIMITIVE = (str, int, float, bool, type(None))


class SweeperError(CompactHydraException):
    """A problem the user can fix (one paragraph naming the key): Hydra prints the message alone and exits 1."""


# --- the search space: Hydra's override grammar -> Optuna distributions ----------------------------------------------
def distribution(override: Override):
    """The Optuna distribution of one search-space entry, holding exactly the values Hydra's grammar means.

    ``choice(a, b)`` / ``a,b``: categorical (lists and dicts among the choices travel as their override text);
    ``range(start, stop, step)``: Hydra's values (stop excluded, negative steps too), as an int distribution with
    that step, or categorical when a value is a float; ``interval(lo, hi)``: float, int when cast
    (``int(interval(1, 5))``) or tagged ``int``, log-scaled when tagged ``log``. Casts (``int(...)``,
    ``float(...)``, ``str(...)``) act on the values, as in Hydra.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        choices = list(value.list)
        if all(isinstance(c, _PRIMITIVE) for c in choices):
            return CategoricalDistribution(choices)
        return CategoricalDistribution([encode(c) for c in choices])
    if isinstance(value, RangeSweep):
        ordered = copy(value)
        ordered.shuffle = False  # the set of values is what counts; Optuna picks the order
        values = list(ordered.range())
        if not values:
            raise SweeperError(
                f"hydra.sweeper.params.{key}: {_expression(override)} holds no values (Hydra's range "
                "excludes stop; a descending range needs a negative step: range(5, 0, -1))."
            )
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            step = abs(int(value.step)) if len(values) > 1 else 1
            return IntDistribution(min(values), max(values), step=step)
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        tags = set(value.tags or ())
        log_scale = "log" in tags
        if "int" in tags or (isinstance(value.start, int) and isinstance(value.end, int)):
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweeperError(
        f"hydra.sweeper.params.{key}: {_expression(override)} is not a search space; use choice(...), "
        "range(...), interval(...) or tag(log, interval(...))."
    )


def _expression(override: Override) -> str:
    return (override.input_line or "").split("=", 1)[-1]


def encode(value: Any) -> str:
    """A value as override text that Hydra reads back as the same value (strings quoted where needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple | ListConfig):
        return "[" + ",".join(encode(v) for v in value) + "]"
    if isinstance(value, dict | DictConfig):
        return "{" + ",".join(f"{encode(k)}:{encode(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _reads_back(text, text):
        return text
    quoted = "'" + re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", re.sub(r"(\\+)$", r"\1\1", text)) + "'"
    if not _reads_back(quoted, text):
        raise SweeperError(f"Cannot pass the value {text!r} to a job as a Hydra override; use a simpler value.")
    return quoted


def _reads_back(text: str, value: Any) -> bool:
    try:
        parsed = OverridesParser.create().parse_override(f"k={text}")
    except HydraException:  # not readable as it stands: quote it
        return False
    return not parsed.is_sweep_override() and parsed.value() == value and type(parsed.value()) is type(value)


def objective_values(value: Any, n_objectives: int) -> tuple[list[float] | None, str | None]:
    """The job's return value as Optuna values, or the reason it is not one (the trial is then FAIL)."""

    def show(v: Any) -> str:
        text = repr(v)
        return f"{text[:80]}..." if len(text) > 80 else text

    if n_objectives == 1:
        items = [value]
    elif isinstance(value, str | bytes | dict | DictConfig) or not hasattr(value, "__len__"):
        return None, f"returned {show(value)}, not a list of {n_objectives} numbers (one per hydra.sweeper.direction)"
    else:
        items = list(value)
        if len(items) != n_objectives:
            return None, f"returned {len(items)} values for {n_objectives} objectives (hydra.sweeper.direction)"
    values = []
    for v in items:
        number = not isinstance(v, bool | str | bytes) and (
            isinstance(v, numbers.Real) or (hasattr(type(v), "__float__") and getattr(v, "ndim", 0) == 0)
        )
        if not number:
            return None, f"returned {show(v)} ({type(v).__name__}), not a number"
        values.append(float(v))
        if math.isnan(values[-1]):
            return None, "returned nan"
    return values, None


def _is_clipqa(config: DictConfig) -> bool:
    """clipqa's extras apply: the app's config has clipqa's tracking block."""
    return OmegaConf.select(config, "tracking.backend", default=None) is not None


def _target_name(sampler_cfg: Any) -> str:
    return str(sampler_cfg.get("_target_", "")).rsplit(".", 1)[-1]


class ClipqaOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        direction: Any,
        n_trials: int,
        n_jobs: int,
        storage: Any,
        study_name: str | None,
        pruner: Any,
        params: dict[str, str] | None = None,
        metric_names: list[str] | None = None,
        max_failure_rate: float = 1.0,
        custom_search_space: str | None = None,
        heartbeat_interval: int | None = 10,
        grace_period: int = 30,
        max_retry: int = 1,
        _target_: str | None = None,
    ) -> None:
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.direction, self.n_trials, self.n_jobs = direction, int(n_trials), max(1, int(n_jobs))
        self.storage_url, self.study_name = storage, study_name
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.metric_names = list(metric_names) if metric_names else None
        self.max_failure_rate = float(max_failure_rate)
        self.custom_search_space = custom_search_space
        self.heartbeat_interval = int(heartbeat_interval) if heartbeat_interval else None
        self.grace_period, self.max_retry = int(grace_period), int(max_retry)
        self._verbatim: set[str] = set()  # params whose categorical choices are override text (lists, dicts)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # --- building blocks -------------------------------------------------------------------------------------------
    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        """(search space, fixed overrides): hydra.sweeper.params, then the command line (a sweep there joins the
        space or replaces that key's entry; a plain value fixes the key: it leaves the space)."""
        parser = OverridesParser.create()
        space: dict[str, Any] = {}
        names: dict[str, str] = {}  # key_or_group -> the param's name in the space
        fixed: dict[str, str] = {}  # key_or_group -> the override line every job gets
        entries = [(f"{k}={v}", f"hydra.sweeper.params.{k}") for k, v in self.params.items()]
        entries += [(a, "the command line") for a in arguments]
        for line, where in entries:
            try:
                (override,) = parser.parse_overrides([line])
            except OverrideParseException as e:
                raise SweeperError(f"{where}: cannot read {line!r}: {str(e).splitlines()[0]}") from None
            key = override.key_or_group
            if key in names:
                space.pop(names.pop(key))
            fixed.pop(key, None)
            if not override.is_sweep_override():
                fixed[key] = override.input_line
                continue
            name = names[key] = override.get_key_element()
            space[name] = distribution(override)
            if isinstance(override.value(), ChoiceSweep) and not all(
                isinstance(c, _PRIMITIVE) for c in override.value().list
            ):
                self._verbatim.add(name)
        return space, list(fixed.values())

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

    def _metric_names(self, dirs: list[str], clipqa: bool) -> list[str] | None:
        names = self.metric_names
        if names is None and clipqa:
            from clipqa.metrics import OBJECTIVE

            if len(dirs) > 1:
                raise SweeperError(
                    f"hydra.sweeper.direction has {len(dirs)} objectives: name them with hydra.sweeper.metric_names "
                    f"(keys of a run's metrics.json, which train.py then returns), e.g. "
                    "hydra.sweeper.direction=[maximize,minimize] hydra.sweeper.metric_names=[val/acc,params/trainable]."
                )
            names = [OBJECTIVE]
        if names is not None and len(names) != len(dirs):
            raise SweeperError(
                f"hydra.sweeper.metric_names={names} names {len(names)} objective(s), hydra.sweeper.direction={dirs} "
                f"has {len(dirs)}: give one name per direction."
            )
        return names

    def _grid(self, space: dict[str, Any]) -> dict[str, list]:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        grid = {}
        for name, d in space.items():
            if isinstance(d, CategoricalDistribution):
                grid[name] = list(d.choices)
            elif isinstance(d, IntDistribution) and not d.log:
                grid[name] = list(range(d.low, d.high + 1, d.step))
            else:
                raise SweeperError(
                    f"hydra/sweeper/sampler=grid needs a finite set of values, but {name} is {d}: write it as "
                    "choice(...) or range(...) (hydra.sweeper.params or the command line)."
                )
        return grid

    def _sampler(self, n_existing: int, space: dict[str, Any]):
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
            kwargs["search_space"] = self._grid(space)
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
        from clipqa.sweep.optuna_trial import make_pruner

        return make_pruner(self.pruner_cfg)

    def _study(self, storage, where: str, dirs: list[str], space: dict[str, Any]):
        """Open the study (created if new: two workers creating it at once both get it, the race retried) and check
        that it optimizes in hydra.sweeper.direction."""
        import optuna

        from clipqa.errors import ClipqaError
        from clipqa.sweep.optuna_trial import open_study

        try:
            probe = open_study(storage, self.study_name, dirs)
        except ClipqaError as e:
            raise SweeperError(str(e)) from None
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
        study = optuna.load_study(
            study_name=self.study_name, storage=storage, sampler=self._sampler(n_existing, space), pruner=pruner
        )
        return study

    # --- the sweep -----------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self._sweep(arguments)
        except SweeperError as e:
            if _is_clipqa(self.config):  # the sweep's MLflow parent run ends FAILED, with the reason
                from clipqa.sweep.mlflow_parent import fail_sweep

                fail_sweep(self.config, str(e))
            raise

    def _sweep(self, arguments: list[str]) -> Any:
        import optuna

        from clipqa.errors import ClipqaError
        from clipqa.sweep.optuna_trial import (
            STORAGE_ENV,
            TRIAL_ENV,
            Heartbeats,
            TrialJob,
            absolute_storage_url,
            default_storage,
            make_storage,
            shown_url,
        )

        clipqa = _is_clipqa(self.config)
        dirs = self._directions()
        names = self._metric_names(dirs, clipqa)
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
        self.study_name = self.study_name or ("clipqa" if clipqa else str(self.config.hydra.job.name))
        if self.storage_url is None and not clipqa:  # as Hydra's sweeper: in memory (no resume, no job-side pruning)
            url, storage, where = None, optuna.storages.InMemoryStorage(), "memory (hydra.sweeper.storage=null)"
        else:  # absolute, so that jobs open the same storage whatever their working directory
            url = absolute_storage_url(str(self.storage_url or default_storage()))
            where = shown_url(url)  # logs, files and the jobs' configs never hold a password
            os.environ[STORAGE_ENV] = url  # the jobs' way to the password (they inherit this process's environment)
            try:
                storage = make_storage(url, self.heartbeat_interval, self.grace_period, self.max_retry)
            except ClipqaError as e:
                raise SweeperError(str(e)) from None
        space, fixed = self._space(arguments)
        study = self._study(storage, where, dirs, space)
        if names and study.metric_names != names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        grid = _target_name(self.sampler_cfg) == "GridSampler"
        n_trials = self.n_trials
        if grid:
            size = math.prod(len(v) for v in self._grid(space).values())
            if size < n_trials:
                log.info("grid of %d points: n_trials %d -> %d", size, n_trials, size)
            n_trials = min(n_trials, size)
        pruner = OmegaConf.to_container(self.pruner_cfg) if self.pruner_cfg is not None else None
        if len(dirs) > 1 and pruner and pruner.get("name") != "none":
            log.info("pruning is off: Optuna cannot prune a multi-objective study (hydra.sweeper.direction=%s)", dirs)
        if len(dirs) > 1:
            pruner = None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(
            "Optuna study %r in %s: %d trial(s) so far, n_trials=%d, %s %s, sampler %s, search space %s",
            self.study_name,
            where,
            len(study.trials),
            n_trials,
            "directions" if len(dirs) > 1 else "direction",
            dirs if len(dirs) > 1 else dirs[0],
            type(study.sampler).__name__,
            {k: str(v) for k, v in space.items()},
        )
        if clipqa:  # each worker's MLflow parent run names the study, so its report can cover all of the study
            from clipqa.sweep.mlflow_parent import mark_study

            mark_study(self.config, self.study_name, where)

        failures: list[str] = []
        launched = job_idx = 0
        self._reseeded = False
        with Heartbeats(storage) as beats:
            while True:
                trials, batch = [], []
                while len(trials) < self.n_jobs:  # the study's count is checked before each ask, under its lock
                    trial = self._ask(study, storage, url, space, n_trials, grid, beats)
                    if trial is None:
                        break
                    trials.append(trial)
                    if custom is not None:
                        try:
                            custom(self.config, trial)
                        except Exception as e:
                            self._tell_failed(study, trials, f"custom_search_space raised {type(e).__name__}: {e}")
                            raise SweeperError(
                                f"hydra.sweeper.custom_search_space={self.custom_search_space} raised "
                                f"{type(e).__name__}: {e}. It is called as function(config, trial) after each ask."
                            ) from None
                    job = TrialJob(trial.number, trial._trial_id, self.study_name, shown_url(url), pruner, names)
                    sampled = [f"{k}={v if k in self._verbatim else encode(v)}" for k, v in trial.params.items()]
                    batch.append([*fixed, *sampled, f"++hydra.job.env_set.{TRIAL_ENV}='{job.to_env()}'"])
                if not trials:
                    if self._wait_for_other_workers(study, url, storage, beats):
                        continue  # a dead worker's trial came back to be retried
                    break
                try:
                    self.validate_batch_is_legal(batch)
                except Exception as e:
                    self._tell_failed(study, trials, f"the overrides do not compose: {e}")
                    raise SweeperError(
                        f"A trial's overrides do not compose with the app's config ({' '.join(str(e).split())}). "
                        "Check the keys of hydra.sweeper.params (a key the config lacks needs a + prefix: "
                        "'+extra: choice(1, 2)')."
                    ) from None
                try:
                    returns = self.launcher.launch(batch, initial_job_idx=job_idx)
                except BaseException as e:  # Ctrl-C or a launcher problem: the trials must not stay RUNNING
                    self._tell_failed(study, trials, f"the sweep stopped: {type(e).__name__}: {e}")
                    raise
                job_idx += len(batch)
                launched += len(batch)
                for trial, ret in zip(trials, returns, strict=True):
                    reason = self._tell(study, storage, trial, ret, len(dirs), grid)
                    beats.discard(trial._trial_id)
                    if reason is not None:
                        failures.append(f"trial {trial.number} ({_show_params(trial.params)}): {reason}")
                if failures and len(failures) / launched > self.max_failure_rate:
                    self._finish(study, dirs, names, url, sweep_dir, clipqa, launched)
                    raise SweeperError(
                        f"{len(failures)} of the {launched} trials launched failed, more than "
                        f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; the sweep stopped:\n  "
                        + "\n  ".join(failures)
                    )
        self._finish(study, dirs, names, url, sweep_dir, clipqa, launched)
        if failures:
            log.error("failed trials:\n  %s", "\n  ".join(failures))
        if launched and len(failures) == launched:
            raise SweeperError(f"all {launched} trials failed:\n  " + "\n  ".join(failures))
        return study

    def _ask(self, study, storage, url: str | None, space: dict[str, Any], n_trials: int, grid: bool, beats):
        """The next trial for this worker, or None when the study has what it needs. Under the study's lock (one
        worker at a time): fail the trials of dead workers (each retried: a WAITING trial), count the trials that use
        the budget (:func:`clipqa.sweep.optuna_trial.trials_used`), then ask: a waiting trial first (a retry, or one
        enqueued by hand), else a new one while fewer than ``n_trials`` are used."""
        from optuna.trial import TrialState

        from clipqa.sweep.optuna_trial import fail_stale_trials, study_lock, trials_used

        with study_lock(url, storage, self.study_name):
            fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and (trials_used(trials) >= n_trials or (grid and study.sampler.is_exhausted(study))):
                return None
            if not self._reseeded:  # seeded by the trials there now: two workers that start together differ
                study.sampler = self._sampler(len(trials), space)
                self._reseeded = True
            with warnings.catch_warnings():  # Optuna's "heartbeats are meant for optimize()": here the sweeper beats
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = study.ask(space)
            beats.add(trial._trial_id)
        return trial

    def _wait_for_other_workers(self, study, url: str | None, storage, beats) -> bool:
        """The study has all its trials, but other workers may still run some. A dead worker's trial fails once it
        has had no heartbeat for ``grace_period`` seconds and comes back to be retried: wait that long (the trials
        of live workers then keep running; their workers tell them). True when a retry is waiting to be run."""
        from optuna.trial import TrialState

        from clipqa.sweep.optuna_trial import fail_stale_trials, study_lock

        if not beats.interval:
            return False
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return False
        patience = self.grace_period + 2 * beats.interval
        log.info(
            "study %r has all its trials; %d still running in other workers (%s): waiting up to %d s for a dead "
            "worker's trial to come back for a retry (hydra.sweeper.grace_period=%d)",
            self.study_name,
            len(running),
            ", ".join(str(t.number) for t in running),
            patience,
            self.grace_period,
        )
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            time.sleep(min(beats.interval, max(0.0, deadline - time.monotonic())))
            with study_lock(url, storage, self.study_name):
                fail_stale_trials(study)
                states = [t.state for t in study.get_trials(deepcopy=False)]
            if TrialState.WAITING in states:
                return True
            if TrialState.RUNNING not in states:
                return False
        log.info("the trials still running have live workers (their heartbeats are fresh): those workers tell them")
        return False

    def _tell(self, study, storage, trial, ret: JobReturn, n_objectives: int, grid: bool) -> str | None:
        """Tell Optuna the job's outcome; the reason when the trial failed, else None."""
        import optuna
        from optuna.trial import TrialState

        if storage.get_trial(trial._trial_id).state.is_finished():  # failed by another worker as stale
            log.warning(
                "trial %d was failed by another worker while it ran here: no heartbeat from this process reached "
                "the storage for hydra.sweeper.grace_period=%d s (is the database reachable?); its result is "
                "dropped and the trial retried",
                trial.number,
                self.grace_period,
            )
            return None
        if ret.status == JobStatus.COMPLETED:
            values, reason = objective_values(ret.return_value, n_objectives)
        elif isinstance(ret._return_value, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned", trial.number)
            return None
        else:
            err = ret._return_value
            values, reason = None, f"{type(err).__name__}: {err}"
        if reason is not None:
            self._tell_failed(study, [trial], reason)
            log.warning("trial %d failed: %s", trial.number, reason)
            return reason
        try:
            study.tell(trial, values)
        except RuntimeError:  # GridSampler stops the study (study.stop) after its last point: only inside optimize()
            if not grid or study._storage.get_trial(trial._trial_id).state != TrialState.COMPLETE:
                raise
        return None

    @staticmethod
    def _tell_failed(study, trials, reason: str) -> None:
        from optuna.trial import TrialState

        for trial in trials:
            try:
                trial.set_user_attr("fail_reason", reason[:2000])
                study.tell(trial, state=TrialState.FAIL)
            except Exception as e:  # already finished (or the storage is gone): nothing more to record
                log.debug("could not mark trial %d failed: %s", trial.number, e)

    def _finish(self, study, dirs, names, url, sweep_dir: Path, clipqa: bool, launched: int) -> None:
        """Log the summary; write optimization_results.yaml (and the Pareto plot); clipqa: tag the MLflow runs."""
        from optuna.trial import TrialState

        from clipqa.sweep.optuna_trial import shown_url

        counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
        log.info(
            "study %r: %d trials (%d complete, %d pruned, %d failed, %d running); launched %d now",
            self.study_name,
            len(study.trials),
            counts["complete"],
            counts["pruned"],
            counts["fail"],
            counts["running"],
            launched,
        )
        results: dict[str, Any] = {
            "name": "optuna",  # as Hydra's Optuna sweeper writes it
            "sweeper": "clipqa_optuna",
            "study_name": self.study_name,
            "storage": shown_url(url),
            "directions": dirs,
            "metric_names": names,
            "trials": {k: v for k, v in counts.items() if v},
        }
        files = [sweep_dir / RESULTS_FILE]
        front = []
        if counts["complete"] and len(dirs) == 1:
            best = study.best_trial
            results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
            log.info("best trial %d: %s %.6g with %s", best.number, (names or ["value"])[0], best.value, best.params)
        elif counts["complete"]:
            front = sorted(study.best_trials, key=lambda t: t.number)
            results["solutions"] = [  # the Pareto front (Hydra's key)
                {"trial": t.number, "params": t.params, "values": t.values}
                | ({"metrics": dict(zip(names, t.values, strict=True))} if names else {})
                for t in front
            ]
            log.info("Pareto front: %d trial(s)", len(front))
            for t in front:
                log.info("    trial %d: values %s with %s", t.number, t.values, t.params)
            if len(dirs) == 2 and (plot := _plot_front(study, front, dirs, names, sweep_dir / FRONT_PLOT)):
                files.append(plot)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
        log.info("results: %s", sweep_dir / RESULTS_FILE)
        if clipqa and counts["complete"]:
            from clipqa.sweep.mlflow_parent import mark_best_trial, mark_pareto_front

            if len(dirs) == 1:
                mark_best_trial(self.config, self.study_name, best.number, best.value, (names or ["value"])[0], files)
            else:
                front_values = [(t.number, list(t.values)) for t in front]
                mark_pareto_front(self.config, self.study_name, front_values, names, files)


def _show_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "no searched parameters"


def _plot_front(study, front, dirs: list[str], names: list[str] | None, path: Path) -> Path | None:
    """pareto_front.png: every complete trial of a two-objective study, the front highlighted and joined."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s", path.name)
        return None
    from optuna.trial import TrialState

    labels = [f"{n} ({d[:3]})" for n, d in zip(names or ["objective 0", "objective 1"], dirs, strict=True)]
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    on_front = {t.number for t in front}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rest = [t for t in done if t.number not in on_front]
    ax.scatter([t.values[0] for t in rest], [t.values[1] for t in rest], c="0.6", label="other trials")
    line = sorted(front, key=lambda t: t.values[0])
    ax.plot([t.values[0] for t in line], [t.values[1] for t in line], "o-", c="C3", label="Pareto front")
    points: dict[tuple[float, ...], list[str]] = {}
    for t in line:  # trials with the same values share one label
        points.setdefault(tuple(t.values), []).append(str(t.number))
    for (x, y), numbers_ in points.items():
        ax.annotate(", ".join(numbers_), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(f"study {study.study_name!r}: {len(front)} of {len(done)} complete trials on the front")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
