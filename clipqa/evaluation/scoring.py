"""Evaluation: accuracy (overall and per COCO-QA type) and loss of a model over a split, and the forward pass."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipqa import metrics as M
from clipqa.data.cocoqa import Split
from clipqa.models.model import ClipQA


def autocast(device: torch.device, precision: str):
    """Mixed precision context: bf16/fp16 autocast on the device, nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(model: ClipQA, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``(B, C)`` for a collated batch of pixels or cached features."""
    return model(
        batch["input_ids"],
        batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        image_features=batch.get("image_features"),
        question_rows=batch.get("question_rows"),
    )


@torch.no_grad()
def evaluate(
    model: ClipQA, loader: DataLoader, device: torch.device, precision: str, split: str
) -> tuple[dict[str, float], dict[int, int]]:
    """``{split}/acc`` (overall + per type) and ``{split}/loss`` over every question of ``loader``.

    Questions the head cannot answer (label -1: a multi-wordpiece answer under head=vocab, an answer unseen in
    training under head=answers) count as wrong and are left out of the loss only. Returns (metrics, predictions)
    with predictions mapping question number in the split -> predicted class id.

    Predictions and loss sums stay on the device until the split is done (one host read at the end, not one per
    batch); labels, types and question numbers are read from the batch's host copy.
    """
    was_training = model.training
    model.eval()
    preds_dev: list[torch.Tensor] = []
    loss_dev: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    types: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    for batch in tqdm(loader, desc=f"evaluating {split}", leave=False, unit="batch"):
        if batch is None:
            continue
        on_device = to_device(batch, device)
        with autocast(device, precision):
            logits = forward(model, on_device)  # (B, C)
        y = on_device["labels"]
        loss_dev.append(F.cross_entropy(logits.float(), y, ignore_index=-1, reduction="sum"))  # () without the -1s
        preds_dev.append(logits.argmax(-1))  # (B,)
        labels.append(batch["labels"]), types.append(batch["types"]), index.append(batch["index"])
    model.train(was_training)
    if not preds_dev:
        return {**M.accuracy_by_type([], [], f"{split}/acc"), f"{split}/loss": float("nan")}, {}
    pred, y = torch.cat(preds_dev).cpu(), torch.cat(labels)  # (n,): the one host read
    loss_sum, loss_n = sum(torch.stack(loss_dev).tolist()), int((y >= 0).sum())
    out = M.accuracy_by_type((pred == y).tolist(), torch.cat(types).tolist(), f"{split}/acc")
    out[f"{split}/loss"] = loss_sum / loss_n if loss_n else float("nan")
    return out, dict(zip(torch.cat(index).tolist(), pred.tolist(), strict=True))


def write_predictions(path: Path, split: Split, preds: dict[int, int], classes: list[str]) -> None:
    """One row per test question (for error analysis); questions skipped for unreadable images are absent."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("image_id\ttype\tquestion\tanswer\tprediction\tcorrect\n")
        for i, pred in sorted(preds.items()):
            answer, guess, qtype = split.answers[i], classes[pred], M.TYPE_NAMES[split.types[i]]
            f.write(f"{split.image_ids[i]}\t{qtype}\t{split.questions[i]}\t{answer}\t{guess}\t{int(answer == guess)}\n")


def json_safe(d: dict) -> dict:
    """NaN (a question type absent from a split) becomes null; everything else stays a number."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
