"""clipqa's Optuna hooks with reaping switched off, for showing what the fault-injection test catches without it
(tests/system/test_faults.py, ``CLIPQA_FAULTS_NO_REAPING=1``): a dead worker's trials are still failed and retried,
but its MLflow runs are left as they were."""

from clipqa.sweep.optuna_hooks import MlflowStudyHooks


class NoReapingHooks(MlflowStudyHooks):
    def on_trial_reaped(self, study, trial, reason: str) -> None:
        pass
