"""A trained clipqa model as an MLflow pyfunc model, logged by a run (``tracking.log_model``) as ``model``.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    model.predict(pd.DataFrame({"image_path": ["bus.jpg"], "question": ["what color is the bus"]}))
    # -> a DataFrame with columns answer, probability

Input columns: ``question`` and either ``image`` (the picture's bytes) or ``image_path``. The model's artifacts are
the run's ``best.pt`` (and, for local backbone folders such as the demo's tiny ones, copies of them); it needs
clipqa installed where it is loaded. This file is an MLflow "model from code": MLflow runs it to load the model (no
pickled Python objects), which also means that loading any pyfunc model runs its code: load models only from
stores you trust. ``clipqa-eval``/``clipqa-predict runs:/<id>`` read the checkpoint artifact instead, safely.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd


class ClipqaModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from clipqa.inference.trained import load_trained

        a = context.artifacts
        sources = (a["vision"], a["text"]) if "vision" in a and "text" in a else None
        self.trained = load_trained(Path(a["checkpoint"]), "auto", sources)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from clipqa.inference.trained import answer

        items = []
        for row in model_input.to_dict("records"):
            image = row.get("image")
            if not isinstance(image, bytes | bytearray):
                image = row.get("image_path")
            items.append((image, row["question"]))
        best = [top[0] for top in answer(self.trained, items, top_k=1)]
        return pd.DataFrame({"answer": [a for a, _ in best], "probability": [p for _, p in best]})


mlflow.models.set_model(ClipqaModel())
