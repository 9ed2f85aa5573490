"""A hook for the toy apps (``hydra.sweeper.hooks=[{_target_:recording_hooks.Recorder,path:...}]``): appends each
call it gets to a JSON-lines file, so tests/sweeper/test_apps.py can check the hook interface's order of calls and
their arguments. ``storage``/``study_name``: the defaults it gives (None: none)."""

import json

from hydra_plugins.clipqa_optuna_sweeper.hooks import SweepHooks


class Recorder(SweepHooks):
    def __init__(self, path: str, storage: str | None = None, study_name: str | None = None):
        self.path, self.storage, self.study_name = path, storage, study_name

    def _write(self, event: str, **data) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, **data}) + "\n")

    def defaults(self, config, directions):
        self._write("defaults", directions=directions)
        return {"storage": self.storage, "study_name": self.study_name}

    def on_study_start(self, study):
        self._write("on_study_start", name=study.name, storage=study.storage, n=len(study.study.trials))

    def on_trial_end(self, study, trial, reason):
        self._write("on_trial_end", number=trial.number, state=trial.state.name, reason=reason)

    def on_sweep_end(self, study, results):
        best = results.best.number if results.best is not None else None
        self._write("on_sweep_end", best=best, launched=results.launched, files=[p.name for p in results.files])

    def on_sweep_failed(self, config, error):
        self._write("on_sweep_failed", error=error)
