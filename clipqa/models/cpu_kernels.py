"""CPU matrix products for thin batches, as ``nn.Linear`` subclasses swapped into a built model.

A CLS-only batch gives DistilBERT ~100-row products and the vocab head 8-row ones. MKL threads such thin products
poorly (on 2 AVX2 cores one core waits much of the time) and re-packs a wide weight on every call. The forms below
compute the same numbers (up to float summation order) as ``torch.nn.functional.linear``, but as batched products
with one slice per thread, which MKL runs side by side. Measured on 2 cores: DistilBERT's linear layers 10-20%
faster forward and backward at ~100 rows (no gain from 256 rows, so thicker products keep the ordinary path), the
head's forward 30 -> 14 ms and backward 40 -> 27 ms; a CLS-only training step ~15% faster in all
(benchmarks/throughput.py). CUDA, autocast and shapes that do not split evenly take the ordinary path.

Why subclasses: :func:`use_cpu_kernels` changes the class of existing ``nn.Linear`` modules in place, so weights,
``state_dict`` keys and checkpoints are untouched, and the model's code still reads ``att.q_lin(h)`` and
``self.head(pooled)``. Why hand-written: no library offers thread-sliced products for thin fp32 matrices on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

THIN_ROWS = 192  # split products of up to this many rows (measured: a gain at ~100-128 rows, a loss from 256)


def _cpu_fp32(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


class ThinLinear(nn.Linear):
    """``nn.Linear``; for a thin ``x`` (<= THIN_ROWS rows) on a multi-threaded CPU, one batched product split over
    the N output features (P = torch threads slices), whose autograd backward is split the same way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if not _cpu_fp32(x):  # first: a GPU never asks for the thread count
            return super().forward(x)
        n, k = self.weight.shape
        p = torch.get_num_threads()
        if self.bias is None or p < 2 or n % p or x.numel() > THIN_ROWS * k:
            return super().forward(x)
        x2 = x.reshape(-1, k)  # (M, K)
        w = self.weight.view(p, n // p, k).transpose(1, 2)  # (P, K, N/P): slice i = output features i*N/P ...
        out = torch.baddbmm(self.bias.view(p, 1, n // p), x2.expand(p, *x2.shape), w)  # (P, M, N/P)
        return out.transpose(0, 1).reshape(*x.shape[:-1], n)  # (P, M, N/P) -> (M, P, N/P) -> (..., N)


class WideHead(nn.Linear):
    """``nn.Linear`` for a wide output (the 30,522-entry vocab head) over few rows; on CPU through
    :class:`_WideHeadProduct`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C)
        if not _cpu_fp32(x) or x.dim() != 2:
            return super().forward(x)
        return _WideHeadProduct.apply(x, self.weight, self.bias)  # bias None: the paper's head (head.bias=false)


def use_cpu_kernels(model: nn.Module) -> None:
    """Swap the thin-product forms into ``model.text``'s transformer layers and ``model.head`` (in place)."""
    layers = getattr(model.text, "transformer", None) or model.text.encoder  # DistilBERT's name; BERT's, RoBERTa's
    for module in layers.modules():
        if type(module) is nn.Linear:
            module.__class__ = ThinLinear
    if type(model.head) is nn.Linear:
        model.head.__class__ = WideHead


def use_plain_linears(module: nn.Module) -> None:
    """Undo :func:`use_cpu_kernels` inside ``module`` (in place): for torch.compile, which chooses its own kernels
    and would stop its graph at each of these forms' thread-count branches."""
    for m in module.modules():
        if type(m) in (ThinLinear, WideHead):
            m.__class__ = nn.Linear


def _split_k_mm(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """``a (M, C) @ b (C, D)`` as p partial products over slices of C, summed (the C % p leftover rows added)."""
    (m, c), d = a.shape, b.shape[1]
    cut = c // p * p
    out = torch.bmm(a[:, :cut].reshape(m, p, cut // p).transpose(0, 1), b[:cut].view(p, cut // p, d)).sum(0)  # (M, D)
    return out + a[:, cut:] @ b[cut:] if cut < c else out


def _chunked_outer_mm(a: torch.Tensor, b: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """``a.T @ b`` for ``a (M, C)``, ``b (M, D)`` with small M (a weight gradient): ``(C, D)`` written in chunks of
    ``rows`` output rows, one batched product."""
    (m, c), d = a.shape, b.shape[1]
    p = c // rows
    out = torch.empty(c, d, dtype=b.dtype, device=b.device)
    if p == 0:
        return torch.mm(a.t(), b, out=out)
    cut = p * rows
    torch.bmm(a[:, :cut].t().reshape(p, rows, m), b.expand(p, m, d), out=out[:cut].view(p, rows, d))
    if cut < c:
        torch.mm(a[:, cut:].t(), b, out=out[cut:])
    return out


class _WideHeadProduct(torch.autograd.Function):
    """``x (B, D) @ W.T + b`` for a wide ``W (C, D)`` and few rows: forward as ``(W @ x.T).T`` (streams W once),
    backward as the batched products above. ``bias`` may be None (no bias term, no bias gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        if bias is None:
            return torch.mm(weight, x.t()).t()  # (C, B) -> (B, C) view
        return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()  # (C, B) -> (B, C) view

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # g: (B, C)
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        p = max(2, torch.get_num_threads())
        return (
            _split_k_mm(g, weight, p) if need_x else None,  # (B, D)
            _chunked_outer_mm(g, x) if need_w else None,  # (C, D)
            g.sum(0) if need_b else None,  # (C,); False when bias is None
        )
