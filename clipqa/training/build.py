"""Set-up: explicit builders for what one run is made of (device, data, labels, model, feature cache, loaders,
optimizer). ``clipqa.training.run`` calls them in order; ``clipqa.training.checkpoint`` rebuilds a trained model with
them."""

from __future__ import annotations

import ctypes
import logging
import math
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
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
from clipqa.models.backbones import Backbone
from clipqa.models.cpu_kernels import use_cpu_kernels, use_plain_linears
from clipqa.models.feature_cache import FeatureDataset, FeatureStore, ensure_store
from clipqa.models.model import ClipQA
from clipqa.training.gpu_leases import lease_folder, lease_gpu, visible_gpus
from clipqa.training.schedule import Phase

log = logging.getLogger(__name__)

FEATURE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


# ---- device ---------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def claim_device(name: str, cache_dir: str, gpu_lease: bool, holder: str, stop=None) -> Iterator[torch.device]:
    """The run's device, held for the ``with`` block: ``auto``/``cuda`` with several GPUs visible lease one
    (:mod:`clipqa.training.gpu_leases`), so concurrent jobs on one machine each train on a GPU of their own;
    ``cuda:K`` pins.
    With one GPU visible (one GPU, or SLURM's binding) there is nothing to choose: no lease, as before."""
    gpus = visible_gpus()
    if name not in ("auto", "cuda") or len(gpus) < 2 or not gpu_lease:
        yield pick_device(name)
        return
    with lease_gpu(lease_folder(cache_dir), gpus, holder, stop) as index:
        if torch.cuda.is_available():
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)  # kernels and caches that use "cuda" (the current device) follow it
        else:  # CLIPQA_FAKE_GPU_COUNT on a machine without CUDA: the lease is real, the training runs on the CPU
            device = torch.device("cpu")
        log.info("leased GPU %d of %d <trainer.gpu_lease=true>, training on %s", index, len(gpus), device)
        yield device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ClipqaError(f"trainer.device={name} but no CUDA GPU is visible. Use trainer.device=auto or cpu.")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA (tensor cores), fp32 elsewhere (CPUs without bf16 units are slower in it)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs: static shapes


def resolve_compile(name: str, device: torch.device) -> str | None:
    """``trainer.compile`` -> a torch.compile mode, or None (eager). ``auto``: CUDA graphs (``reduce-overhead``) on
    CUDA, where a batch-8 step is otherwise mostly kernel-launch overhead; eager on CPU (compiling costs minutes
    there and gains nothing measurable). ``true``/``false`` (the key's old values) mean ``default``/``off``."""
    name = name.lower()
    if name == "auto":
        return "reduce-overhead" if device.type == "cuda" else None
    return {"off": None, "false": None, "true": "default"}.get(name, name)


def compile_model(model: ClipQA, name: str, device: torch.device) -> None:
    """Apply ``trainer.compile`` to a built model (its text path, :meth:`ClipQA.compile_text`)."""
    if (mode := resolve_compile(name, device)) is not None:
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()  # a new run's model: earlier runs' graphs in this process must not count to its limit
        # Dropout draws from torch's own generator, as in eager mode: a compiled run trains exactly the eager run's
        # model (tested) and resumes from a checkpoint's RNG state; inductor's own RNG would draw other masks.
        inductor_config.fallback_random = True
        use_plain_linears(model.text)  # the compiled text path gets nn.Linear (no CPU thread-count branches)
        model.compile_text(mode, static=mode in GRAPH_MODES)
        log.info("torch.compile mode %s%s <trainer.compile=%s>", mode, ", static shapes" * (mode in GRAPH_MODES), name)


def keep_freed_memory() -> bool:
    """CPU training: make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Why: glibc serves every allocation above ~32 MiB with a fresh ``mmap`` and unmaps it on ``free``, so a large
    tensor made anew every step (under ``head.kind=vocab`` the head's weight gradient is 30,522 x 768 fp32 = 94 MB)
    is page-faulted and zeroed by the kernel again every step: about 45 ms of a ~400 ms CLS-only step on two cores
    (benchmarks/throughput.py). PyTorch's CPU performance guide swaps in jemalloc or tcmalloc for this; two
    ``mallopt`` calls do the same job in-process, with no extra dependency or ``LD_PRELOAD``. Cost: the process keeps
    its peak heap (RSS does not shrink after a peak), as torch's caching allocator does on a GPU. Process-wide and
    idempotent. Returns False (and changes nothing) where the C library has no ``mallopt`` (macOS, Windows, musl).
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    one_gib = 1 << 30  # tensors up to 1 GiB come from the reusable heap; freed heap up to 1 GiB is kept
    return bool(mallopt(m_mmap_threshold, one_gib)) and bool(mallopt(m_trim_threshold, one_gib))


# ---- data -----------------------------------------------------------------------------------------------------
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


def make_loader(ds, collate, batch_size: int, sampler, num_workers: int, pin: bool) -> DataLoader:
    """``sampler``: an :class:`clipqa.data.cocoqa.EpochSampler` for training (seeded, resumable order) or None (in
    order).

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
        multiprocessing_context=worker_context(num_workers),  # joblib launcher: loky's context cannot start them
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
    # CUDA graphs record one graph per shape: questions padded to a few bucket lengths instead of each batch's longest
    buckets = list(t.length_buckets) if resolve_compile(t.compile, device) in GRAPH_MODES else None
    sampler = EpochSampler(len(train), t.seed)
    loader = partial(split_loader, cfg, backbone, store, index, workers=workers, pin=pin, buckets=buckets)
    return Loaders(
        train=loader(train, y_train, t.batch_size, sampler),
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
) -> DataLoader:
    """A loader over one split: rows of the feature ``store`` when there is one, else decoded images. ``pin``: batches
    in page-locked memory (the main process stacks them there itself; workers leave it to the DataLoader)."""
    if store is not None:
        ds = FeatureDataset(split, y, store)
    else:
        ds = QADataset(split, y, index, backbone.image_processor, cfg.data.on_bad_image)
    max_tokens = cfg.backbone.image_position_offset  # questions stay below the image positions
    collate = Collator(backbone.tokenizer, max_tokens, buckets, pin_memory=pin and workers == 0)
    return make_loader(ds, collate, batch_size, sampler, workers, pin)


# ---- model and optimizer ----------------------------------------------------------------------------------------
def build_mapper(mcfg: DictConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The mapper is a swap point: ``mapper._target_`` names its class (default clipqa.models.model.MLPMapper)."""
    try:
        return instantiate(mcfg, in_dim, out_dim)
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ClipqaError):
            raise cause from None
        raise ClipqaError(f"Cannot build the mapper from mapper._target_={mcfg._target_}: {e}") from None


def build_model(cfg: DictConfig, backbone: Backbone, n_classes: int, cpu_kernels: bool = True) -> ClipQA:
    """Assemble the model; the new layers (mapper, head) are initialised from the caller's seeded RNG state.

    ``cpu_kernels``: swap in :mod:`clipqa.models.cpu_kernels`' thin-product forms (same numbers; they fall back to the
    ordinary product on a GPU). Nothing is frozen here: :func:`clipqa.models.freeze.apply_freeze` decides what trains.
    """
    v_dim, t_dim = backbone.vision.config.hidden_size, backbone.text.config.dim
    mapper = build_mapper(cfg.mapper, v_dim, t_dim)
    # head.bias: the paper's head has none; a best.pt written before the key existed had a bias (hence the default).
    head = nn.Linear(t_dim, n_classes, bias=cfg.head.get("bias", True))
    model = ClipQA(
        backbone.vision,
        mapper,
        backbone.text,
        head,
        image_position_offset=cfg.backbone.image_position_offset,
        readout=cfg.head.readout,
        image_tokens=(cfg.image_tokens.select, cfg.image_tokens.k),
        feature_dtype=FEATURE_DTYPES[cfg.features.dtype],
    )
    if cpu_kernels:
        use_cpu_kernels(model)
    return model


def build_optimizer(ocfg: DictConfig, params, lr: float | None = None) -> torch.optim.Optimizer:
    """``optimizer._target_`` is the swap point (torch.optim.Adam / AdamW / SGD); None-valued kwargs are not passed.

    ``lr`` overrides ``optimizer.lr`` (a training phase's learning rate). ``optimizer.fused=null`` picks torch's
    fused kernel (one kernel for all parameters instead of a loop over tensors) for Adam/AdamW on CUDA and CPU.
    """
    kwargs = {k: v for k, v in OmegaConf.to_container(ocfg, resolve=True).items() if k != "_target_" and v is not None}
    if lr is not None:
        kwargs["lr"] = lr
    params = list(params)
    if ocfg.get("fused") is None and ocfg._target_ in ("torch.optim.Adam", "torch.optim.AdamW"):
        first = params[0]["params"][0] if params and isinstance(params[0], dict) else (params[0] if params else None)
        kwargs["fused"] = first is not None and first.device.type in ("cuda", "cpu")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        return get_class(ocfg._target_)(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise ClipqaError(
            f"Cannot build optimizer {ocfg._target_} with {kwargs}: {e}. Check the optimizer.* keys."
        ) from None
