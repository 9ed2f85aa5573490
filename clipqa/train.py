"""The run function: one training run from a composed config to ``metrics.json`` and ``best.pt``.

``train(cfg, output_dir)`` is what ``train.py`` (the Hydra entry point) calls and what tests call directly. It
reads top to bottom:

1. validate the config (typed boundary), seed, pick the device
2. read the data (COCO-QA or the generated demo), split train/val, find the images
3. load the backbone, build the model, apply the freeze policy, label the answers
4. train: validation every ``trainer.eval_every`` steps and at each epoch end, best weights kept as a copy
5. evaluate the best weights on the full test split (overall + per type) beside the answer-prior baseline
6. write ``metrics.json``, ``config.yaml`` (resolved) and ``best.pt`` (weights + config, loadable without Hydra)
7. log the final metrics and the files to the tracker (MLflow unless ``tracking=none``)
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipqa import metrics as M
from clipqa import resume
from clipqa.checkpoint import FORMAT as CHECKPOINT_FORMAT
from clipqa.config import validate
from clipqa.data import (
    Collator,
    LabelSpace,
    QADataset,
    Split,
    attach_images,
    index_images,
    read_split,
    train_val_split,
)
from clipqa.demo_data import ensure_demo
from clipqa.errors import ClipqaError, Preempted
from clipqa.features import FeatureDataset, ensure_store
from clipqa.model import ClipQA, apply_freeze, build_model, trainable_state
from clipqa.plots import save_curves
from clipqa.pretrained import load_backbone
from clipqa.resume import EpochSampler
from clipqa.tracking import RunInfo, Tracker, make_tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def autocast(device: torch.device, precision: str):
    """Mixed precision context: bf16/fp16 autocast on the device, nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def images_of(splits: list[Split], index: dict[int, Path]) -> tuple[dict[int, Path], dict[int, str]]:
    """Every image the splits use: (image id -> file, image id -> the first question that uses it)."""
    paths, users = {}, {}
    for split in splits:
        for i, image_id in enumerate(split.image_ids):
            if image_id not in paths:
                paths[image_id] = index[image_id]
                users[image_id] = f"question {i + 1} of the {split.name} split"
    return paths, users


def feature_store(cfg: DictConfig, backbone, splits: list[Split], index: dict[int, Path], device: torch.device):
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


def make_loader(ds, collate, batch_size: int, sampler, num_workers: int, pin: bool) -> DataLoader:
    """``sampler``: an :class:`EpochSampler` for training (seeded, resumable order) or None (in order).

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
    )


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(model: ClipQA, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``(B, C)`` for a collated batch of pixels or cached features."""
    return model(
        batch["input_ids"],
        batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        image_features=batch.get("image_features"),
    )


@torch.no_grad()
def evaluate(
    model: ClipQA, loader: DataLoader, device: torch.device, precision: str, split: str
) -> tuple[dict[str, float], dict[int, int]]:
    """``{split}/acc`` (overall + per type) and ``{split}/loss`` over every question of ``loader``.

    Questions the head cannot answer (label -1: a multi-wordpiece answer under head=vocab, an answer unseen in
    training under head=answers) count as wrong and are left out of the loss only. Returns (metrics, predictions)
    with predictions mapping question number in the split -> predicted class id.
    """
    was_training = model.training
    model.eval()
    correct: list[bool] = []
    types: list[int] = []
    preds: dict[int, int] = {}
    loss_sum, loss_n = 0.0, 0
    for batch in tqdm(loader, desc=f"evaluating {split}", leave=False, unit="batch"):
        if batch is None:
            continue
        batch = _to(batch, device)
        with autocast(device, precision):
            logits = forward(model, batch)  # (B, C)
        labels = batch["labels"]
        known = labels >= 0
        if known.any():
            loss_sum += F.cross_entropy(logits[known].float(), labels[known], reduction="sum").item()
            loss_n += int(known.sum())
        pred = logits.argmax(-1)
        correct += (pred == labels).tolist()
        types += batch["types"].tolist()
        preds.update(zip(batch["index"].tolist(), pred.tolist(), strict=True))
    model.train(was_training)
    out = M.accuracy_by_type(correct, types, f"{split}/acc")
    out[f"{split}/loss"] = loss_sum / loss_n if loss_n else float("nan")
    return out, preds


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


def check_writable(folder: Path, what: str) -> None:
    """Fail up front, naming the folder, if it cannot be created or written (permissions, a file in the way,
    a full disk)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".clipqa-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ClipqaError(
            f"Cannot write to {folder}, {what}: {e.strerror or e}. Point it at a writable folder."
        ) from None


@dataclass
class Phase:
    """One stage of training: ``epochs`` at ``lr`` with a freeze policy, optionally with a fresh optimizer."""

    name: str
    epochs: int
    lr: float
    freeze: dict[str, bool]
    fresh_optimizer: bool


def resolve_phases(cfg: DictConfig) -> list[Phase]:
    """``trainer.phases`` (or one phase from trainer.epochs / optimizer.lr / freeze) with inherited values filled in.

    A phase's ``freeze.*`` left null inherits the previous phase's (the first inherits ``freeze``); its learning rate
    is ``lr`` if set, else ``optimizer.lr * lr_scale`` (default scale 1).
    """
    base_freeze = {k: bool(cfg.freeze[k]) for k in ("vision", "text", "mapper")}
    if not cfg.trainer.phases:
        return [Phase("train", cfg.trainer.epochs, cfg.optimizer.lr, base_freeze, True)]
    phases, freeze = [], base_freeze
    for i, p in enumerate(cfg.trainer.phases):
        freeze = {k: (freeze[k] if p.freeze is None or p.freeze[k] is None else bool(p.freeze[k])) for k in freeze}
        lr = p.lr if p.lr is not None else cfg.optimizer.lr * (p.lr_scale if p.lr_scale is not None else 1.0)
        phases.append(Phase(p.name or f"phase{i + 1}", p.epochs, lr, dict(freeze), bool(p.fresh_optimizer)))
    return phases


def load_init(model: ClipQA, path: str) -> set[str]:
    """Warm start (``trainer.init_from``): load the trained weights of an earlier run's best.pt; return their parts."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ClipqaError(f"trainer.init_from={path}: no such file. Pass the best.pt of an earlier run.")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ClipqaError(f"trainer.init_from={path} is not a clipqa checkpoint; pass the best.pt of an earlier run.")
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatch: another mapper width, head, or backbone
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ClipqaError(
            f"trainer.init_from={path} does not fit this model ({first}). Use the same backbone, mapper and head "
            "settings as the run that wrote it."
        ) from None
    if unexpected:
        raise ClipqaError(f"trainer.init_from={path} has weights this model lacks: {unexpected[:3]}.")
    log.info("warm start from %s (its best step %s) <trainer.init_from>", p, ckpt.get("best_step"))
    return {k.split(".", 1)[0] for k in ckpt["state_dict"]}


def train(
    cfg: DictConfig,
    output_dir: str | Path,
    info: RunInfo | None = None,
    on_validation=None,
    tracker: Tracker | None = None,
) -> dict[str, float]:
    """Run one training job; write metrics.json / config.yaml / best.pt into ``output_dir``; return the metrics.

    ``info`` places the run in its Hydra sweep (for tracking: run name, parent run); ``train.py`` passes it.
    ``on_validation(val_acc, step)`` is called after every validation (Optuna pruning raises TrialPruned there).
    ``tracker`` replaces the one ``tracking.*`` would make (benchmarks/throughput.py records step timings with it).
    The tracked run ends FINISHED, FAILED (with the error message as tag ``error``) or KILLED (Ctrl-C, or a
    pruned trial, tagged ``clipqa.pruned``).
    """
    cfg = validate(cfg)
    out = Path(output_dir)
    check_writable(out, "the run folder (hydra.run.dir / hydra.sweep.dir)")
    if cfg.data.synthetic is not None or cfg.backbone.tiny is not None:
        check_writable(Path(cfg.paths.cache_dir).expanduser(), "paths.cache_dir (or $CLIPQA_CACHE_DIR)")
    info = info or RunInfo()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    state = None
    if cfg.trainer.resume == "auto":
        if (finished := finished_metrics(out, resolved)) is not None:
            log.info("%s already holds this run's results; not training again <trainer.resume=auto>", out)
            return finished
        state = resume.latest(out, resolved)
    # A run folder remembers its MLflow run: a restart continues it (no duplicate runs), checkpoint or not.
    id_file = out / "mlflow_run_id.txt"
    previous_id = state["mlflow_run_id"] if state else None
    if previous_id is None and cfg.trainer.resume == "auto" and id_file.is_file():
        previous_id = id_file.read_text().strip() or None
    if tracker is None:
        tracker = make_tracker(cfg, info, run_id=previous_id)
    if tracker.run_id:
        id_file.write_text(tracker.run_id)
    previous = _install_sigterm_handler()
    try:
        results = _run(cfg, out, tracker, info, on_validation, state)
    except Preempted as e:
        tracker.set_tags({"clipqa.resumable": "true"})
        tracker.finish("KILLED", error=str(e), run_dir=out)
        raise
    except KeyboardInterrupt:
        tracker.finish("KILLED", error="interrupted (KeyboardInterrupt)", run_dir=out)
        raise
    except BaseException as e:
        if type(e).__name__ == "TrialPruned":  # optuna's, without importing optuna here
            tracker.set_tags({"clipqa.pruned": "true"})
            tracker.finish("KILLED", error=f"pruned by Optuna: {e}", run_dir=out)
        else:
            tracker.finish("FAILED", error=f"{type(e).__name__}: {e}", run_dir=out)
        raise
    finally:
        _restore_sigterm_handler(previous)
    tracker.finish("FINISHED", run_dir=out)
    (out / DONE_MARKER).write_text("finished\n")  # last of all: a re-run of this folder skips the run
    return results


DONE_MARKER = ".clipqa_done"  # written after every file and every MLflow write of a finished run


_stop = {"requested": False}


def stop_requested() -> bool:
    return _stop["requested"]


def _install_sigterm_handler():
    import signal
    import threading

    _stop["requested"] = False
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        _stop["requested"] = True

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm_handler(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def finished_metrics(out: Path, resolved: dict) -> dict | None:
    """The metrics of a finished run of the same config in ``out`` (re-running a sweep skips finished jobs)."""
    if not ((out / DONE_MARKER).is_file() and (out / "metrics.json").is_file() and (out / "config.yaml").is_file()):
        return None
    import yaml

    done_cfg = yaml.safe_load((out / "config.yaml").read_text())
    if resume._comparable(done_cfg) != resume._comparable(resolved):
        return None
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


def _run(
    cfg: DictConfig, out: Path, tracker: Tracker, info: RunInfo, on_validation=None, state: dict | None = None
) -> dict[str, float]:
    # 1. seed, device ----------------------------------------------------------------------------------------------
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize in DataLoader workers instead
    t = cfg.trainer
    resolved = OmegaConf.to_container(cfg, resolve=True)
    seed_everything(t.seed)
    device = pick_device(t.device)
    precision = resolve_precision(t.precision, device)
    log.info(
        "device %s <trainer.device=%s>, precision %s <trainer.precision=%s>", device, t.device, precision, t.precision
    )
    if device.type == "cpu" and keep_freed_memory():
        log.debug("glibc malloc keeps freed memory (no page faults for per-step tensors over 32 MiB)")

    # 2. data ------------------------------------------------------------------------------------------------------
    train_split, val_split, test_split, index = load_data(cfg)
    prior = M.answer_prior(train_split.answers, train_split.types)  # before any head-specific drop

    # 3. backbone, labels, model -----------------------------------------------------------------------------------
    backbone = load_backbone(cfg.backbone, cfg.paths.cache_dir, train_split.questions + train_split.answers)
    labels = LabelSpace.build(cfg.head.kind, backbone.tokenizer, train_split.answers)
    y_train = labels.labels(train_split.answers)
    dropped = [i for i, y in enumerate(y_train) if y < 0]
    if dropped:
        examples = sorted({train_split.answers[i] for i in dropped})[:5]
        log.warning(
            "dropped %d of %d training questions whose answer is not one wordpiece (e.g. %s) <head.kind=%s>",
            len(dropped),
            len(train_split),
            ", ".join(examples),
            cfg.head.kind,
        )
        keep = [i for i, y in enumerate(y_train) if y >= 0]
        train_split, y_train = train_split.subset(keep), [y_train[i] for i in keep]
    if len(train_split) == 0:
        raise ClipqaError(f"No trainable questions left (head.kind={cfg.head.kind}). Try head=answers.")
    max_tokens = cfg.backbone.image_position_offset  # question positions must stay below the image positions
    all_questions = train_split.questions + val_split.questions + test_split.questions
    n_long = sum(len(ids) > max_tokens for ids in backbone.tokenizer(all_questions)["input_ids"])
    if n_long:
        log.warning(
            "%d questions are longer than %d tokens and are truncated <backbone.image_position_offset>",
            n_long,
            max_tokens,
        )

    model = build_model(cfg, backbone, len(labels)).to(device)
    if t.compile:
        model.compile_text()
    trained_parts: set[str] = {"head"}  # every part that any phase trains (what best.pt must hold)
    if t.init_from:
        trained_parts |= load_init(model, t.init_from)

    # The frozen-feature cache: used when no phase trains the vision tower (then CLIP runs once per image, ever).
    phases = resolve_phases(cfg)
    store = None
    if cfg.features.cache and all(p.freeze["vision"] for p in phases):
        store = feature_store(cfg, backbone, [train_split, val_split, test_split], index, device)
    elif cfg.features.cache:
        log.info("feature cache bypassed: a phase trains the vision tower <freeze.vision / trainer.phases>")

    collate = Collator(backbone.tokenizer, max_tokens)
    pin = device.type == "cuda"
    # Worker processes pay off while they decode JPEGs; a cached row is one ~microsecond read, and workers would only
    # compete with the training threads for the cores (measured: a few % slower on 2 CPU cores, and a ~1 s start).
    workers = t.num_workers if t.num_workers is not None else (0 if store is not None else 2)
    log.info("data loading: %d worker processes <trainer.num_workers=%s>", workers, t.num_workers)
    policy = cfg.data.on_bad_image

    def loader(split: Split, y: list[int], sampler, bs: int) -> DataLoader:
        if store is not None:
            ds = FeatureDataset(split, y, store)
        else:
            ds = QADataset(split, y, index, backbone.image_processor, policy)
        return make_loader(ds, collate, bs, sampler, workers, pin)

    sampler = EpochSampler(len(train_split), t.seed)
    train_loader = loader(train_split, y_train, sampler, t.batch_size)
    batches_per_epoch = math.ceil(len(train_split) / t.batch_size)
    val_loader = loader(val_split, labels.labels(val_split.answers), None, t.eval_batch_size)
    test_loader = loader(test_split, labels.labels(test_split.answers), None, t.eval_batch_size)
    prior_correct = [prior.get(q, None) == a for q, a in zip(test_split.types, test_split.answers, strict=True)]
    prior_metrics = M.accuracy_by_type(prior_correct, test_split.types, M.TEST_PRIOR_ACC)

    # 4. train, phase by phase (one phase unless trainer.phases is set) ---------------------------------------------
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    history: list[dict] = []
    phase_metrics: dict[str, float] = {}
    step, seen = 0, 0
    step_seconds, seen_here = 0.0, 0  # time in training steps (data wait included, validation excluded)
    optimizer: torch.optim.Optimizer | None = None

    def validate_now(step: int, best: dict) -> None:
        """Validate; keep a copy of the weights if they are the phase's best; let a sweeper prune the run."""
        val, _ = evaluate(model, val_loader, device, precision, "val")
        history.append({"step": step, **val})
        tracker.log_metrics(val, step)
        log.info("step %d: val/acc %.4f val/loss %.4f", step, val[M.VAL_ACC], val[M.VAL_LOSS])
        if val[M.VAL_ACC] > best["acc"]:  # a copy of the weights, not a reference
            best.update(acc=val[M.VAL_ACC], step=step, state=trainable_state(model, trained_parts))
        if on_validation is not None:
            on_validation(val[M.VAL_ACC], step)  # e.g. Optuna pruning: may raise optuna.TrialPruned

    params_by_name = dict(model.named_parameters())
    names_by_id = {id(p): n for n, p in params_by_name.items()}
    start_phase, start_epoch, start_batch = 0, 0, 0
    if state is not None:  # resume: weights, counters, history and RNG exactly as they were at the checkpoint
        model.load_state_dict(state["model"], strict=False)
        trained_parts |= set(state["trained_parts"])
        history[:] = state["history"]
        phase_metrics.update(state["phase_metrics"])
        step, seen = state["step"], state["seen"]
        start_phase, start_epoch, start_batch = state["phase"], state["epoch"], state["batch"]
        torch.set_rng_state(state["rng"])

    def checkpoint(p_idx: int, epoch: int, batch: int, best: dict, phase_start: int) -> None:
        """Save everything needed to continue after (phase p_idx, epoch, batch batches done)."""
        resume.save(
            out,
            {
                "config": resolved,
                "step": step,
                "seen": seen,
                "phase": p_idx,
                "epoch": epoch,
                "batch": batch,
                "phase_start": phase_start,
                "model": trainable_state(model, trained_parts),
                "trained_parts": sorted(trained_parts),
                "history": history,
                "phase_metrics": phase_metrics,
                "optimizer": optimizer.state_dict() if optimizer else None,
                "optimizer_groups": [[names_by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]
                if optimizer
                else None,
                "scaler": scaler.state_dict(),
                "best": best,
                "rng": torch.get_rng_state(),
                "mlflow_run_id": tracker.run_id,
            },
            t.keep_checkpoints,
        )

    for p_idx, phase in enumerate(phases):
        if p_idx < start_phase:
            trained_parts |= {n for n in ("vision", "text", "mapper") if not phase.freeze[n]}
            continue
        resuming = state is not None and p_idx == start_phase
        counts = apply_freeze(model, **phase.freeze)
        trained_parts |= {n for n in ("vision", "text", "mapper") if not phase.freeze[n]}
        if p_idx == 0 and not resuming:
            tracker.log_params(counts)
        log.info(
            "phase %s: %d epoch(s) at lr %g, %s trainable parameters <trainer.phases[%d]>",
            phase.name,
            phase.epochs,
            phase.lr,
            f"{counts['params/trainable']:,}",
            p_idx,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        if resuming and state["optimizer"] is not None:  # rebuild the same parameter groups, then its state
            groups = [[params_by_name[n] for n in g] for g in state["optimizer_groups"]]
            optimizer = build_optimizer(cfg.optimizer, groups[0], lr=phase.lr)
            for g in groups[1:]:
                optimizer.add_param_group({"params": g})
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        elif optimizer is None or phase.fresh_optimizer:
            optimizer = build_optimizer(cfg.optimizer, trainable, lr=phase.lr)
        else:  # keep the optimizer state; newly unfrozen parameters join as a new group
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            new = [p for p in trainable if id(p) not in known]
            if new:
                optimizer.add_param_group({"params": new})
            for g in optimizer.param_groups:
                g["lr"] = phase.lr
        phase_steps = phase.epochs * batches_per_epoch
        if t.max_steps is not None:
            phase_steps = min(phase_steps, t.max_steps)
        if resuming:
            start, best = state["phase_start"], state["best"]
        else:
            start, best = step, {"acc": -1.0, "step": step, "state": trainable_state(model, trained_parts)}

        model.train()
        bar = tqdm(total=phase_steps, initial=step - start, desc="training", unit="step")
        for epoch in range(start_epoch if resuming else 0, phase.epochs):
            first = start_batch if resuming and epoch == start_epoch else 0
            if step - start >= phase_steps:
                break
            if first < batches_per_epoch:
                bar.set_description(f"{phase.name} epoch {epoch + 1}/{phase.epochs}")
                sampler.epoch = sum(p.epochs for p in phases[:p_idx]) + epoch  # a new order every epoch
                sampler.start = first * t.batch_size
                done = first
                tick = time.perf_counter()
                for batch in train_loader:
                    done += 1
                    if batch is None:
                        continue
                    batch = _to(batch, device)
                    with autocast(device, precision):
                        logits = forward(model, batch)  # (B, C)
                        loss = F.cross_entropy(logits.float(), batch["labels"])
                    if not torch.isfinite(loss):
                        raise ClipqaError(
                            f"Non-finite loss {loss.item()} at step {step} (phase {phase.name}, epoch {epoch}, lr "
                            f"{phase.lr:g}). Lower optimizer.lr or use trainer.precision=fp32."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                    seen += batch["labels"].shape[0]
                    seen_here += batch["labels"].shape[0]
                    bar.update(1)
                    if step % t.log_every == 0 or step == start + 1:
                        loss_value = loss.item()
                    step_seconds += time.perf_counter() - tick
                    if step % t.log_every == 0 or step == start + 1:
                        rate = seen_here / step_seconds
                        bar.set_postfix(loss=f"{loss_value:.3f}", ex_s=f"{rate:.1f}")
                        row = {
                            M.TRAIN_LOSS: loss_value,
                            "train/examples_per_s": rate,
                            "train/lr": optimizer.param_groups[0]["lr"],
                            "epoch": epoch,
                            "phase": p_idx,
                        }
                        history.append({"step": step, **{k: v for k, v in row.items() if k != "train/examples_per_s"}})
                        tracker.log_metrics(row, step)
                    if (step - start) % t.eval_every == 0 and step - start < phase_steps:
                        validate_now(step, best)
                    last_of_epoch = done >= batches_per_epoch or step - start >= phase_steps
                    if not last_of_epoch and (step % t.checkpoint_every == 0 or stop_requested()):
                        checkpoint(p_idx, epoch, done, best, start)
                        if stop_requested():
                            raise Preempted(f"stopped by SIGTERM at step {step}; re-run the same command to resume")
                    if step - start >= phase_steps:
                        break
                    tick = time.perf_counter()
                if (step - start) % t.eval_every != 0 or step - start >= phase_steps:  # epoch end, unless just done
                    validate_now(step, best)
                checkpoint(p_idx, epoch, batches_per_epoch, best, start)
                if stop_requested():
                    raise Preempted(f"stopped by SIGTERM at step {step}; re-run the same command to resume")
        bar.close()

        # 5. test this phase's best weights on the full test split (the next phase starts from them) ---------------
        model.load_state_dict(best["state"], strict=False)
        test, test_preds = evaluate(model, test_loader, device, precision, "test")
        if len(phases) > 1:
            per_phase = {f"phase/{phase.name}/{k}": v for k, v in {**test, M.VAL_ACC: best["acc"]}.items()}
            phase_metrics.update(per_phase)
            tracker.log_metrics(per_phase, step)
            log.info("phase %s: test/acc %.4f, val/acc %.4f", phase.name, test[M.TEST_ACC], best["acc"])
        if p_idx + 1 < len(phases):
            checkpoint(p_idx + 1, 0, 0, best, step)

    results: dict[str, float] = {
        **test,
        M.VAL_ACC: best["acc"],
        **prior_metrics,
        **phase_metrics,
        "best_step": best["step"],
        "steps": step,
        "epochs": sum(p.epochs for p in phases),
        "train/seconds": step_seconds,  # in training steps, this process (validation and test excluded)
        "train/examples_per_s": seen_here / step_seconds if step_seconds else float("nan"),
        "data/n_train": len(train_split),
        "data/n_val": len(val_split),
        "data/n_test": len(test_split),
        "data/n_test_evaluated": len(test_preds),  # fewer only if data.on_bad_image=skip dropped unreadable images
        "data/n_train_dropped": len(dropped),
        **counts,
    }
    log.info(
        "test/acc %.4f (prior %.4f), val/acc %.4f at step %d",
        results[M.TEST_ACC],
        results[M.TEST_PRIOR_ACC],
        results[M.VAL_ACC],
        best["step"],
    )

    # 6. files ----------------------------------------------------------------------------------------------------
    (out / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    with open(out / "history.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    (out / "metrics.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    write_predictions(out / "test_predictions.tsv", test_split, test_preds, labels.classes)
    curves = save_curves(history, out)
    if t.save_checkpoint:
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "config": resolved,
            "state_dict": best["state"],
            "frozen": sorted({"vision", "text", "mapper"} - trained_parts),
            "label_kind": labels.kind,
            "classes": labels.classes,
            "vision_source": backbone.vision_source,
            "text_source": backbone.text_source,
            "best_step": best["step"],
            "metrics": _json_safe(results),
        }
        torch.save(ckpt, out / "best.pt.tmp")
        os.replace(out / "best.pt.tmp", out / "best.pt")

    # 7. tracking: final metrics (same names as metrics.json) and artifacts ----------------------------------------
    tracker.log_metrics(results, step)
    for f in [out / "config.yaml", out / "metrics.json", out / "test_predictions.tsv", *curves]:
        tracker.log_artifact(f)
    if (out / ".hydra" / "overrides.yaml").is_file():
        tracker.log_artifact(out / ".hydra" / "overrides.yaml", "hydra")
    log_ckpt = cfg.tracking.log_checkpoint
    if (not info.multirun if log_ckpt is None else log_ckpt) and (out / "best.pt").is_file():
        tracker.log_artifact(out / "best.pt", "checkpoint")
    return results


def write_predictions(path: Path, split: Split, preds: dict[int, int], classes: list[str]) -> None:
    """One row per test question (for error analysis); questions skipped for unreadable images are absent."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("image_id\ttype\tquestion\tanswer\tprediction\tcorrect\n")
        for i, pred in sorted(preds.items()):
            answer, guess, qtype = split.answers[i], classes[pred], M.TYPE_NAMES[split.types[i]]
            f.write(f"{split.image_ids[i]}\t{qtype}\t{split.questions[i]}\t{answer}\t{guess}\t{int(answer == guess)}\n")


def _json_safe(d: dict) -> dict:
    """NaN (a question type absent from a split) becomes null; everything else stays a number."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
