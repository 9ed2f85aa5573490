"""Which CLIP tokens go on to the mapper (the ``image_tokens`` ablation axis): shared by the model and the cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipqa.errors import ClipqaError


def select_tokens(hidden: torch.Tensor, select: str, k: int | None) -> torch.Tensor:
    """Choose the image tokens from CLIP's ``last_hidden_state`` ``(B, 1 + P, D)`` (CLS, then P patch tokens on a
    sqrt(P) x sqrt(P) grid).

    Returns ``(B, N, D)``: ``all`` N = 1 + P (the paper: 50 for ViT-B/32); ``cls`` N = 1 (token 0); ``pooled`` N = k:
    the patch grid average-pooled to a sqrt(k) x sqrt(k) grid (k a square number <= P).
    """
    if select == "all":
        return hidden
    if select == "cls":
        return hidden[:, :1]  # (B, 1, D)
    B, L, D = hidden.shape
    side, out = math.isqrt(L - 1), math.isqrt(k)
    if side * side != L - 1:
        raise ClipqaError(f"image_tokens=pooled needs a square patch grid; this vision tower has {L - 1} patches.")
    grid = hidden[:, 1:].transpose(1, 2).reshape(B, D, side, side)  # (B, D, side, side): patches back on the grid
    pooled = F.adaptive_avg_pool2d(grid, out)  # (B, D, out, out)
    return pooled.flatten(2).transpose(1, 2)  # (B, out*out, D), row-major over the pooled grid


def n_selected(n_tokens: int, select: str, k: int | None) -> int:
    """How many tokens :func:`select_tokens` keeps out of CLIP's ``n_tokens`` (1 + patches)."""
    return {"all": n_tokens, "cls": 1}.get(select, k)
