"""Per-run MLflow tracking: the loop only sees the Tracker interface; mlflow is imported here and nowhere below."""
