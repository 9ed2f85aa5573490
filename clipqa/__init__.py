"""clipqa: CLIP vision tokens -> MLP mapper -> DistilBERT, for one-word answers on COCO-QA.

The run function is :func:`clipqa.training.run.train`; ``train.py`` is its Hydra entry point. The README's Layout
section maps the modules and which way their imports point.
"""

from clipqa.errors import ClipqaError

__all__ = ["ClipqaError"]
