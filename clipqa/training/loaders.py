"""The run's data: the splits with their images, the head's labels, the feature cache, and the DataLoaders (cached
features when no phase trains the vision tower, else images decoded in worker processes)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from clipqa.data.cocoqa import (
    Collator,
    EpochSampler,
    LabelSpace,
    QADataset,
    Split,
    attach_images,
    index_images,
    read_split,
    train_val_split,
    worker_context,
)
from clipqa.data.demo import ensure_demo
from clipqa.errors import ClipqaError
from clipqa.models.backbones import Backbone, n_image_tokens
from clipqa.models.feature_cache import FeatureDataset, FeatureStore, ensure_store
from clipqa.models.image_tokens import n_selected
from clipqa.training.device import GRAPH_MODES, resolve_compile
from clipqa.training.schedule import Phase

log = logging.getLogger(__name__)


def load_data(cfg: DictConfig) -> tuple[Split, Split, Split, dict[int, Path]]:
    """Train/val/test splits with images attached, and the image index. Generates the demo data if configured."""
    d = cfg.data
    if d.synthetic is not None:
        s = d.synthetic
        root = ensure_demo(cfg.paths.cache_dir, s.n_train, s.n_test, s.seed, s.image_size)
        data_root, image_root = root, root / "images"
        log.info("demo dataset (COCO-QA layout) in %s <data.synthetic>", root)
    else:
        data_root, image_root = Path(d.root), Path(d.image_root)
    full_train, test = read_split(data_root, "train"), read_split(data_root, "test")
    index = index_images(image_root)
    full_train = attach_images(full_train, index, image_root, d.on_bad_image)
    test = attach_images(test, index, image_root, d.on_bad_image)
    train, val = train_val_split(full_train, d.val_fraction, d.split_seed)
    log.info(
        "questions: train %d, val %d, test %d <data.val_fraction=%s>", len(train), len(val), len(test), d.val_fraction
    )
    return train, val, test, index


def build_labels(cfg: DictConfig, backbone: Backbone, train: Split) -> tuple[LabelSpace, Split, list[int], int]:
    """The head's label space; the training questions it can learn (others dropped and logged), their labels, and
    how many were dropped. Warns about questions too long for the question slot."""
    labels = LabelSpace.build(cfg.head.kind, backbone.tokenizer, train.answers)
    y_train = labels.labels(train.answers)
    dropped = [i for i, y in enumerate(y_train) if y < 0]
    if dropped:
        examples = sorted({train.answers[i] for i in dropped})[:5]
        log.warning(
            "dropped %d of %d training questions whose answer is not one wordpiece (e.g. %s) <head.kind=%s>",
            len(dropped),
            len(train),
            ", ".join(examples),
            cfg.head.kind,
        )
        keep = [i for i, y in enumerate(y_train) if y >= 0]
        train, y_train = train.subset(keep), [y_train[i] for i in keep]
    if len(train) == 0:
        raise ClipqaError(f"No trainable questions left (head.kind={cfg.head.kind}). Try head=answers.")
    return labels, train, y_train, len(dropped)


def warn_long_questions(splits: list[Split], tokenizer, max_tokens: int) -> None:
    questions = [q for s in splits for q in s.questions]
    n_long = sum(len(ids) > max_tokens for ids in tokenizer(questions)["input_ids"])
    if n_long:
        log.warning(
            "%d questions are longer than %d tokens and are truncated <backbone.image_position_offset>",
            n_long,
            max_tokens,
        )


def images_of(splits: list[Split], index: dict[int, Path]) -> tuple[dict[int, Path], dict[int, str]]:
    """Every image the splits use: (image id -> file, image id -> the first question that uses it)."""
    paths, users = {}, {}
    for split in splits:
        for i, image_id in enumerate(split.image_ids):
            if image_id not in paths:
                paths[image_id] = index[image_id]
                users[image_id] = f"question {i + 1} of the {split.name} split"
    return paths, users


def feature_store(
    cfg: DictConfig, backbone: Backbone, splits: list[Split], index: dict[int, Path], device: torch.device
) -> FeatureStore:
    """The feature cache holding every image of ``splits``, built now if no run has built it yet."""
    paths, users = images_of(splits, index)
    f = cfg.features
    return ensure_store(
        vision=backbone.vision,
        processor=backbone.image_processor,
        paths=paths,
        users=users,
        select=cfg.image_tokens.select,
        k=cfg.image_tokens.k,
        dtype=f.dtype,
        folder=f.dir,
        device=device,
        batch_size=f.batch_size,
        num_workers=f.num_workers,
        on_bad_image=cfg.data.on_bad_image,
    )


def make_loader(ds, collate, batch_size: int, sampler, num_workers: int, pin: bool, device=None) -> DataLoader:
    """``sampler``: an :class:`clipqa.data.cocoqa.EpochSampler` for training (seeded, resumable order) or None (in
    order). ``device``: the run's; on a GPU, workers start from a forkserver (clipqa.data.cocoqa.worker_context).

    The loader gets its own generator so that starting an iterator never draws from the global torch RNG (which
    dropout uses): a resumed run then draws exactly the random numbers an uninterrupted one does.
    """
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context(num_workers, device),  # never loky's (joblib), never fork on a GPU
    )


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    sampler: EpochSampler  # the training order; the loop sets its epoch and start position
    batches_per_epoch: int


def build_loaders(
    cfg: DictConfig,
    backbone: Backbone,
    splits: list[Split],
    y_train: list[int],
    labels: LabelSpace,
    index: dict[int, Path],
    device: torch.device,
    phases: list[Phase],
) -> Loaders:
    """Loaders over ``splits`` (train, val, test): cached features when no phase trains the vision tower, else
    images decoded and pre-processed in DataLoader workers."""
    t, (train, val, test) = cfg.trainer, splits
    store = cached_store(cfg, backbone, splits, index, device, phases)
    # Worker processes pay off while they decode JPEGs; a cached row is one ~microsecond read, and workers would only
    # compete with the training threads for the cores (measured: a few % slower on 2 CPU cores, and a ~1 s start).
    workers = t.num_workers if t.num_workers is not None else (0 if store is not None else 2)
    log.info("data loading: %d worker processes <trainer.num_workers=%s>", workers, t.num_workers)
    pin = device.type == "cuda"
    # CUDA graphs record one graph per shape (B, T): questions padded to a few bucket lengths instead of each batch's
    # longest, T + N aligned for the attention kernels, and short training batches padded to the batch size
    graphs = resolve_compile(t.compile, device) in GRAPH_MODES
    buckets = list(t.length_buckets) if graphs else None
    n_image = n_selected(n_image_tokens(backbone.vision), cfg.image_tokens.select, cfg.image_tokens.k)
    sampler = EpochSampler(len(train), t.seed)
    loader = partial(split_loader, cfg, backbone, store, index, workers=workers, pin=pin, buckets=buckets)
    loader = partial(loader, image_tokens=n_image, device=device)
    return Loaders(
        train=loader(train, y_train, t.batch_size, sampler, pad_to=t.batch_size if graphs else None),
        val=loader(val, labels.labels(val.answers), t.eval_batch_size, None),
        test=loader(test, labels.labels(test.answers), t.eval_batch_size, None),
        sampler=sampler,
        batches_per_epoch=math.ceil(len(train) / t.batch_size),
    )


def cached_store(cfg, backbone: Backbone, splits: list[Split], index, device, phases: list[Phase]):
    """The feature cache over ``splits`` when no phase trains the vision tower (then CLIP runs once per image, ever);
    None when the config turns it off or a phase trains the tower."""
    if cfg.features.cache and all(p.freeze["vision"] for p in phases):
        return feature_store(cfg, backbone, splits, index, device)
    if cfg.features.cache:
        log.info("feature cache bypassed: a phase trains the vision tower <freeze.vision / trainer.phases>")
    return None


def split_loader(
    cfg,
    backbone: Backbone,
    store,
    index,
    split: Split,
    y: list[int],
    batch_size: int,
    sampler,
    workers: int,
    pin: bool,
    buckets: list[int] | None = None,
    image_tokens: int | None = None,
    device: torch.device | None = None,
    pad_to: int | None = None,
) -> DataLoader:
    """A loader over one split: rows of the feature ``store`` when there is one, else decoded images. ``pin``: batches
    in page-locked memory (the main process stacks them there itself; workers leave it to the DataLoader).
    ``buckets``, ``image_tokens``, ``pad_to``: the fixed shapes of CUDA graphs (:class:`~clipqa.data.cocoqa.Collator`).
    """
    if store is not None:
        ds = FeatureDataset(split, y, store)
    else:
        ds = QADataset(split, y, index, backbone.image_processor, cfg.data.on_bad_image)
    max_tokens = cfg.backbone.image_position_offset  # questions stay below the image positions
    collate = Collator(backbone.tokenizer, max_tokens, buckets, pin and workers == 0, pad_to, image_tokens)
    return make_loader(ds, collate, batch_size, sampler, workers, pin, device)
