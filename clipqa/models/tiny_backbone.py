"""The offline tiny backbones (``backbone=tiny`` and the demo's ``backbone=tiny_pretrained``): small CLIP vision +
DistilBERT built from configs (random init, or pretrained by :mod:`clipqa.models.tiny_pretrain`), with their
tokenizers, saved with ``save_pretrained`` to ``<paths.cache_dir>/tiny-backbone/<key>/{vision,text}``; they are then
loaded by :mod:`clipqa.models.backbones` through the same ``from_pretrained`` calls as the hub models, so the
offline demo exercises the real loading path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizerFast,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertModel,
    DistilBertTokenizerFast,
)

from clipqa.models import tiny_pretrain

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Part of the pretrained preset's cache key: bump it when clipqa/models/tiny_pretrain.py changes what it trains, so a
# cache never serves weights an older pretraining made.
PRETRAIN_VERSION = 1


def _key(tcfg: DictConfig, train_text: list[str] | None) -> str:
    described = OmegaConf.to_container(tcfg, resolve=True)
    if described.get("text_family") == "distilbert":  # the key before text_family existed: existing builds stay valid
        del described["text_family"]
    h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
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
        bert = tcfg.get("text_family", "distilbert") == "bert"  # a BERT-style text model (sweep=tiny_backbones)
        if bert:
            text_config = BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=tcfg.text_dim,
                intermediate_size=4 * tcfg.text_dim,
                num_hidden_layers=tcfg.text_layers,
                num_attention_heads=tcfg.heads,
                max_position_embeddings=256,
                pad_token_id=tokenizer.pad_token_id,
            )
        else:
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
            text = BertModel(text_config, add_pooling_layer=False) if bert else DistilBertModel(text_config)
        else:
            mlm = (BertForMaskedLM if bert else DistilBertForMaskedLM)(text_config)
            with tqdm(total=pcfg.text_steps + pcfg.vision_steps, unit="step", file=sys.stderr) as bar:
                tiny_pretrain.pretrain_text(mlm, tokenizer, pcfg, bar)
                tiny_pretrain.pretrain_vision(vision, processor, pcfg, bar)
            text = mlm.base_model  # the encoder without its masked-LM head
        if bert:  # the same WordPiece vocabulary, under BERT's tokenizer class (what AutoTokenizer will load)
            tokenizer = _as_wordpiece_tokenizer(tokenizer.backend_tokenizer, BertTokenizerFast)
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
    return _as_wordpiece_tokenizer(tok)


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
    return _as_wordpiece_tokenizer(tok)


def _as_wordpiece_tokenizer(tok, cls=DistilBertTokenizerFast):
    """A WordPiece ``tokenizers.Tokenizer`` as a transformers tokenizer of class ``cls``: [CLS] q [SEP]."""
    from tokenizers import decoders, processors

    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return cls(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
