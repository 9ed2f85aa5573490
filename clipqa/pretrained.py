"""Every ``from_pretrained`` call of clipqa lives here, for the real hub models and the offline tiny preset alike.

- ``backbone=hub``: ``openai/clip-vit-base-patch32`` (vision tower + image processor) and
  ``distilbert-base-uncased`` (model + tokenizer), or local folders with the same files for offline machines.
- ``backbone=tiny``: small random-init CLIP vision + DistilBERT built from configs, with a WordPiece tokenizer
  trained on the training split's own text. They are written with ``save_pretrained`` to
  ``<paths.cache_dir>/tiny-backbone/<key>/{vision,text}`` and then loaded through the very same
  ``from_pretrained`` calls, so the offline demo exercises the real loading path. The key hashes the tiny config
  and the training text, so a changed dataset or size never reuses stale weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    DistilBertConfig,
    DistilBertModel,
    DistilBertTokenizerFast,
)

from clipqa.errors import ClipqaError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class Backbone:
    """The pretrained parts and their pre-processing, plus where they came from (logged, saved in checkpoints)."""

    vision: CLIPVisionModel
    image_processor: object
    text: DistilBertModel
    tokenizer: object
    vision_source: str
    text_source: str


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
    """Load vision tower, image processor, DistilBERT and tokenizer (building the tiny preset first if asked)."""
    if bcfg.tiny is not None:
        if train_text is None:
            raise ValueError("the tiny backbone needs the training text to train its tokenizer")
        folder = build_tiny(bcfg.tiny, cache_dir, train_text)
        vision_src, text_src = str(folder / "vision"), str(folder / "text")
    else:
        vision_src, text_src = str(bcfg.vision), str(bcfg.text)
    backbone = load_sources(vision_src, text_src)
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
    vision = _load("CLIP vision tower", "backbone.vision", vision_src, CLIPVisionModel.from_pretrained)
    processor = _load("CLIP image processor", "backbone.vision", vision_src, AutoImageProcessor.from_pretrained)
    text = _load("DistilBERT model", "backbone.text", text_src, DistilBertModel.from_pretrained)
    tokenizer = _load("DistilBERT tokenizer", "backbone.text", text_src, AutoTokenizer.from_pretrained)
    return Backbone(vision, processor, text, tokenizer, vision_src, text_src)


def n_image_tokens(vision: CLIPVisionModel) -> int:
    """CLIP's ``last_hidden_state`` length: one token per patch plus CLS (50 for ViT-B/32 at 224 px)."""
    c = vision.config
    return (c.image_size // c.patch_size) ** 2 + 1


def _key(tcfg: DictConfig, train_text: list[str]) -> str:
    h = hashlib.sha256(json.dumps(OmegaConf.to_container(tcfg, resolve=True), sort_keys=True).encode())
    for line in train_text:
        h.update(line.encode() + b"\n")
    return h.hexdigest()[:16]


def build_tiny(tcfg: DictConfig, cache_dir: str | Path, train_text: list[str]) -> Path:
    """Create (once) and return the tiny preset's folder, holding ``vision/`` and ``text/`` in hub format."""
    folder = Path(cache_dir).expanduser() / "tiny-backbone" / _key(tcfg, train_text)
    if (folder / "text" / "config.json").is_file():
        return folder
    log.info("building the tiny random-init backbone in %s <backbone=tiny>", folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = train_wordpiece(train_text, tcfg.vocab_size)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the run's own RNG stream
        torch.manual_seed(tcfg.seed)
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
        text = DistilBertModel(
            DistilBertConfig(
                vocab_size=len(tokenizer),
                dim=tcfg.text_dim,
                hidden_dim=4 * tcfg.text_dim,
                n_layers=tcfg.text_layers,
                n_heads=tcfg.heads,
                max_position_embeddings=256,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    size = {"shortest_edge": tcfg.image_size}
    crop = {"height": tcfg.image_size, "width": tcfg.image_size}
    vision.save_pretrained(tmp / "vision")
    CLIPImageProcessor(size=size, crop_size=crop).save_pretrained(tmp / "vision")
    text.save_pretrained(tmp / "text")
    tokenizer.save_pretrained(tmp / "text")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built the same key first; identical content
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def train_wordpiece(texts: list[str], vocab_size: int) -> DistilBertTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer trained on ``texts`` ([CLS] q [SEP] like distilbert-base-uncased)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
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
