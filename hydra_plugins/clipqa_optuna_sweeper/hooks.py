"""The hook interface: how a host app attaches its extras (tags in a tracking server, notifications, its defaults)
to a sweep without the sweeper knowing the app.

A hook is any object with some of the methods of :class:`SweepHooks` (subclass it to get no-op defaults for the
rest), named in the sweep's config and built by the sweeper with ``hydra.utils.instantiate``::

    hydra:
      sweeper:
        hooks:
          - _target_: my_app.sweep_hooks.SlackHooks   # keys besides _target_ are its constructor's arguments
            channel: "#sweeps"

Order of the calls in one sweep process (several workers on one study each call their own hooks):

1. ``defaults(config, directions)``: before the study opens; values for ``storage``, ``study_name`` and
   ``metric_names`` that the user left null (the first hook that gives a key wins; the user's value always does).
2. ``on_study_start(study)``: the study is open, no trial asked yet by this process.
3. ``on_trial_start(study, trial)``: each trial this process asked for, before its job is launched (a place to
   note on the trial what a later reaper needs, e.g. ``trial.set_user_attr(...)``).
   ``on_trial_end(study, trial, reason)``: after each trial is told (``reason``: why it failed, else None).
   ``on_trial_reaped(study, trial, reason)``: a trial that will never be told by the process that ran it, FAIL now
   (and retried, up to ``max_retry``): another worker's, failed here for want of heartbeats (that worker died), or
   this process's own whose job vanished from the cluster (its launcher reported it lost: an exception with
   ``job_lost = True``). ``reason`` says which and names this process (``host pid N``). The host ends what the
   dead job left open (a tracking run); ``trial.user_attrs`` holds what its job or hooks noted. Called in whichever
   worker reaps, so a hook that raises is logged and the sweep goes on.
4. ``on_sweep_end(study, results)``: the results file is written (also just before a sweep stopped by
   ``max_failure_rate``, so a partial study is still tagged).
5. ``on_sweep_failed(config, error)``: the sweep stops with an error it can name (a bad setting, too many failed
   trials, all trials failed); ``error`` is the message Hydra prints. Not called for Ctrl-C or a crash.

A hook that raises stops the sweep (raise :class:`~hydra_plugins.clipqa_optuna_sweeper.errors.SweeperError` for a
one-paragraph message); the trials already asked are told FAIL first.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


@dataclass(frozen=True)
class Study:
    """The study a sweep works on, as hooks see it."""

    config: DictConfig  # the sweep's whole config (the app's keys and hydra.*)
    study: Any  # the optuna.Study
    name: str
    storage: str  # the storage URL without its password, or "memory"
    directions: list[str]  # maximize | minimize, one per objective
    metric_names: list[str] | None  # hydra.sweeper.metric_names (None: unnamed)
    sweep_dir: Path


@dataclass(frozen=True)
class Results:
    """What one sweep process ends with: the best trial (one objective) or the Pareto front (several), and the
    files written into the sweep folder (optimization_results.yaml, pareto_front.png)."""

    best: Any | None = None  # optuna FrozenTrial; None: several objectives, or no trial complete
    front: list[Any] = field(default_factory=list)  # FrozenTrials on the Pareto front, by number
    files: list[Path] = field(default_factory=list)
    launched: int = 0  # trials this process launched
    counts: dict[str, int] = field(default_factory=dict)  # the study's trials by state: complete, pruned, fail, ...


class SweepHooks:
    """No-op hooks: subclass and override what you need. Each method is optional on a hook object."""

    def defaults(self, config: DictConfig, directions: list[str]) -> dict[str, Any]:
        return {}

    def on_study_start(self, study: Study) -> None:
        pass

    def on_trial_start(self, study: Study, trial: Any) -> None:
        pass

    def on_trial_end(self, study: Study, trial: Any, reason: str | None) -> None:
        pass

    def on_trial_reaped(self, study: Study, trial: Any, reason: str) -> None:
        pass

    def on_sweep_end(self, study: Study, results: Results) -> None:
        pass

    def on_sweep_failed(self, config: DictConfig, error: str) -> None:
        pass


def build_hooks(entries: Any) -> list[Any]:
    """``hydra.sweeper.hooks`` (a list of ``{_target_: ..., args}``) -> the hook objects."""
    from hydra.utils import instantiate

    from .errors import SweeperError

    hooks = []
    for i, entry in enumerate(entries or []):
        try:
            hooks.append(instantiate(entry, _convert_="all"))
        except Exception as e:
            cause = e.__cause__ or e
            raise SweeperError(
                f"hydra.sweeper.hooks[{i}] ({entry.get('_target_') if hasattr(entry, 'get') else entry}): cannot "
                f"create it: {type(cause).__name__}: {cause}. Each entry is {{_target_: module.Class, ...}}, "
                "importable where the sweep runs."
            ) from None
    return hooks


def call(hooks: list[Any], method: str, *args: Any) -> None:
    """Call ``method`` on every hook that has it, in the configured order."""
    for hook in hooks:
        fn = getattr(hook, method, None)
        if fn is not None:
            fn(*args)
