"""Using a trained model: find a checkpoint (path, run folder, runs:/, models:/), re-evaluate it, answer questions
(trained); the MLflow pyfunc model a run logs (pyfunc)."""
