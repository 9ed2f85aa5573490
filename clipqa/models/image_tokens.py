"""Which vision tokens go on to the mapper (the ``image_tokens`` ablation axis): shared by the model and the cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipqa.errors import ClipqaError


def select_tokens(hidden: torch.Tensor, select: str, k: int | None) -> torch.Tensor:
    """Choose the image tokens from the vision tower's ``last_hidden_state``: CLIP's ``(B, 1 + P, D)`` (CLS, then P
    patch tokens on a sqrt(P) x sqrt(P) grid) or SigLIP's ``(B, P, D)`` (patches only; told apart by the length: 1 + P
    is never a square when P is).

    Returns ``(B, N, D)``: ``all`` N = every token (the paper: 50 for ViT-B/32); ``cls`` N = 1 (token 0, CLIP only);
    ``pooled`` N = k: the patch grid average-pooled to a sqrt(k) x sqrt(k) grid (k a square number <= P).
    """
    if select == "all":
        return hidden
    B, L, D = hidden.shape
    cls = math.isqrt(L) ** 2 != L  # CLIP: a class token before the square grid of patches
    if select == "cls":
        if not cls:
            raise ClipqaError(
                f"image_tokens=cls reads the vision tower's class token, but this tower has none (its {L} tokens "
                "are a patch grid: SigLIP). Use image_tokens=pooled image_tokens.k=1 (the mean patch) or "
                "image_tokens=all."
            )
        return hidden[:, :1]  # (B, 1, D)
    patches = hidden[:, 1:] if cls else hidden  # (B, P, D)
    P = patches.shape[1]
    side, out = math.isqrt(P), math.isqrt(k)
    if side * side != P:
        raise ClipqaError(f"image_tokens=pooled needs a square patch grid; this vision tower has {P} patches.")
    grid = patches.transpose(1, 2).reshape(B, D, side, side)  # (B, D, side, side): patches back on the grid
    pooled = F.adaptive_avg_pool2d(grid, out)  # (B, D, out, out)
    return pooled.flatten(2).transpose(1, 2)  # (B, out*out, D), row-major over the pooled grid


def n_selected(n_tokens: int, select: str, k: int | None) -> int:
    """How many tokens :func:`select_tokens` keeps out of CLIP's ``n_tokens`` (1 + patches)."""
    return {"all": n_tokens, "cls": 1}.get(select, k)
