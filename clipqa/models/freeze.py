"""The freeze policy: the one place that decides what trains, and copies of the weights that did."""

from __future__ import annotations

import logging

import torch

from clipqa.models.model import ClipQA

log = logging.getLogger(__name__)

PARTS = ("vision", "text", "mapper", "head")


def apply_freeze(model: ClipQA, *, vision: bool, text: bool, mapper: bool) -> dict[str, int]:
    """True = frozen. The head always trains.

    Frozen parts get ``requires_grad=False`` and stay in eval mode (no dropout). Returns and logs the trainable
    and frozen parameter counts per component, e.g. ``{"params/trainable/mapper": 1574656, ...}``.
    """
    flags = {"vision": vision, "text": text, "mapper": mapper, "head": False}
    model.frozen = {name for name, frozen in flags.items() if frozen}
    counts: dict[str, int] = {}
    for name, frozen in flags.items():
        part = getattr(model, name)
        for p in part.parameters():
            p.requires_grad_(not frozen)
        n = sum(p.numel() for p in part.parameters())
        counts[f"params/trainable/{name}"] = 0 if frozen else n
        counts[f"params/frozen/{name}"] = n if frozen else 0
        log.info(
            "%s %s: %s parameters <freeze.%s=%s>",
            "freezing" if frozen else "training",
            name,
            f"{n:,}",
            name,
            str(frozen).lower() if name != "head" else "n/a",
        )
    counts["params/trainable"] = sum(v for k, v in counts.items() if k.startswith("params/trainable/"))
    counts["params/frozen"] = sum(v for k, v in counts.items() if k.startswith("params/frozen/"))
    model.train(model.training)
    return counts


def trainable_state(model: ClipQA, parts: set[str] | None = None) -> dict[str, torch.Tensor]:
    """A detached CPU *copy* of the weights of ``parts`` (default: every part not frozen now).

    A copy, not a reference: the paper's script kept ``state_dict()`` by reference, so its "best" weights were
    silently the last ones.
    """
    if parts is None:
        parts = {name for name in PARTS if name not in model.frozen}
    keep = tuple(f"{name}." for name in sorted(parts))
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k.startswith(keep)}
