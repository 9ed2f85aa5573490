"""Pretraining for the tiny backbones (``backbone=tiny_pretrained``): a miniature of what the hub models bring.

The paper's frozen-text versions (V1, V2) work because DistilBERT already knows the language and CLIP's tokens
already say what is in a picture. A random-init tiny preset knows neither, so on the demo every frozen-text variant
sat at the answer prior. This module gives the tiny models the same two kinds of prior knowledge, learnt from a
world *like* the demo's but never from the demo's data (fresh scenes from the demo generator's grammar and
renderer, drawn with ``pretrain.seed``, not the demo's seed; no demo question or picture is read):

1. a WordPiece tokenizer and a tiny DistilBERT trained with **masked-language modelling** on text "documents", one
   per scene: a caption ("three red squares on the beach") followed by questions about it with their answers
   ("how many squares are there three");
2. a tiny CLIP vision tower trained to **name the rendered attributes** (shape, colour, count, place) from its
   CLS token and from the mean of its patch tokens, on fresh pictures rendered like the demo's (JPEG, both the
   demo's and the smoke test's picture sizes).

Reproducible: the same config gives bit-identical weights on one machine (seeded, one CPU thread, deterministic
algorithms; the thread count and CPU kind can change float rounding), so the feature cache's key (a digest of
the vision weights) is stable. Takes about half a minute on one CPU core (tqdm shows the steps).
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModel, DistilBertForMaskedLM

from clipqa.data import demo as world

log = logging.getLogger(__name__)

# The attributes the vision tower learns to name, in the demo generator's own orders.
ATTRIBUTES = {
    "shape": world.SHAPES,
    "color": list(world.COLORS),
    "count": world.NUMBERS,
    "place": world.PLACES,
}
MASK_FRACTION = 0.15  # BERT's: of the non-special tokens, 80% -> [MASK], 10% -> a random token, 10% kept


@contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Seeded, single-threaded, deterministic torch inside; the caller's RNG, thread count and flags restored after.

    One thread because a matrix product summed in another order by more threads rounds differently, which would
    change the weights' digest (and so the feature cache's key) with the machine's load or core count.
    """
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(det)
            torch.set_num_threads(threads)


def scenes(n: int, rng: random.Random) -> list[tuple[str, str, int, str]]:
    """``n`` random scenes (shape, colour, count, place), drawn like the demo generator draws its pictures."""
    return [
        (rng.choice(world.SHAPES), rng.choice(list(world.COLORS)), rng.randint(1, 4), rng.choice(world.PLACES))
        for _ in range(n)
    ]


def documents(n: int, seed: int) -> list[str]:
    """The text corpus: per scene, a caption, then two questions of different types, each followed by its answer."""
    rng = random.Random(seed)
    docs = []
    for shape, color, count, place in scenes(n, rng):
        parts = [world.caption(shape, color, count, place, rng)]
        for qtype in rng.sample(range(4), 2):
            q, a = world.question(qtype, shape, color, count, place, rng)
            parts.append(f"{q} {a}")
        docs.append(" . ".join(parts))
    return docs


def pretrain_text(mlm: DistilBertForMaskedLM, tokenizer, pcfg: DictConfig, bar: tqdm) -> None:
    """Masked-language modelling, one document per sequence (``[CLS] doc [SEP]``, padded to the batch's longest).

    One document per sequence, not several packed into long ones: packed, the tiny model sat at the unigram loss
    (~3.4) for over a thousand steps before it learnt to use the context; alone, it does within a few hundred.
    """
    g = torch.Generator().manual_seed(pcfg.seed)
    enc = tokenizer(documents(pcfg.documents, pcfg.seed), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (D, L), L = the longest document
    special = torch.tensor(tokenizer.all_special_ids)  # ids 0..4: [PAD] [UNK] [CLS] [SEP] [MASK]
    opt = torch.optim.AdamW(mlm.parameters(), lr=pcfg.lr, weight_decay=0.01)
    mlm.train()
    bar.set_description("tiny backbone: text (masked LM)")
    for step in range(pcfg.text_steps):
        idx = torch.randint(len(ids), (pcfg.batch_size,), generator=g)
        batch, attention = ids[idx], mask[idx]  # (B, L)
        labels = batch.clone()
        chosen = (torch.rand(batch.shape, generator=g) < MASK_FRACTION) & ~torch.isin(batch, special)
        labels[~chosen] = -100
        roll = torch.rand(batch.shape, generator=g)
        inputs = batch.clone()
        inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = torch.randint(len(special), len(tokenizer), (int(swap.sum()),), generator=g)
        loss = mlm(input_ids=inputs, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update()
        if step % 50 == 0 or step == pcfg.text_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("tiny text encoder: masked-LM loss %.3f after %d steps", loss.item(), pcfg.text_steps)


def pictures(n: int, image_size: int, processor: CLIPImageProcessor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh demo-style pictures as ``pixel_values (n, 3, S, S)`` and their attributes ``(n, 4)`` (indices).

    Rendered at the model's size and at twice it (the smoke test's and the demo's pictures) and JPEG-encoded like
    the demo's files, then pre-processed by the very image processor the tower is saved with.
    """
    rng = random.Random(seed)
    images, labels = [], []
    for i, (shape, color, count, place) in enumerate(scenes(n, rng)):
        im = world.render(shape, color, count, place, image_size * (1 + i % 2), rng)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        labels.append(
            [world.SHAPES.index(shape), list(world.COLORS).index(color), count - 1, world.PLACES.index(place)]
        )
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # (n, 3, S, S)
    return pixels, torch.tensor(labels)


class AttributeHeads(nn.Module):
    """One linear classifier per attribute, for the CLS token (after CLIP's post-LayerNorm) and for the patch mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls = nn.ModuleList(nn.Linear(dim, len(v)) for v in ATTRIBUTES.values())
        self.patches = nn.ModuleList(nn.Linear(dim, len(v)) for v in ATTRIBUTES.values())

    def loss(self, pooled: torch.Tensor, patch_mean: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy
        return sum(
            ce(c(pooled), labels[:, j]) + ce(p(patch_mean), labels[:, j])
            for j, (c, p) in enumerate(zip(self.cls, self.patches, strict=True))
        ) / (2 * len(ATTRIBUTES))


def pretrain_vision(vision: CLIPVisionModel, processor: CLIPImageProcessor, pcfg: DictConfig, bar: tqdm) -> None:
    """Supervised on the rendered attributes, so the tower's tokens carry what the picture shows."""
    g = torch.Generator().manual_seed(pcfg.seed + 1)
    bar.set_description("tiny backbone: rendering pictures")
    pixels, labels = pictures(pcfg.pictures, vision.config.image_size, processor, pcfg.seed + 2)
    heads = AttributeHeads(vision.config.hidden_size)
    opt = torch.optim.AdamW([*vision.parameters(), *heads.parameters()], lr=pcfg.lr, weight_decay=0.01)
    vision.train()
    bar.set_description("tiny backbone: vision (attributes)")
    for step in range(pcfg.vision_steps):
        idx = torch.randint(len(pixels), (pcfg.batch_size,), generator=g)
        out = vision(pixel_values=pixels[idx])
        patch_mean = out.last_hidden_state[:, 1:].mean(dim=1)  # (B, D)
        loss = heads.loss(out.pooler_output, patch_mean, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update()
        if step % 50 == 0 or step == pcfg.vision_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    vision.eval()
    with torch.no_grad():  # how well the tower names the attributes of pictures it was trained on (a sanity check)
        out = vision(pixel_values=pixels[:256])
        hits = [h(out.pooler_output).argmax(-1) == labels[:256, j] for j, h in enumerate(heads.cls)]
    log.info(
        "tiny vision tower: attribute loss %.3f after %d steps; CLS names %s",
        loss.item(),
        pcfg.vision_steps,
        ", ".join(f"{k} {h.float().mean().item():.0%}" for k, h in zip(ATTRIBUTES, hits, strict=True)),
    )
