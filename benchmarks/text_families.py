"""What each text family costs per training step on this machine: DistilBERT (clipqa's packed path and its own
forward), BERT base and RoBERTa base (their own forward: the packed path covers DistilBERT's block layout only).

    python benchmarks/text_families.py                  # about 1.5 minutes on 2 idle CPU cores
    python benchmarks/text_families.py --steps 20 --out families.json

Offline: real-size architectures with random weights (distilbert-base-uncased: 6 layers; bert-base-uncased and
roberta-base: 12 layers; width 768), built from their configs. Each step is clipqa's model on cached image features
(50 tokens x 768, CLIP ViT-B/32's), batch 8 (the paper's), questions of 6-16 tokens padded per batch, a 2-layer
mapper and a 1000-answer head, forward + backward + Adam, in two regimes: the text model frozen (the paper's V2:
gradients flow through it to the mapper) and trained (V3/V4). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DistilBertConfig,
    DistilBertModel,
    RobertaConfig,
    RobertaModel,
)

from clipqa.models.backbones import position_start
from clipqa.models.cpu_kernels import use_cpu_kernels
from clipqa.models.freeze import apply_freeze
from clipqa.models.model import ClipQA, MLPMapper

VOCAB, BATCH, N_IMAGE, WIDTH = 30522, 8, 50, 768


def text_model(family: str) -> nn.Module:
    if family == "distilbert":
        return DistilBertModel(DistilBertConfig(vocab_size=VOCAB))
    if family == "bert":
        return BertModel(BertConfig(vocab_size=VOCAB), add_pooling_layer=False)
    return RobertaModel(RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1), False)


def build(family: str, lean: bool, train_text: bool) -> ClipQA:
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    mapper = MLPMapper(WIDTH, WIDTH, num_layers=2, hidden_dim=1024, activation="relu", final_activation=True, dropout=0)
    text = text_model(family)
    model = ClipQA(
        vision, mapper, text, nn.Linear(WIDTH, 1000), image_position_offset=64, readout="cls",
        position_start=position_start(text),
    )  # fmt: skip
    model.lean_text = lean
    apply_freeze(model, vision=True, text=not train_text, mapper=False)
    use_cpu_kernels(model)
    return model.train()


def batches(steps: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(6, 17, (BATCH,), generator=g)
        T = int(lengths.max())
        ids = torch.randint(5, 20000, (BATCH, T), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()  # (B, T)
        ids = ids * mask  # padding id 0 (RoBERTa's 1 does not matter: masked)
        feats = torch.randn(BATCH, N_IMAGE, WIDTH, generator=g).half()  # (B, 50, 768): the cache's dtype
        rows = mask.reshape(-1).nonzero().squeeze(1)  # (n_q,): the collator's question_rows
        out.append(dict(input_ids=ids, attention_mask=mask, image_features=feats, question_rows=rows))
    return out


def examples_per_s(model: ClipQA, steps: int, warmup: int = 1) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.randint(0, 1000, (BATCH,))
    data = batches(warmup + steps)
    for i, batch in enumerate(data):
        if i == warmup:
            started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(**batch), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return BATCH * steps / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    variants = [("distilbert", True), ("distilbert", False), ("bert", False), ("roberta", False)]
    figures = {"threads": torch.get_num_threads(), "batch": BATCH, "image_tokens": N_IMAGE, "steps": a.steps}
    print(f"{'text model':28s} {'frozen text ex/s':>18s} {'trained text ex/s':>18s}")
    for family, lean in variants:
        name = f"{family} ({'packed' if lean else 'own forward'})"
        frozen = examples_per_s(build(family, lean, train_text=False), a.steps)
        trained = examples_per_s(build(family, lean, train_text=True), a.steps)
        figures[name] = {
            "frozen_text_examples_per_s": round(frozen, 2),
            "trained_text_examples_per_s": round(trained, 2),
        }
        print(f"{name:28s} {frozen:18.1f} {trained:18.1f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(figures, f, indent=2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
