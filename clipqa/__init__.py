"""clipqa: CLIP vision tokens -> MLP mapper -> DistilBERT, for one-word answers on COCO-QA.

The run function is :func:`clipqa.training.run.train`; ``train.py`` is its Hydra entry point. docs/architecture.md
maps the packages (data, models, evaluation, training, inference, tracking, report, sweep) and which way their
imports point.
"""

from clipqa.errors import ClipqaError

__all__ = ["ClipqaError"]
