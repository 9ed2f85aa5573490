"""Load a run's ``best.pt`` without Hydra: rebuild the model from the saved config and weights.

``best.pt`` holds the resolved config (a plain dict), the weights of every part that trained (frozen pretrained
parts are re-loaded from ``vision_source``/``text_source`` with ``from_pretrained``), the answer classes and the
run's metrics. Usage::

    from clipqa.checkpoint import load_checkpoint
    model, backbone, classes = load_checkpoint("outputs/.../best.pt")
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from clipqa.errors import ClipqaError
from clipqa.model import ClipQA, apply_freeze, build_model
from clipqa.pretrained import Backbone, load_sources

FORMAT = "clipqa-checkpoint-v1"


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ClipQA, Backbone, list[str]]:
    """Return ``(model in eval mode, backbone with tokenizer/image processor, class names)``.

    Raises ClipqaError when the file is not a clipqa checkpoint or its backbone sources cannot be loaded.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ClipqaError(f"{path} is not a clipqa checkpoint (expected format {FORMAT}); pass a run's best.pt.")
    cfg = OmegaConf.create(ckpt["config"])
    backbone = load_sources(ckpt["vision_source"], ckpt["text_source"])
    model = build_model(cfg, backbone, len(ckpt["classes"]))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    trained = tuple(f"{n}." for n in ("vision", "text", "mapper", "head") if n not in ckpt["frozen"])
    if unexpected or any(k.startswith(trained) for k in missing):
        raise ClipqaError(f"{path} does not match its own config (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    apply_freeze(model, vision=cfg.freeze.vision, text=cfg.freeze.text, mapper=cfg.freeze.mapper)
    return model.to(device).eval(), backbone, list(ckpt["classes"])
