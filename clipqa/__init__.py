"""clipqa: CLIP vision tokens -> MLP mapper -> DistilBERT, for one-word answers on COCO-QA.

The run function is :func:`clipqa.train.run`; ``train.py`` is its Hydra entry point.
"""

from clipqa.errors import ClipqaError

__all__ = ["ClipqaError"]
