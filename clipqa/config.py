"""The typed boundary: dataclasses that own the *types* of every config key (the YAML files own the values).

``validate(cfg)`` merges the composed Hydra config into these schemas, so ``optimizer.lr=abc``, a misspelt key in
a YAML file, or ``mapper.num_layers=-1`` fails at start-up with the key named, before any data or model is loaded.
There are deliberately no default values here (``MISSING`` everywhere): a second set of defaults would drift from
the YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from clipqa.errors import ClipqaError


@dataclass
class PathsConfig:
    cache_dir: str = MISSING  # demo data, tiny backbones; `~` is expanded
    wordnet: str | None = MISSING  # a WordNet 3.0 folder for WUPS; None: nltk's data folders, then Debian's


@dataclass
class SyntheticConfig:
    """The embedded demo: a synthetic dataset in the COCO-QA layout, generated on first use."""

    n_train: int = MISSING
    n_test: int = MISSING
    seed: int = MISSING
    image_size: int = MISSING  # pixels, square JPEGs


@dataclass
class DataConfig:
    root: str | None = MISSING  # COCO-QA archive folder: train/ and test/
    image_root: str | None = MISSING  # folder holding train2014/ and val2014/
    val_fraction: float = MISSING  # of train, seeded by split_seed
    split_seed: int = MISSING
    on_bad_image: str = MISSING  # error | skip
    synthetic: SyntheticConfig | None = MISSING  # set: generate the demo dataset instead of reading root


@dataclass
class TinyPretrainConfig:
    """backbone=tiny_pretrained: the tiny models' pretraining before first use (clipqa/models/tiny_pretrain.py)."""

    seed: int = MISSING  # the pretraining world's scenes and pictures (not the demo data's seed)
    documents: int = MISSING  # text documents (a caption + questions with answers) for masked-LM
    pictures: int = MISSING  # rendered pictures for the vision tower
    text_steps: int = MISSING
    vision_steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING


@dataclass
class TinyBackboneConfig:
    """Small CLIP vision + DistilBERT from configs (random or pretrained), saved and re-loaded by from_pretrained."""

    image_size: int = MISSING
    patch_size: int = MISSING
    vision_dim: int = MISSING
    vision_layers: int = MISSING
    text_dim: int = MISSING
    text_layers: int = MISSING
    heads: int = MISSING
    vocab_size: int = MISSING  # WordPiece vocabulary trained on the data's own text (pretrained: on its corpus)
    text_family: str = MISSING  # distilbert | bert (a BERT-style text model: token types, a pooler-free BertModel)
    seed: int = MISSING
    pretrain: TinyPretrainConfig | None = MISSING  # None: random init


@dataclass
class BackboneConfig:
    vision: str | None = MISSING  # hub name or local folder of a CLIP vision tower (+ its image processor)
    text: str | None = MISSING  # hub name or local folder of DistilBERT (+ its tokenizer)
    image_position_offset: int = MISSING  # image token i gets DistilBERT position offset + i
    tiny: TinyBackboneConfig | None = MISSING


@dataclass
class ImageTokensConfig:
    select: str = MISSING  # all | cls | pooled
    k: int | None = MISSING  # pooled: how many tokens (a square number)


@dataclass
class FeaturesConfig:
    """The frozen-feature cache (clipqa/models/feature_cache.py)."""

    cache: bool = MISSING  # use it whenever no phase trains the vision tower
    dir: str = MISSING
    dtype: str = MISSING  # fp16 | fp32
    batch_size: int = MISSING  # images per CLIP forward while building
    num_workers: int | None = MISSING  # None: one per CPU core


@dataclass
class MapperConfig:
    _target_: str = MISSING
    num_layers: int = MISSING
    hidden_dim: int = MISSING
    activation: str = MISSING
    final_activation: bool = MISSING
    dropout: float = MISSING


@dataclass
class HeadConfig:
    kind: str = MISSING  # vocab | answers
    readout: str = MISSING  # cls | last
    bias: bool = MISSING  # the head's bias (the paper's head has none)


@dataclass
class FreezeConfig:
    """True = frozen (no gradient updates, eval mode so dropout is off). The answer head always trains."""

    vision: bool = MISSING
    text: bool = MISSING
    mapper: bool = MISSING


@dataclass
class OptimizerConfig:
    _target_: str = MISSING  # a torch.optim.Optimizer subclass
    lr: float = MISSING
    weight_decay: float = MISSING
    # Optimizer-specific keyword arguments; None = not passed (Adam has no momentum, SGD has no betas).
    betas: list[float] | None = None
    eps: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    fused: bool | None = None  # None: fused where torch has a kernel for the device


@dataclass
class PhaseFreezeConfig:
    vision: bool | None = None  # None: as in the previous phase
    text: bool | None = None
    mapper: bool | None = None


@dataclass
class PhaseConfig:
    """One training phase (``trainer.phases``); unset values are inherited (clipqa.training.schedule.resolve_phases)."""

    name: str | None = None
    epochs: int = MISSING
    lr: float | None = None  # absolute learning rate; or:
    lr_scale: float | None = None  # times optimizer.lr (default 1)
    freeze: PhaseFreezeConfig | None = None
    fresh_optimizer: bool = False  # True: a new optimizer (the paper's V3); False: keep its state


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    epoch_multiplier: int = MISSING  # every phase's epochs (and epochs) times this; experiment=demo sets it
    max_steps: int | None = MISSING  # stop after this many optimizer steps (None: run all epochs)
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    eval_every: int = MISSING  # validate every N optimizer steps (and at every epoch end)
    log_every: int = MISSING
    seed: int = MISSING
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    # auto/cuda with several GPUs visible: each concurrent job leases one (clipqa/training/gpu_leases.py)
    gpu_lease: bool = MISSING
    precision: str = MISSING  # auto | fp32 | bf16 | fp16
    num_workers: int | None = MISSING  # None: auto (2 decoding images, 0 reading cached features)
    compile: str = MISSING  # auto | off | default | reduce-overhead | max-autotune (true = default, false = off)
    length_buckets: list[int] = MISSING  # question padding lengths when compiled with CUDA graphs (static shapes)
    save_checkpoint: bool = MISSING
    phases: list[PhaseConfig] | None = MISSING  # staged training; None: one phase (epochs, optimizer.lr, freeze)
    init_from: str | None = MISSING  # warm start from an earlier run's best.pt
    resume: str = MISSING  # auto: continue from the run folder's last checkpoint / skip a finished run | never
    checkpoint_every: int | None = MISSING  # resume checkpoints every N steps (+ epoch/phase ends); None: none
    keep_checkpoints: int = MISSING


@dataclass
class TrackingConfig:
    backend: str = MISSING  # mlflow | none
    uri: str | None = MISSING  # None: sqlite:///<project folder>/mlflow.db
    experiment: str = MISSING
    run_name: str | None = MISSING  # None: made from the overrides
    log_checkpoint: bool | None = MISSING  # None: yes for single runs, no for sweep jobs
    log_model: bool | None = MISSING  # the model as an MLflow model; None: yes for single runs, no for sweep jobs
    register_as: str | None = MISSING  # also register it in the MLflow model registry under this name


@dataclass
class RunConfig:
    paths: PathsConfig = MISSING
    data: DataConfig = MISSING
    backbone: BackboneConfig = MISSING
    image_tokens: ImageTokensConfig = MISSING
    features: FeaturesConfig = MISSING
    mapper: MapperConfig = MISSING
    head: HeadConfig = MISSING
    freeze: FreezeConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING


# trainer.compile: auto (CUDA graphs on CUDA, eager on CPU), off/false, default/true, or a torch.compile mode.
COMPILE_MODES = ("auto", "off", "false", "default", "true", "reduce-overhead", "max-autotune")


def is_validated(cfg: DictConfig) -> bool:
    """True for the result of :func:`validate` (so a caller that validated early does not validate twice)."""
    return OmegaConf.get_type(cfg) is RunConfig and OmegaConf.is_readonly(cfg)


def _fail(key: str, value: object, problem: str, fix: str) -> None:
    raise ClipqaError(f"Invalid config value {key}={value!r}: {problem}. Fix: {fix}.")


def validate(cfg: DictConfig) -> DictConfig:
    """Type-check and range-check a composed config; return it typed, resolved and read-only.

    Raises ClipqaError naming the key (e.g. ``optimizer.lr``) for a wrong type, an unknown or missing key, or an
    out-of-range value. Keys outside the schema sections (``hydra``, ``tracking`` ...) are kept as they are.
    """
    extra = {k: v for k, v in cfg.items() if k not in RunConfig.__dataclass_fields__}
    known = OmegaConf.masked_copy(cfg, [k for k in cfg if k in RunConfig.__dataclass_fields__])
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), known)
        OmegaConf.resolve(typed)
        missing = sorted(OmegaConf.missing_keys(typed))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ClipqaError(
            f"Invalid config at key '{key}': {msg}. Fix the value on the command line (e.g. optimizer.lr=3e-4) "
            "or in the YAML file of that group under conf/; `python train.py --cfg job` prints the composed config."
        ) from None
    if missing:
        raise ClipqaError(
            f"Config keys without a value: {', '.join(missing)}. Set them on the command line (key=value) or in "
            "the group's YAML file under conf/."
        )
    _check_ranges(typed)
    with open_dict(typed):  # sections outside the schema (e.g. ``optuna`` from the sweeper) pass through as given
        for k, v in extra.items():
            typed[k] = v
    OmegaConf.set_readonly(typed, True)
    return typed


# Keys that take one of a few words: key -> (the words, what is wrong, the fix). Checked first, by _check_ranges.
CHOICES = {
    "tracking.backend": (("mlflow", "none"), "unknown tracking backend", "use tracking=mlflow or tracking=none"),
    "mapper.activation": (("relu", "gelu", "tanh"), "unknown activation", "choose relu, gelu or tanh"),
    "head.kind": (("vocab", "answers"), "unknown head", "choose head=vocab (paper) or head=answers"),
    "head.readout": (("cls", "last"), "unknown readout position", "choose cls or last (paper)"),
    "data.on_bad_image": (("error", "skip"), "unknown policy", "choose error or skip"),
    "trainer.resume": (("auto", "never"), "unknown resume policy", "choose auto or never"),
    "trainer.precision": (("auto", "fp32", "bf16", "fp16"), "unknown precision", "choose auto, fp32, bf16 or fp16"),
    "image_tokens.select": (("all", "cls", "pooled"), "unknown token selection", "use image_tokens=all, cls or pooled"),
    "features.dtype": (("fp16", "fp32"), "unknown feature dtype", "choose fp16 or fp32"),
}


def _check_ranges(c: RunConfig | DictConfig) -> None:
    """What a type cannot say: the word-valued keys (:data:`CHOICES`), then each section's numeric ranges and the
    keys that only make sense together, one function per section; the first problem found stops the run."""
    for key, (words, problem, fix) in CHOICES.items():
        if (value := OmegaConf.select(c, key)) not in words:
            _fail(key, value, problem, fix)
    _check_mapper(c.mapper)
    _check_data(c.data)
    _check_optimizer(c.optimizer)
    _check_trainer(c.trainer)
    _check_image_tokens_and_features(c.image_tokens, c.features)
    _check_backbone(c.backbone)


def _check_mapper(m: MapperConfig) -> None:
    if m.num_layers < 0:
        _fail("mapper.num_layers", m.num_layers, "must be >= 0", "use 0 (raw CLIP tokens) or more layers")
    if m.hidden_dim <= 0:
        _fail("mapper.hidden_dim", m.hidden_dim, "must be > 0", "use e.g. mapper.hidden_dim=1024")
    if not 0.0 <= m.dropout < 1.0:
        _fail("mapper.dropout", m.dropout, "must be in [0, 1)", "use e.g. mapper.dropout=0.1")


def _check_data(d: DataConfig) -> None:
    if not 0.0 < d.val_fraction < 1.0:
        _fail("data.val_fraction", d.val_fraction, "must be in (0, 1)", "use e.g. data.val_fraction=0.1")
    if d.synthetic is None and (d.root is None or d.image_root is None):
        _fail("data.root", d.root, "COCO-QA needs data.root and data.image_root", "pass both, or experiment=demo")


def _check_optimizer(o: OptimizerConfig) -> None:
    if o.lr <= 0:
        _fail("optimizer.lr", o.lr, "must be > 0", "use e.g. optimizer.lr=1e-4")
    if o.weight_decay < 0:
        _fail("optimizer.weight_decay", o.weight_decay, "must be >= 0", "use 0 or a small positive value")
    import torch
    from hydra.utils import get_class

    try:
        cls = get_class(o._target_)
    except Exception:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        fix = "choose optimizer=adam, optimizer=adamw or optimizer=sgd (conf/optimizer/)"
        _fail("optimizer._target_", o._target_, "not a torch.optim.Optimizer class", fix)


def _check_trainer(t: TrainerConfig) -> None:
    for key in ("epochs", "epoch_multiplier", "batch_size", "eval_batch_size", "eval_every", "log_every"):
        if t[key] <= 0:
            _fail(f"trainer.{key}", t[key], "must be > 0", f"pass a positive integer, e.g. trainer.{key}=1")
    if t.max_steps is not None and t.max_steps <= 0:
        _fail("trainer.max_steps", t.max_steps, "must be > 0 or null", "use e.g. trainer.max_steps=100")
    for i, p in enumerate(t.phases or []):
        if p.epochs <= 0:
            _fail(f"trainer.phases[{i}].epochs", p.epochs, "must be > 0", "give every phase at least one epoch")
        if p.lr is not None and p.lr <= 0 or p.lr_scale is not None and p.lr_scale <= 0:
            _fail(f"trainer.phases[{i}].lr", p.lr, "must be > 0", "set lr or lr_scale to a positive number")
    if t.checkpoint_every is not None and t.checkpoint_every <= 0 or t.keep_checkpoints <= 0:
        fix = "use e.g. trainer.checkpoint_every=1000 (null: no resume checkpoints) trainer.keep_checkpoints=2"
        _fail("trainer.checkpoint_every", t.checkpoint_every, "must be > 0 (and keep_checkpoints > 0)", fix)
    if t.num_workers is not None and t.num_workers < 0:
        _fail("trainer.num_workers", t.num_workers, "must be >= 0", "use 0 to load data in the main process")
    if t.compile.lower() not in COMPILE_MODES:
        _fail("trainer.compile", t.compile, "unknown compile mode", f"choose one of {', '.join(COMPILE_MODES)}")
    if not t.length_buckets or min(t.length_buckets) < 1:
        _fail("trainer.length_buckets", t.length_buckets, "needs positive lengths", "use e.g. [16, 24, 32, 64]")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        _fail("trainer.device", t.device, "unknown device", "choose auto, cpu, cuda or cuda:N")


def _check_image_tokens_and_features(it: ImageTokensConfig, f: FeaturesConfig) -> None:
    if it.select == "pooled" and (it.k is None or it.k < 1 or math.isqrt(it.k) ** 2 != it.k):
        _fail("image_tokens.k", it.k, "pooled tokens come from a square grid", "use a square number, e.g. 1, 4, 9, 16")
    if f.batch_size <= 0 or f.num_workers is not None and f.num_workers < 0:
        _fail("features.batch_size", f.batch_size, "must be > 0 (and num_workers >= 0)", "use e.g. 64 and 2")


def _check_backbone(b: BackboneConfig) -> None:
    if b.image_position_offset < 1:
        fix = "use 64 (COCO-QA questions are shorter than 64 tokens)"
        _fail("backbone.image_position_offset", b.image_position_offset, "must be >= 1", fix)
    pre = b.tiny.pretrain if b.tiny is not None else None
    if b.tiny is not None and b.tiny.text_family not in ("distilbert", "bert"):
        _fail("backbone.tiny.text_family", b.tiny.text_family, "unknown tiny text model", "choose distilbert or bert")
    for key in ("documents", "pictures", "text_steps", "vision_steps", "batch_size", "lr") if pre is not None else ():
        if pre[key] <= 0:
            _fail(f"backbone.tiny.pretrain.{key}", pre[key], "must be > 0", "see conf/backbone/tiny_pretrained.yaml")
    if b.tiny is None and (b.vision is None or b.text is None):
        fix = "use backbone=hub (openai/clip-vit-base-patch32 + distilbert-base-uncased) or backbone=tiny"
        _fail("backbone.vision", b.vision, "a hub name or local folder is needed", fix)
