"""A Hydra multirun in MLflow: the parent run (a Hydra callback), its report, and clipqa's side of an Optuna trial."""
