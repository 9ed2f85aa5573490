"""Every ``from_pretrained`` call of clipqa lives here: each tower is loaded by what its folder *is* (the
``model_type`` of its config.json), with its own class, and only when every weight of that class is in the checkpoint.

Supported (the ``backbone/vision`` and ``backbone/text`` config groups name hub models of these families; any local
folder of the same type works too):

- vision: CLIP (``clip``: a whole CLIP model, its vision tower used; ``clip_vision_model``: a vision tower saved
  alone) and SigLIP (``siglip``, ``siglip_vision_model``; no CLS token: ``image_tokens=all|pooled`` only);
- text: DistilBERT (``distilbert``), BERT (``bert``) and RoBERTa (``roberta``; its positions start at
  ``padding_idx + 1``, see :func:`position_start`).

The offline tiny presets (``backbone=tiny|tiny_pretrained``) are built by :mod:`clipqa.models.tiny_backbone` and
loaded here like any folder.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BertModel,
    CLIPVisionModel,
    DistilBertModel,
    RobertaModel,
    SiglipVisionModel,
)

from clipqa.errors import ClipqaError
from clipqa.models.tiny_backbone import build_tiny

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """A model type clipqa can use as a tower: the class that loads it, and the weights its checkpoints may hold
    that the tower does not use (a pretraining head, the other tower of a two-tower model): skipped on purpose."""

    model_class: type
    other_parts: tuple[str, ...] = ()
    kwargs: tuple[tuple[str, object], ...] = ()  # from_pretrained arguments


# Keyed by the ``model_type`` of the folder's config.json: what a folder *is*, whatever its name says.
_CLIP_TEXT = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
VISION_FAMILIES = {
    "clip_vision_model": Family(CLIPVisionModel),  # a CLIPVisionModel saved alone (the tiny presets)
    "clip": Family(CLIPVisionModel, _CLIP_TEXT),
    "siglip_vision_model": Family(SiglipVisionModel),
    "siglip": Family(SiglipVisionModel, ("text_model.", "logit_scale", "logit_bias")),
}
# BERT and RoBERTa without their pooler (a dense layer on [CLS] for next-sentence prediction): clipqa reads the last
# hidden state, and a pooler that gets no gradient would only be dead weight in the optimizer.
_NO_POOLER = (("add_pooling_layer", False),)
TEXT_FAMILIES = {
    "distilbert": Family(DistilBertModel, ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")),
    "bert": Family(BertModel, ("cls.", "pooler."), _NO_POOLER),
    "roberta": Family(RobertaModel, ("lm_head.", "pooler."), _NO_POOLER),
}


@dataclass
class Backbone:
    """The pretrained parts and their pre-processing, plus where they came from (logged, saved in checkpoints)."""

    vision: CLIPVisionModel
    image_processor: object
    text: DistilBertModel
    tokenizer: object
    vision_source: str
    text_source: str
    loaded: dict  # per tower: source, model_type, parameters, sha256 (metrics.json, MLflow params ``loaded.*``)


def _load(what: str, key: str, source: str, fn):
    try:
        return fn(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipqaError(
            f"Cannot load the {what} from {source!r} ({key}={source}): {first}. This machine may be offline: pass "
            f"a local folder holding the model's files ({key}=/path/to/folder, made with save_pretrained or "
            f"`huggingface-cli download {source} --local-dir DIR` on a connected machine), or pre-populate the "
            "Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1. For the offline demo use experiment=demo."
        ) from None


def load_backbone(bcfg: DictConfig, cache_dir: str | Path, train_text: list[str] | None = None) -> Backbone:
    """Load vision tower, image processor, text model and tokenizer.

    A tiny preset (``backbone.tiny``) only fills the towers not given: ``experiment=smoke backbone.text=DIR``
    trains DIR's text model beside the preset's vision tower, so an override always takes effect.
    """
    vision_src, text_src = bcfg.vision, bcfg.text
    if bcfg.tiny is not None and (vision_src is None or text_src is None):
        if bcfg.tiny.pretrain is None and train_text is None:
            raise ValueError("the tiny backbone needs the training text to train its tokenizer")
        folder = build_tiny(bcfg.tiny, cache_dir, train_text)
        vision_src, text_src = vision_src or str(folder / "vision"), text_src or str(folder / "text")
    elif bcfg.tiny is not None:
        log.info("backbone.vision and backbone.text are both given: the tiny preset (backbone.tiny) is not used")
    for key, src in (("backbone.vision", vision_src), ("backbone.text", text_src)):
        if src is None:
            raise ClipqaError(f"{key} is null and no tiny preset fills it: give a hub name or folder ({key}=PATH).")
    return load_sources(str(vision_src), str(text_src))


def load_sources(vision_src: str, text_src: str) -> Backbone:
    """``from_pretrained`` on a hub name or local folder for each part (also used to rebuild from a checkpoint)."""
    vision, vision_type = load_tower("vision tower", "backbone.vision", vision_src, VISION_FAMILIES)
    processor = _load("image processor", "backbone.vision", vision_src, AutoImageProcessor.from_pretrained)
    text, text_type = load_tower("text model", "backbone.text", text_src, TEXT_FAMILIES)
    tokenizer = _load("tokenizer", "backbone.text", text_src, AutoTokenizer.from_pretrained)
    loaded = {
        "vision": provenance(vision, vision_src, vision_type),
        "text": provenance(text, text_src, text_type),
    }
    return Backbone(vision, processor, text, tokenizer, vision_src, text_src, loaded)


def load_tower(what: str, key: str, source: str, families: dict[str, Family]):
    """(the model, its model_type): read the folder's config first and load it with its family's class; a model
    type clipqa does not support, or a checkpoint that leaves weights randomly initialised, is an error."""
    config = _load(f"{what}'s config", key, source, AutoConfig.from_pretrained)
    family = families.get(config.model_type)
    if family is None:
        raise ClipqaError(
            f"{key}={source} holds a {config.model_type!r} model ({type(config).__name__}), which clipqa cannot use "
            f"as its {what}: the supported model types are {', '.join(repr(t) for t in families)}. Loading it as "
            "one of those would train a randomly initialised model. Fix: point "
            f"{key} at a hub name or folder of a supported type (its config.json's model_type)."
        )
    try:
        model, info = family.model_class.from_pretrained(source, output_loading_info=True, **dict(family.kwargs))
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ClipqaError(
            f"Cannot load the {what}'s weights from {key}={source} ({first}). Fix: pass a folder whose weights "
            "match its config.json (saved together with save_pretrained)."
        ) from None
    missing = sorted(info["missing_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(family.other_parts))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
    if missing or unexpected or mismatched:
        found = [
            f"{len(v)} {name} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
            for name, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched))
            if v
        ]
        raise ClipqaError(
            f"{key}={source} is not a complete {config.model_type!r} {what}: its weights are "
            f"{'; '.join(found)}, so part of the model would be randomly initialised. Fix: pass a folder saved "
            f"with save_pretrained from the whole {family.model_class.__name__} (or its full pretrained model)."
        )
    return model, config.model_type


def provenance(model: torch.nn.Module, source: str, model_type: str) -> dict:
    """What a tower really is, to check a run after the fact: where from, which type, how big, which weights."""
    return {
        "source": source,
        "model_type": model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": weights_digest(model),
    }


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes): the weights' identity (~1 s for
    ViT-B/32). A hub name or folder alone would not do: a re-downloaded or fine-tuned tower keeps its name."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def n_image_tokens(vision) -> int:
    """The vision tower's ``last_hidden_state`` length: one token per patch, plus CLS where the family has one
    (CLIP: 50 for ViT-B/32 at 224 px, 197 for B/16, 257 for L/14, 577 for L/14@336; SigLIP B/16 at 224 px: 196)."""
    c = vision.config
    return (c.image_size // c.patch_size) ** 2 + (1 if has_cls_token(vision) else 0)


def has_cls_token(vision) -> bool:
    """CLIP puts a class token before the patches; SigLIP has none (it pools with an attention head instead)."""
    return vision.config.model_type.startswith("clip")


def position_start(text) -> int:
    """The first position id a text model gives a real token: RoBERTa numbers positions from ``padding_idx + 1`` (2)
    and reserves the ones below for padding; DistilBERT and BERT start at 0."""
    return text.config.pad_token_id + 1 if text.config.model_type == "roberta" else 0
