"""A faithful re-implementation of the CLIQQA script's training step (imageqa/clipqa_bert.py), for benchmarks.

Only what costs time is reproduced, as the script does it (so the benchmark's baseline is the real thing):

- the Dataset's ``__getitem__`` opens the JPEG with PIL, converts it to RGB, turns it into a float tensor with
  torchvision's ``ToTensor`` (an equivalent numpy conversion where torchvision is not installed), runs the
  ``CLIPProcessor`` on that tensor, tokenizes the question, pads ids and mask to 63 with ``F.pad``, tokenizes the
  answer to take its first wordpiece, and moves every tensor to the device one item at a time;
- a default ``DataLoader`` (batch 8, shuffle, no workers, default collate);
- the model runs the frozen CLIP tower at every step, the mapper (Linear -> ReLU per layer), DistilBERT's own
  embedding block on the question ids, ``torch.hstack`` with the image tokens, an attention mask built on the CPU
  and moved, DistilBERT on ``inputs_embeds``, and a ``Linear(768, vocab, bias=False)`` head over **all** 113
  positions before ``logits[:, -1]`` is kept;
- ``model.train()`` (dropout on in the frozen text model), ``optim.Adam(model.parameters())`` (frozen tensors
  included; they have no gradient), ``zero_grad`` / forward / ``L.item()`` / backward / step every batch.

:func:`run_script` runs the whole script as one sweep job would (load, filter answers, split, validate at step 0,
train, validate, plot, test 10 batches, save), so a sweep of the original can be timed as it really ran; its
training steps are timed on their own for the examples/s figure. It keeps the script's cost, not its bugs' effects
on results (the benchmark's models are random anyway).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.functional import pad
from torch.utils.data import DataLoader, Dataset

try:  # the script imports torchvision for ToTensor
    from torchvision.transforms import ToTensor as _ToTensor

    TO_TENSOR = "torchvision"
except Exception:  # noqa: BLE001 - torchvision missing or built for another torch
    _ToTensor = None
    TO_TENSOR = "numpy (torchvision not importable)"

MAX_QUESTION_TOKENS = 63


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor for an RGB PIL image: (3, H, W) float32 in [0, 1]."""
    if _ToTensor is not None:
        return _ToTensor()(image)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


class OriginalDataset(Dataset):
    """The script's ImageQADataset: everything is decoded, processed and moved per item, every time."""

    def __init__(self, data: list[tuple[int, str, str]], fpaths: dict[int, str], img_transform, txt_transform, device):
        self.data, self.fpaths = data, fpaths
        self.img_transform, self.txt_transform, self.device = img_transform, txt_transform, device

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx):
        image_id, question, answer = self.data[idx]
        fname = self.fpaths[image_id]
        image = to_tensor(Image.open(fname).convert("RGB"))
        input_img = self.img_transform(images=image, return_tensors="pt")["pixel_values"].squeeze(0)
        input_img = input_img.to(self.device)
        txt = self.txt_transform(question, return_tensors="pt")
        input_ids, attn = txt.input_ids.squeeze(0), txt.attention_mask.squeeze(0)
        input_ids = pad(input_ids, (0, MAX_QUESTION_TOKENS - input_ids.size(0)), "constant", 0).to(self.device)
        attn = pad(attn, (0, MAX_QUESTION_TOKENS - attn.size(0)), "constant", 0).to(self.device)
        label = self.txt_transform(answer, return_tensors="pt").input_ids.to(self.device)[0, 1].to(self.device)
        return {
            "input_img": input_img,
            "input_ids": input_ids,
            "input_attn_mask": attn,
            "label": label,
            "image_fname": fname,
            "image_id": image_id,
            "question": question,
            "answer": answer,
        }


class OriginalModel(nn.Module):
    """The script's CLIPQA module (frozen CLIP -> mapper -> DistilBERT -> vocabulary head at every position)."""

    def __init__(self, img_model, txt_model, hidden_dim: int, num_layers: int, freeze_txt: bool, device):
        super().__init__()
        self.num_layers, self.device = num_layers, device
        self.img_model, self.txt_model = img_model.to(device), txt_model.to(device)
        if num_layers > 0:
            layers = []
            for i in range(num_layers):
                d_in = img_model.config.hidden_size if i == 0 else hidden_dim
                d_out = txt_model.config.dim if i + 1 == num_layers else hidden_dim
                layers += [nn.Linear(d_in, d_out), nn.ReLU()]
            self.mapping = nn.Sequential(*layers).to(device)
        for p in self.img_model.parameters():
            p.requires_grad = False
        if freeze_txt:
            for p in self.txt_model.parameters():
                p.requires_grad = False
        self.lm_head = nn.Linear(txt_model.config.dim, txt_model.config.vocab_size, bias=False).to(device)

    def forward(self, input_img, input_ids, attn_mask):
        clip_output = self.img_model(pixel_values=input_img).last_hidden_state  # (B, 50, 768), every step
        img_embedding = clip_output if self.num_layers == 0 else self.mapping(clip_output)
        txt_embedding = self.txt_model.embeddings(input_ids)  # (B, 63, 768)
        input_embeds = torch.hstack([txt_embedding, img_embedding])  # (B, 113, 768)
        extra_attn = torch.ones(img_embedding.shape[:-1]).to(self.device)
        input_attn_mask = torch.hstack([attn_mask, extra_attn])  # (B, 113)
        out = self.txt_model(inputs_embeds=input_embeds, attention_mask=input_attn_mask)
        return self.lm_head(out.last_hidden_state)  # (B, 113, vocab): the head at every position


def make_loader(data, fpaths, img_transform, txt_transform, device, batch_size: int, seed: int) -> DataLoader:
    ds = OriginalDataset(data, fpaths, img_transform, txt_transform, device)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def train_step(model, optimizer, loss_fxn, batch) -> float:
    """One step of the script's loop (the parts that run every step)."""
    optimizer.zero_grad()
    output = model(batch["input_img"], batch["input_ids"], batch["input_attn_mask"])
    logits = output[:, -1]
    loss = loss_fxn(logits, batch["label"])
    value = loss.item()
    loss.backward()
    optimizer.step()
    return value


def make_data(images, questions, answers, txt_transform) -> list[tuple[int, str, str]]:
    """The script's filter: keep questions whose answer is exactly one wordpiece ([CLS] x [SEP])."""
    return [
        (i, q, a)
        for i, q, a in zip(images, questions, answers, strict=True)
        if txt_transform(a, return_tensors="pt").input_ids.shape == (1, 3)
    ]


@torch.no_grad()
def val_loss_acc(model, loader, loss_fxn, max_batches: int | None = None) -> tuple[float, float]:
    """The script's validation (and, with max_batches=10, its test accuracy): model left in train mode."""
    loss, correct, total = 0.0, 0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i == max_batches:
            break
        logits = model(batch["input_img"], batch["input_ids"], batch["input_attn_mask"])[:, -1]
        loss += loss_fxn(logits, batch["label"]).item()
        correct += (torch.argmax(logits, 1) == batch["label"]).sum().item()
        total += batch["label"].size(0)
    return loss, correct / total


def run_script(
    data_root: Path,
    vision_dir: Path,
    text_dir: Path,
    device: torch.device,
    max_steps: int,
    warmup: int,
    out: Path,
    eval_steps: int = 200,
) -> dict:
    """One run of the script, stopped after ``max_steps`` training steps (the only change: no full epoch).

    Returns ``wall_seconds`` (the whole run, like a sweep job), ``step_seconds`` and ``steps_timed`` (training steps
    after the first ``warmup``, data loading included) and the ``first_batch`` (for FLOP counting).
    """
    from torch.utils.data import random_split
    from transformers import AutoImageProcessor, CLIPProcessor, CLIPVisionModel, DistilBertModel, DistilBertTokenizer

    t_start = time.perf_counter()
    img_model = CLIPVisionModel.from_pretrained(vision_dir)
    txt_transform = DistilBertTokenizer.from_pretrained(text_dir)
    # CLIPProcessor as the script loads it (the CLIP checkpoint's image processor); its tokenizer part is never
    # called on the image path, so the DistilBERT tokenizer stands in for CLIP's BPE one.
    img_transform = CLIPProcessor(
        image_processor=AutoImageProcessor.from_pretrained(vision_dir), tokenizer=txt_transform
    )
    txt_model = DistilBertModel.from_pretrained(text_dir)

    def split(name: str, folder: str):
        rows = {
            f: (data_root / "cocoqa" / name / f"{f}.txt").read_text().splitlines()
            for f in ("img_ids", "questions", "answers")
        }
        ids = [int(i) for i in rows["img_ids"]]
        paths = {i: str(data_root / "images" / folder / f"COCO_{folder}_{i:012d}.jpg") for i in set(ids)}
        return make_data(ids, rows["questions"], rows["answers"], txt_transform), paths

    train_data, fpaths = split("train", "train2014")
    test_data, test_paths = split("test", "val2014")
    fpaths.update(test_paths)
    dev_len = len(train_data) // 10
    train_data, dev_data = random_split(
        train_data, [len(train_data) - dev_len, dev_len], generator=torch.Generator().manual_seed(42)
    )
    train_loader = make_loader(train_data, fpaths, img_transform, txt_transform, device, 8, seed=0)
    dev_loader = make_loader(dev_data, fpaths, img_transform, txt_transform, device, 8, seed=1)
    test_loader = make_loader(test_data, fpaths, img_transform, txt_transform, device, 8, seed=2)
    model = OriginalModel(img_model, txt_model, 1024, 2, freeze_txt=True, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fxn = nn.CrossEntropyLoss()
    model = model.train()

    best = {"state_dict": None, "loss": float("inf")}
    training_loss, steps, step_seconds, first_batch = [], 0, 0.0, None
    tick = time.perf_counter()
    for batch in train_loader:  # one epoch, cut at max_steps
        first_batch = first_batch or batch
        training_loss.append(train_step(model, optimizer, loss_fxn, batch))
        _sync(device)
        if steps >= warmup:
            step_seconds += time.perf_counter() - tick
        if steps % eval_steps == 0:
            val_loss, _ = val_loss_acc(model, dev_loader, loss_fxn)
            if val_loss <= best["loss"]:
                best = {"state_dict": model.state_dict(), "loss": val_loss}  # by reference, as the script did
        steps += 1
        if steps == max_steps:
            break
        tick = time.perf_counter()
    if (steps - 1) % eval_steps != 0:
        val_loss, _ = val_loss_acc(model, dev_loader, loss_fxn)
        if val_loss <= best["loss"]:
            best = {"state_dict": model.state_dict(), "loss": val_loss}
    _plot(training_loss, out / "training_loss.png")
    model.load_state_dict(best["state_dict"])
    model = model.eval()
    val_loss_acc(model, test_loader, loss_fxn, max_batches=10)  # the script's 80-question "test accuracy"
    torch.save(model.state_dict(), out / "model.pt")
    _sync(device)
    return {
        "wall_seconds": time.perf_counter() - t_start,
        "step_seconds": step_seconds,
        "steps_timed": steps - warmup,
        "first_batch": first_batch,
        "model": model,
        "optimizer": optimizer,
        "loss_fxn": loss_fxn,
    }


def _plot(values: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    ax.plot(values)
    fig.savefig(path)
    plt.close(fig)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
