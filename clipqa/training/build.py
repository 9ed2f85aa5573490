"""Explicit builders for the trained parts of a run: the model (CLIP -> mapper -> DistilBERT -> head) and the
optimizer, the two swap points an ablation names by ``_target_``. ``clipqa.training.run`` calls them after the
device (:mod:`clipqa.training.device`) and the data (:mod:`clipqa.training.loaders`) are set up;
``clipqa.training.checkpoint`` rebuilds a trained model with them."""

from __future__ import annotations

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from clipqa.errors import ClipqaError
from clipqa.models.backbones import Backbone, has_cls_token, n_image_tokens, position_start
from clipqa.models.cpu_kernels import use_cpu_kernels
from clipqa.models.image_tokens import n_selected
from clipqa.models.model import ClipQA

FEATURE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


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
    check_positions(cfg, backbone)
    v_dim, t_dim = backbone.vision.config.hidden_size, backbone.text.config.hidden_size  # DistilBERT maps it to dim
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
        position_start=position_start(backbone.text),
        image_tokens=(cfg.image_tokens.select, cfg.image_tokens.k),
        feature_dtype=FEATURE_DTYPES[cfg.features.dtype],
    )
    if cpu_kernels:
        use_cpu_kernels(model)
    return model


def check_positions(cfg: DictConfig, backbone: Backbone) -> None:
    """Image token i sits at position ``backbone.image_position_offset + i``: every one must exist in the text model,
    and the class-token readout needs a tower that has one (a clear error at start-up, not an index error later)."""
    it = cfg.image_tokens
    if it.select == "cls" and not has_cls_token(backbone.vision):
        raise ClipqaError(
            f"image_tokens=cls reads the class token, but the vision tower {backbone.vision_source} "
            f"({backbone.vision.config.model_type}) has none. Use image_tokens=pooled image_tokens.k=1 or "
            "image_tokens=all with this backbone.vision."
        )
    n_img = n_selected(n_image_tokens(backbone.vision), it.select, it.k)
    offset, text = cfg.backbone.image_position_offset, backbone.text
    room = text.config.max_position_embeddings - position_start(text)  # positions a real token can have
    if offset + n_img > room:
        fix = f"lower backbone.image_position_offset to at most {room - n_img}, " if room - n_img >= 1 else ""
        raise ClipqaError(
            f"backbone.image_position_offset={offset} plus {n_img} image tokens needs {offset + n_img} positions, "
            f"but the text model {backbone.text_source} ({text.config.model_type}) has {room}. Fix: {fix}use fewer "
            "image tokens (image_tokens=pooled, image_tokens.k=16) or a text model with more positions."
        )


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
