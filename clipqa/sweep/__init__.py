"""A Hydra multirun in MLflow: the parent run, a Hydra callback, and its report (mlflow_parent); clipqa's side of an
Optuna trial (optuna_trial) and its extras through the sweeper's hooks (optuna_hooks); a dead worker's MLflow runs
ended (reaping); the deprecated `-cd sweeps -cn NAME` warning (deprecated_alias)."""
