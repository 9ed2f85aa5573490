"""Per-run MLflow tracking: the Tracker the loop calls and its MLflow backend (tracker), run names and overrides
(run_info), tracking URIs and credentials (uris), server checks before training (preflight), Ctrl-C held during a
write (interrupts), writes kept for clipqa-sync (pending) and a reaped run's way back to RUNNING (reaped). mlflow is
imported here and by report/, inference/ and sweep/, never by data/, models/, evaluation/ or training/
(tests/test_structure.py)."""
