"""Every ``from_pretrained`` call of clipqa lives here, for the real hub models and the offline tiny preset alike.

- ``backbone=hub``: ``openai/clip-vit-base-patch32`` (vision tower + image processor) and
  ``distilbert-base-uncased`` (model + tokenizer), or local folders with the same files for offline machines.
- ``backbone=tiny``: small random-init CLIP vision + DistilBERT built from configs, with a WordPiece tokenizer
  trained on the training split's own text (any dataset). The key hashes the tiny config and the training text,
  so a changed dataset or size never reuses stale weights.
- ``backbone=tiny_pretrained`` (the demo's): the same models pretrained on a world like the demo's
  (:mod:`clipqa.models.tiny_pretrain`: masked-LM text, attribute-naming vision tower), with a tokenizer trained on that
  corpus; independent of the run's data, so the demo and the smoke test share one build. The key hashes the tiny
  config and :data:`PRETRAIN_VERSION`.

Either is written with ``save_pretrained`` to ``<paths.cache_dir>/tiny-backbone/<key>/{vision,text}`` and then
loaded through the very same ``from_pretrained`` calls, so the offline demo exercises the real loading path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertModel,
    DistilBertTokenizerFast,
)

from clipqa.errors import ClipqaError
from clipqa.models import tiny_pretrain

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Part of the pretrained preset's cache key: bump it when clipqa/models/tiny_pretrain.py changes what it trains, so a
# cache never serves weights an older pretraining made.
PRETRAIN_VERSION = 1


@dataclass(frozen=True)
class Family:
    """A model type clipqa can use as a tower: the class that loads it, and the weights its checkpoints may hold
    that the tower does not use (a pretraining head, the other tower of a two-tower model): skipped on purpose."""

    model_class: type
    other_parts: tuple[str, ...] = ()


# Keyed by the ``model_type`` of the folder's config.json: what a folder *is*, whatever its name says.
VISION_FAMILIES = {
    "clip_vision_model": Family(CLIPVisionModel),  # a CLIPVisionModel saved alone (the tiny presets)
    "clip": Family(CLIPVisionModel, ("text_model.", "text_projection.", "visual_projection.", "logit_scale")),
}
TEXT_FAMILIES = {
    "distilbert": Family(DistilBertModel, ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")),
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
    backbone = load_sources(str(vision_src), str(text_src))
    vision, text = backbone.vision, backbone.text
    n_img = n_image_tokens(vision)
    offset = bcfg.image_position_offset
    if offset + n_img > text.config.max_position_embeddings:
        raise ClipqaError(
            f"backbone.image_position_offset={offset} plus {n_img} image tokens exceeds DistilBERT's "
            f"{text.config.max_position_embeddings} position embeddings ({text_src}). Lower the offset to at most "
            f"{text.config.max_position_embeddings - n_img}."
        )
    return backbone


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
        model, info = family.model_class.from_pretrained(source, output_loading_info=True)
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


def n_image_tokens(vision: CLIPVisionModel) -> int:
    """CLIP's ``last_hidden_state`` length: one token per patch plus CLS (50 for ViT-B/32 at 224 px)."""
    c = vision.config
    return (c.image_size // c.patch_size) ** 2 + 1


def _key(tcfg: DictConfig, train_text: list[str] | None) -> str:
    h = hashlib.sha256(json.dumps(OmegaConf.to_container(tcfg, resolve=True), sort_keys=True).encode())
    if tcfg.pretrain is not None:  # the pretrained preset does not depend on the run's data, only on its code
        h.update(f"pretrain-v{PRETRAIN_VERSION}".encode())
    for line in train_text if tcfg.pretrain is None else []:
        h.update(line.encode() + b"\n")
    return h.hexdigest()[:16]


def build_tiny(tcfg: DictConfig, cache_dir: str | Path, train_text: list[str] | None) -> Path:
    """Create (once) and return the tiny preset's folder, holding ``vision/`` and ``text/`` in hub format."""
    folder = Path(cache_dir).expanduser() / "tiny-backbone" / _key(tcfg, train_text)
    if (folder / "text" / "config.json").is_file():
        return folder
    pcfg = tcfg.pretrain
    what = "random-init <backbone=tiny>" if pcfg is None else "pretrained <backbone.tiny.pretrain>"
    log.info("building the tiny %s backbone in %s", what, folder)
    started = time.perf_counter()
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if pcfg is None:
        tokenizer = train_wordpiece(train_text, tcfg.vocab_size)
    else:
        tokenizer = word_tokenizer(tiny_pretrain.documents(pcfg.documents, pcfg.seed), tcfg.vocab_size)
    size = {"shortest_edge": tcfg.image_size}
    crop = {"height": tcfg.image_size, "width": tcfg.image_size}
    processor = CLIPImageProcessor(size=size, crop_size=crop)
    with tiny_pretrain.reproducible(tcfg.seed):  # seeded init without disturbing the run's own RNG stream
        vision = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=tcfg.vision_dim,
                intermediate_size=4 * tcfg.vision_dim,
                num_hidden_layers=tcfg.vision_layers,
                num_attention_heads=tcfg.heads,
                image_size=tcfg.image_size,
                patch_size=tcfg.patch_size,
            )
        )
        text_config = DistilBertConfig(
            vocab_size=len(tokenizer),
            dim=tcfg.text_dim,
            hidden_dim=4 * tcfg.text_dim,
            n_layers=tcfg.text_layers,
            n_heads=tcfg.heads,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
        )
        if pcfg is None:
            text = DistilBertModel(text_config)
        else:
            mlm = DistilBertForMaskedLM(text_config)
            with tqdm(total=pcfg.text_steps + pcfg.vision_steps, unit="step", file=sys.stderr) as bar:
                tiny_pretrain.pretrain_text(mlm, tokenizer, pcfg, bar)
                tiny_pretrain.pretrain_vision(vision, processor, pcfg, bar)
            text = mlm.distilbert
    vision.save_pretrained(tmp / "vision")
    processor.save_pretrained(tmp / "vision")
    text.save_pretrained(tmp / "text")
    tokenizer.save_pretrained(tmp / "text")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built the same key first; identical content
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny backbone built in %.1f s", time.perf_counter() - started)
    return folder


def train_wordpiece(texts: list[str], vocab_size: int) -> DistilBertTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer trained on ``texts`` ([CLS] q [SEP] like distilbert-base-uncased)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    return _as_distilbert_tokenizer(tok)


def word_tokenizer(texts: list[str], vocab_size: int) -> DistilBertTokenizerFast:
    """A WordPiece tokenizer whose pieces are the corpus's words (most frequent first) plus its single characters.

    For the pretrained tiny preset: its corpus has a few dozen words, each kept whole, and unlike the WordPiece
    trainer (which breaks ties between equally frequent merges in an order that changes from process to process)
    the same text always gives the same ids, so the pretrained weights are reproducible.
    """
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    normalizer, split = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in split.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    pieces = [*chars, *(f"##{c}" for c in chars)]  # any word of these characters can still be spelt out
    kept = sorted(words, key=lambda w: (-words[w], w))[: max(0, vocab_size - len(SPECIAL_TOKENS) - len(pieces))]
    vocab = dict.fromkeys([*SPECIAL_TOKENS, *sorted(kept), *pieces])
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, split
    return _as_distilbert_tokenizer(tok)


def _as_distilbert_tokenizer(tok) -> DistilBertTokenizerFast:
    from tokenizers import decoders, processors

    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return DistilBertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
