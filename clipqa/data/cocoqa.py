"""COCO-QA: read the archive layout, find COCO 2014 images, split train/val, label answers, batch with dynamic padding.

Layout (the unzipped ``cocoqa-2015-05-17.zip``)::

    <data.root>/train/{img_ids,questions,answers,types}.txt   # line-aligned, one question per line
    <data.root>/test/{img_ids,questions,answers,types}.txt
    <data.image_root>/train2014/COCO_train2014_%012d.jpg      # COCO 2014 images
    <data.image_root>/val2014/COCO_val2014_%012d.jpg          # (COCO-QA test questions use val2014)

Every problem with these files raises ClipqaError naming the file (and line) and the fix.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from clipqa.errors import ClipqaError
from clipqa.metrics import TYPE_NAMES

log = logging.getLogger(__name__)

SPLIT_FILES = ("img_ids.txt", "questions.txt", "answers.txt", "types.txt")
COCO_FOLDERS = ("train2014", "val2014")
_COCO_NAME = re.compile(r"COCO_(?:train|val)2014_(\d{12})\.jpg$")
IGNORE_LABEL = -100  # F.cross_entropy's default ignore_index: rows that pad a batch to its fixed size

DOWNLOAD_HINT = (
    "Fetch both with one command: clipqa-download --to data/ (it prints the data.root=... data.image_root=... "
    "overrides to use). Or download COCO-QA from "
    "http://www.cs.toronto.edu/~mren/research/imageqa/data/cocoqa/cocoqa-2015-05-17.zip and "
    "unzip it so that data.root holds train/ and test/; download the COCO 2014 images from "
    "http://images.cocodataset.org/zips/train2014.zip and val2014.zip and unzip both into data.image_root. "
    "To try clipqa without any download run: python train.py experiment=demo"
)


@dataclass
class Split:
    """One COCO-QA split as parallel lists (index i = question i of the files)."""

    name: str
    image_ids: list[int]
    questions: list[str]
    answers: list[str]
    types: list[int]

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: list[int], name: str | None = None) -> Split:
        return Split(
            name or self.name,
            [self.image_ids[i] for i in idx],
            [self.questions[i] for i in idx],
            [self.answers[i] for i in idx],
            [self.types[i] for i in idx],
        )


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ClipqaError(
            f"{path} is not UTF-8 text (byte {e.start}). COCO-QA files are plain UTF-8; re-extract the archive."
        ) from None
    lines = [line.strip() for line in text.splitlines()]  # splitlines also handles CRLF
    while lines and not lines[-1]:  # trailing blank lines are not questions
        lines.pop()
    return lines


def read_split(root: str | Path, split: str) -> Split:
    """Read ``<root>/<split>/`` (split = train | test). Raises ClipqaError for missing/inconsistent files."""
    folder = Path(root).expanduser().resolve() / split
    missing = [f for f in SPLIT_FILES if not (folder / f).is_file()]
    if missing:
        raise ClipqaError(
            f"COCO-QA {split} split not found or incomplete: looked in {folder} (data.root={root}) for "
            f"{', '.join(SPLIT_FILES)}; missing {', '.join(missing)}. {DOWNLOAD_HINT}"
        )
    cols = {f: _read_lines(folder / f) for f in SPLIT_FILES}
    counts = {f: len(v) for f, v in cols.items()}
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{folder / f}: {n} lines" for f, n in counts.items())
        raise ClipqaError(
            f"The four COCO-QA files of the {split} split must have one line per question, but the line counts "
            f"differ ({listing}). The files are line-aligned; re-extract the archive or fix the file that differs."
        )
    if counts["questions.txt"] == 0:
        raise ClipqaError(f"{folder / 'questions.txt'} is empty: the {split} split has no questions. {DOWNLOAD_HINT}")
    image_ids, types = [], []
    for n, (raw_id, raw_type) in enumerate(zip(cols["img_ids.txt"], cols["types.txt"], strict=True), start=1):
        try:
            image_ids.append(int(raw_id))
        except ValueError:
            raise ClipqaError(
                f"{folder / 'img_ids.txt'} line {n}: {raw_id!r} is not a COCO image id (an integer)."
            ) from None
        if raw_type not in ("0", "1", "2", "3"):
            raise ClipqaError(
                f"{folder / 'types.txt'} line {n}: unknown question type {raw_type!r}; COCO-QA types are "
                f"{', '.join(f'{k} ({v})' for k, v in TYPE_NAMES.items())}."
            )
        types.append(int(raw_type))
    for f in ("questions.txt", "answers.txt"):
        for n, line in enumerate(cols[f], start=1):
            if not line:
                raise ClipqaError(f"{folder / f} line {n} is empty; every question needs a question and an answer.")
    return Split(split, image_ids, cols["questions.txt"], cols["answers.txt"], types)


def index_images(image_root: str | Path) -> dict[int, Path]:
    """Map COCO image id -> file, from one listing of ``train2014/`` and ``val2014/`` (no per-image stat)."""
    root = Path(image_root).expanduser().resolve()
    found = [root / d for d in COCO_FOLDERS if (root / d).is_dir()]
    if not found:
        raise ClipqaError(
            f"No COCO 2014 image folder found: looked for {root / 'train2014'} and {root / 'val2014'} "
            f"(data.image_root={image_root}). {DOWNLOAD_HINT}"
        )
    index: dict[int, Path] = {}
    for folder in found:
        for name in os.listdir(folder):
            m = _COCO_NAME.match(name)
            if m:
                index.setdefault(int(m.group(1)), folder / name)
    return index


def attach_images(split: Split, index: dict[int, Path], image_root: str | Path, on_bad_image: str) -> Split:
    """Keep the questions whose image exists; raise (``error``) or count and log (``skip``) the others."""
    keep = [i for i, img in enumerate(split.image_ids) if img in index]
    n_missing = len(split) - len(keep)
    if n_missing:
        lost = sorted({split.image_ids[i] for i in range(len(split)) if split.image_ids[i] not in index})
        coco = "train2014" if split.name == "train" else "val2014"  # where COCO-QA's questions point
        examples = ", ".join(f"{coco}/COCO_{coco}_{i:012d}.jpg" for i in lost[:3])
        if on_bad_image == "error":
            raise ClipqaError(
                f"{len(lost)} images of the COCO-QA {split.name} split are missing from "
                f"{Path(image_root).expanduser().resolve()}/train2014 and /val2014 (e.g. {examples}; "
                f"data.image_root={image_root}). Unzip COCO 2014 train2014.zip and val2014.zip there, or pass "
                f"data.on_bad_image=skip to drop those {n_missing} questions (they are counted and logged)."
            )
        log.warning(
            "skipped %d %s questions whose image is missing (%d images, e.g. %s) <data.on_bad_image=skip>",
            n_missing,
            split.name,
            len(lost),
            examples,
        )
    return split.subset(keep)


def train_val_split(train: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """A seeded random split of the training questions (the paper: 10%, seed 42)."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(train)))
    return train.subset(sorted(order[n_val:]), "train"), train.subset(sorted(order[:n_val]), "val")


class LabelSpace:
    """Answer strings <-> class ids for one of the two heads.

    - ``vocab`` (paper): classes are the tokenizer's vocabulary; an answer's label is its wordpiece id if it is
      exactly one known wordpiece, else -1 (such training questions are dropped; at test time they count as wrong).
    - ``answers``: classes are the distinct answers of the training split; an unseen answer gets -1 (wrong).
    """

    def __init__(self, kind: str, classes: list[str], tokenizer=None):
        self.kind, self.classes, self.tokenizer = kind, classes, tokenizer
        self._ids = {a: i for i, a in enumerate(classes)} if kind == "answers" else {}

    @classmethod
    def build(cls, kind: str, tokenizer, train_answers: list[str]) -> LabelSpace:
        if kind == "answers":
            return cls(kind, sorted(set(train_answers)))
        classes = [""] * len(tokenizer)
        for tok, i in tokenizer.get_vocab().items():
            if i < len(classes):
                classes[i] = tok
        return cls(kind, classes, tokenizer)

    def labels(self, answers: list[str]) -> list[int]:
        """Class id per answer; -1 where the head cannot produce that answer."""
        if self.kind == "vocab":
            for answer in set(answers) - self._ids.keys():
                pieces = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
                ok = len(pieces) == 1 and pieces[0] != self.tokenizer.unk_token_id  # [UNK] is not the answer
                self._ids[answer] = pieces[0] if ok else -1
        return [self._ids.get(a, -1) for a in answers]

    def __len__(self) -> int:
        return len(self.classes)


def load_pixels(
    path: Path, processor, on_bad_image: str, user: str, log_skip: bool = True
) -> tuple[torch.Tensor | None, str | None]:
    """Decode one image (as RGB) and pre-process it: ``(pixel_values (3, H, W), None)``.

    Unreadable files raise ClipqaError naming the file and ``user`` (which question needs it) under
    ``on_bad_image=error``; under ``skip`` the problem is logged and ``(None, reason)`` returned.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # greyscale, CMYK, PNG with alpha
        return processor(images=im, return_tensors="pt")["pixel_values"][0], None  # (3, H, W)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if on_bad_image == "error":
            raise ClipqaError(
                f"Cannot read image {path} ({type(e).__name__}: {e}); it is used by {user}. Replace the file, or "
                "pass data.on_bad_image=skip to skip such questions (each skip is logged)."
            ) from None
        if log_skip:
            log.warning("skipped unreadable image %s (%s) <data.on_bad_image=skip>", path, e)
        return None, f"{type(e).__name__}: {e}"


class QADataset(Dataset):
    """Items: ``{"pixel_values": (3, H, W), "question": str, "label": int (-1 = unanswerable), "type", "index"}``.

    Images are decoded here (so DataLoader workers do it) and converted to RGB, so greyscale, CMYK and PNG-with-
    alpha files work. An unreadable image raises ClipqaError naming the file (``data.on_bad_image=error``) or is
    logged and returned as None, which :class:`Collator` drops (``skip``).
    """

    def __init__(self, split: Split, labels: list[int], index: dict[int, Path], processor, on_bad_image: str):
        self.split, self.labels, self.index = split, labels, index
        self.processor, self.on_bad_image = processor, on_bad_image

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict | None:
        user = f"question {i + 1} of the {self.split.name} split"
        pixels, _ = load_pixels(self.index[self.split.image_ids[i]], self.processor, self.on_bad_image, user)
        if pixels is None:
            return None
        return {
            "pixel_values": pixels,
            "question": self.split.questions[i],
            "label": self.labels[i],
            "type": self.split.types[i],
            "index": i,
        }


class Collator:
    """Stack images and tokenize questions with per-batch (dynamic) padding, not a fixed 63 tokens.

    Batch: ``pixel_values (B, 3, H, W)`` (or ``image_features (B, N, D)`` from the feature cache),
    ``input_ids``/``attention_mask (B, T)`` with T = longest question in the batch (capped at ``max_tokens``),
    ``question_rows (n_q,)`` (flat positions of the real question tokens in ``(B, T)``, ascending: the model packs
    tokens with them, so the device never has to find them with a host-synchronising ``nonzero()``),
    ``labels (B,)``, ``types (B,)``, ``index (B,)`` (question number in the split).

    Under CUDA graphs (few fixed shapes, each graph recorded once): ``buckets`` (``trainer.length_buckets``) round T
    up to the first that holds the longest question (:func:`bucket_lengths` with ``image_tokens`` N, else capped at
    ``max_tokens``; padding never changes an answer: tests/models/test_model.py); ``pad_to`` fills a short batch
    with copies of its first question labelled :data:`IGNORE_LABEL` (no loss), and ``n_real`` (an int) counts the
    real rows. ``pin_memory``: stacked straight into page-locked memory (asynchronous copies to the GPU).
    """

    def __init__(self, tokenizer, max_tokens: int, buckets=None, pin_memory=False, pad_to=None, image_tokens=None):
        self.tokenizer, self.max_tokens, self.pin_memory, self.pad_to = tokenizer, max_tokens, pin_memory, pad_to
        if not buckets:
            self.buckets = None
        elif image_tokens is not None:  # aligned for the fused attention kernels (CUDA graphs' path)
            self.buckets = bucket_lengths(buckets, max_tokens, image_tokens)
        else:
            self.buckets = sorted({min(b, max_tokens) for b in buckets} | {max_tokens})

    def __call__(self, items: list[dict | None]) -> dict[str, torch.Tensor] | None:
        items = [it for it in items if it is not None]  # unreadable images under on_bad_image=skip
        if not items:
            return None
        n_real = len(items)
        if self.pad_to is not None and n_real < self.pad_to:  # filler rows: same tokens as row 0, no loss
            items = items + [{**items[0], "label": IGNORE_LABEL, "index": -1}] * (self.pad_to - n_real)
        enc = self.tokenizer(
            [it["question"] for it in items],
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        if self.buckets:
            T = next(b for b in self.buckets if b >= ids.shape[1])  # the last bucket holds max_tokens: found
            ids = torch.nn.functional.pad(ids, (0, T - ids.shape[1]), value=self.tokenizer.pad_token_id)  # (B, T)
            mask = torch.nn.functional.pad(mask, (0, T - mask.shape[1]), value=0)  # (B, T)
        image = "image_features" if "image_features" in items[0] else "pixel_values"  # cached or decoded
        first = items[0][image]
        stacked = torch.empty((len(items), *first.shape), dtype=first.dtype, pin_memory=self.pin_memory)
        batch = {
            image: torch.stack([it[image] for it in items], out=stacked),  # (B, 3, H, W) pixels or (B, N, D) features
            "input_ids": ids,  # (B, T)
            "attention_mask": mask,  # (B, T)
            "question_rows": torch.from_numpy(np.flatnonzero(mask.numpy())),  # (n_q,) int64, found on the host
            "labels": torch.tensor([it["label"] for it in items]),  # (B,)
            "types": torch.tensor([it["type"] for it in items]),  # (B,)
            "index": torch.tensor([it["index"] for it in items]),  # (B,) position in the split
        }
        if self.pad_to is not None:
            batch["n_real"] = n_real  # a Python int: the loop counts examples without reading a tensor
        return batch


class EpochSampler(Sampler[int]):
    """Shuffled indices for epoch ``epoch`` (seeded by ``seed`` and the epoch), starting at position ``start``: the
    order is a pure function of (``trainer.seed``, epoch), so a resumed epoch skips the batches already done."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.start :].tolist())

    def __len__(self) -> int:
        return self.n - self.start


def worker_context(num_workers: int, device: torch.device | None = None):
    """DataLoader workers' start method: ``forkserver`` when the run's ``device`` is a GPU, else ``fork`` (if any).

    Explicit because Hydra's joblib launcher runs jobs in loky processes, whose own context cannot start DataLoader
    workers ("'Process' object has no attribute 'env'"). Not ``fork`` on a GPU: CUDA is initialised and threads run
    (compile pool, pin-memory, tqdm); a forked child inherits any lock one held and can hang on it. Forkserver
    children start clean, so datasets and collators must pickle (tests/training/test_loaders.py)."""
    if num_workers <= 0:
        return None
    methods = multiprocessing.get_all_start_methods()
    if device is not None and device.type == "cuda":
        return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return multiprocessing.get_context("fork") if "fork" in methods else None


def bucket_lengths(lengths: list[int], max_tokens: int, n_image_tokens: int, multiple: int = 16) -> list[int]:
    """``trainer.length_buckets`` under CUDA graphs, each rounded up so that ``T + n_image_tokens`` is a multiple of
    ``multiple`` (fused attention kernels copy, or once refused, misaligned masks: [16, 24, 32, 64] + 50 image tokens
    gave 66/74/82/114); the longest holds ``max_tokens``. Padding past it is masked, so answers never change."""
    wanted = {min(b, max_tokens) for b in lengths} | {max_tokens}
    return sorted({t + (-(t + n_image_tokens)) % multiple for t in wanted})  # up to the next aligned T
