"""The architecture: CLIP vision tokens -> MLP mapper -> [question embeddings ; image tokens] -> DistilBERT -> head.

How image tokens reach DistilBERT (current transformers): we pass the concatenated sequence as ``inputs_embeds``.
DistilBERT's embedding layer then adds a *position embedding* to every token and applies its *LayerNorm* and
dropout, image tokens included. The paper's transformers (late 2022) skipped that block for ``inputs_embeds``, so
its image tokens entered the transformer raw. We keep the current behaviour (image tokens get positions and are
normalised to the scale DistilBERT expects) and make the positions explicit: question token j gets position j,
image token i gets position ``backbone.image_position_offset + i`` (default 64, i.e. right after the paper's
63-token question slot). Because image positions do not depend on how long the padded question batch is,
dynamic padding never changes what the model computes for a question.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from clipqa.errors import ClipqaError
from clipqa.features import select_tokens
from clipqa.pretrained import Backbone

log = logging.getLogger(__name__)

FEATURE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPMapper(nn.Module):
    """``num_layers`` x (Linear -> activation [-> dropout]) from CLIP width to DistilBERT width.

    The paper: 2 layers, hidden 1024, ReLU, with a ReLU after the last layer too (``final_activation=True``).
    ``num_layers=0`` is the identity and needs ``in_dim == out_dim`` (768 == 768 for ViT-B/32 + DistilBERT).
    Input and output: ``(B, N, in_dim) -> (B, N, out_dim)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        num_layers: int,
        hidden_dim: int,
        activation: str,
        final_activation: bool,
        dropout: float,
    ):
        super().__init__()
        if num_layers == 0 and in_dim != out_dim:
            raise ClipqaError(
                f"mapper.num_layers=0 passes the vision tokens straight to the text model, but their widths "
                f"differ (vision {in_dim}, text {out_dim}). Use mapper.num_layers>=1, or a backbone whose widths match."
            )
        layers: list[nn.Module] = []
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim))
            if not last or final_activation:
                layers.append(_ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)  # empty Sequential = identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClipQA(nn.Module):
    """Image + question -> answer logits. ``forward`` returns ``(B, n_classes)``.

    Inputs: ``input_ids``/``attention_mask (B, T)`` from the tokenizer (with [CLS] ... [SEP], dynamically padded)
    and either ``pixel_values (B, 3, H, W)`` from the CLIP image processor or ``image_features (B, N, D_vision)``
    read from the feature cache (:mod:`clipqa.features`; the selected tokens of a frozen tower).

    While the vision tower is frozen its features are computed in fp32 and rounded to ``feature_dtype`` (what the
    cache stores), so a run gives the same results with or without the cache.
    """

    def __init__(
        self,
        vision: nn.Module,
        mapper: nn.Module,
        text: nn.Module,
        head: nn.Linear,
        *,
        image_position_offset: int,
        readout: str,
        image_tokens: tuple[str, int | None] = ("all", None),
        feature_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.vision, self.mapper, self.text, self.head = vision, mapper, text, head
        self.image_position_offset = image_position_offset
        self.readout = readout
        self.image_tokens = image_tokens
        self.feature_dtype = feature_dtype
        self.lean_text = True  # see _encode_text; False runs DistilBERT's own forward (padding, every position)
        self.frozen: set[str] = set()  # set by apply_freeze

    def train(self, mode: bool = True) -> ClipQA:
        super().train(mode)
        for name in self.frozen:  # frozen parts stay in eval mode: no dropout noise in features we do not train
            getattr(self, name).eval()
        return self

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, N, D_vision)``: the selected tokens of CLIP's last_hidden_state (before the
        post-LayerNorm); N = 50 for ViT-B/32 with ``image_tokens=all``."""
        if "vision" not in self.frozen:
            hidden = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + P, D)
            return select_tokens(hidden, *self.image_tokens)
        # Frozen: exactly what clipqa.features stores (fp32, no autocast, no graph), rounded to the stored dtype.
        with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
            hidden = self.vision(pixel_values=pixel_values.float()).last_hidden_state  # (B, 1 + P, D)
            return select_tokens(hidden, *self.image_tokens).to(self.feature_dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        feats = self.encode_image(pixel_values) if image_features is None else image_features  # (B, N, D_vision)
        # No graph where no gradient is wanted: a frozen mapper needs none, and when the text model is frozen too
        # nothing before the head trains (e.g. the paper's V1), so the whole backbone runs under no_grad.
        grad = torch.is_grad_enabled()
        mapper_trains = "mapper" not in self.frozen and any(p.requires_grad for p in self.mapper.parameters())
        text_trains = "text" not in self.frozen
        with torch.set_grad_enabled(grad and mapper_trains):
            img = self.mapper(feats.to(self.head.weight.dtype))  # (B, N, D)
        with torch.set_grad_enabled(grad and (mapper_trains or text_trains)):
            with torch.set_grad_enabled(grad and text_trains):
                words = self.text.embeddings.word_embeddings(input_ids)  # (B, T, D)
            B, T, N = input_ids.shape[0], input_ids.shape[1], img.shape[1]
            x = torch.cat([words, img.to(words.dtype)], dim=1)  # (B, T + N, D)
            mask = torch.cat([attention_mask, attention_mask.new_ones(B, N)], dim=1)  # (B, T + N)
            positions = torch.cat(
                [
                    torch.arange(T, device=x.device),
                    self.image_position_offset + torch.arange(N, device=x.device),
                ]
            ).unsqueeze(0)  # (1, T + N): fixed image positions, independent of padding
            at = 0 if self.readout == "cls" else x.shape[1] - 1  # [CLS] or the last image token (the paper)
            pooled = self._encode_text(x, mask, positions, at)  # (B, D)
        return head_logits(self.head, pooled)  # (B, n_classes): the head sees only the readout position

    def compile_text(self) -> None:
        """``trainer.compile``: torch.compile the text encoder (DistilBERT and the lean path around it) in place.

        Dynamic shapes, because batches are padded per batch; parameters and ``state_dict`` keys are unchanged, so
        checkpoints load either way. The first steps pay the compilation (minutes on a CPU).
        """
        self._encode_text = torch.compile(self._encode_text, dynamic=True)

    def _encode_text(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, at: int) -> torch.Tensor:
        """DistilBERT over ``x (B, L, D)`` with padding ``mask (B, L)``; returns the last layer's output at position
        ``at``: ``(B, D)``.

        The lean path (``lean_text``, default) computes the same numbers (up to float order) with less work:

        - padding removed: every linear layer and LayerNorm runs on the N real tokens of the batch, packed into one
          ``(N, D)`` matrix, instead of B x L rows (only attention needs the padded ``(B, H, L, D/H)`` layout);
          with questions of different lengths in a batch that is ~10% of DistilBERT's FLOPs, more on COCO-QA's
          longer tail;
        - the last layer runs its query, output projection and feed-forward for position ``at`` only (keys and values
          still cover every token): ~13% fewer FLOPs with 50 image tokens.

        Any text model other than DistilBERT's block layout (or ``lean_text=False``) runs its own forward.
        """
        layers = self.text.transformer.layer
        if not (self.lean_text and all(_is_distilbert_block(layer) for layer in layers)):
            return self.text(inputs_embeds=x, attention_mask=mask, position_ids=positions).last_hidden_state[:, at]
        B, L, D = x.shape
        emb = self.text.embeddings(None, inputs_embeds=x, position_ids=positions)  # (B, L, D): + positions, LN
        keep = mask.bool()  # (B, L)
        rows = keep.reshape(B * L).nonzero().squeeze(1)  # (N,): where the real tokens sit in the flat batch
        h = emb.reshape(B * L, D).index_select(0, rows)  # (N, D): padding dropped
        for layer in layers[:-1]:
            h = self._packed_block(layer, h, rows, keep)  # (N, D)
        last, heads = layers[-1], layers[-1].attention.n_heads
        att = last.attention
        q_in = self._unpack(h, rows, keep)[:, at : at + 1]  # (B, 1, D): the one query that matters
        q = linear(att.q_lin, q_in).view(B, 1, heads, D // heads).transpose(1, 2)  # (B, H, 1, D/H)
        k = self._heads(linear(att.k_lin, h), rows, keep, heads)  # (B, H, L, D/H)
        v = self._heads(linear(att.v_lin, h), rows, keep, heads)  # (B, H, L, D/H)
        p_drop = att.dropout.p if att.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=p_drop)  # (B,H,1,D/H)
        o = linear(att.out_lin, o.transpose(1, 2).reshape(B, 1, D))  # (B, 1, D)
        a = last.sa_layer_norm(o + q_in)  # (B, 1, D)
        return last.output_layer_norm(_ffn(last.ffn, a) + a)[:, 0]  # (B, D)

    @staticmethod
    def _unpack(h: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Packed ``(N, D)`` -> padded ``(B, L, D)`` with zeros at padding (differentiable)."""
        B, L = keep.shape
        return h.new_zeros(B * L, h.shape[1]).index_copy(0, rows, h).view(B, L, h.shape[1])

    @classmethod
    def _heads(cls, t: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, heads: int) -> torch.Tensor:
        """Packed ``(N, D)`` -> ``(B, H, L, D/H)`` for attention."""
        B, L = keep.shape
        return cls._unpack(t, rows, keep).view(B, L, heads, t.shape[1] // heads).transpose(1, 2)

    @classmethod
    def _packed_block(cls, layer: nn.Module, h: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """One DistilBERT TransformerBlock on packed tokens ``h (N, D) -> (N, D)``: its own modules, its order
        (attention -> add & LayerNorm -> feed-forward -> add & LayerNorm), attention over each question's tokens."""
        att, (B, L), D = layer.attention, keep.shape, h.shape[1]
        q, k, v = (cls._heads(linear(lin, h), rows, keep, att.n_heads) for lin in (att.q_lin, att.k_lin, att.v_lin))
        p_drop = att.dropout.p if att.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=p_drop)  # (B,H,L,D/H)
        o = o.transpose(1, 2).reshape(B * L, D).index_select(0, rows)  # (N, D): back to real tokens only
        a = layer.sa_layer_norm(linear(att.out_lin, o) + h)  # (N, D)
        return layer.output_layer_norm(_ffn(layer.ffn, a) + a)  # (N, D)


# ---- CPU matrix products ------------------------------------------------------------------------------------------
# A CLS-only batch gives DistilBERT ~100-row products and the vocab head 8-row ones. MKL threads such thin products
# poorly (on 2 AVX2 cores one core waits much of the time) and re-packs a wide weight on every call. The forms below
# compute the same numbers (up to float summation order) as torch.nn.functional.linear, but as batched products
# with one slice per thread, which MKL runs side by side. Measured on 2 cores: DistilBERT's linear layers 10-20%
# faster forward and backward at ~100 rows (no gain from 256 rows, so thicker products keep the ordinary path), the
# head's forward 30 -> 14 ms and backward 40 -> 27 ms; a CLS-only training step ~15% faster in all
# (benchmarks/throughput.py). CUDA, autocast and shapes that do not split evenly take the ordinary path.


THIN_ROWS = 192  # split products of up to this many rows (measured: a gain at ~100-128 rows, a loss from 256)


def _cpu_fp32(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)``: ``x (..., K) -> (..., N)``; for a thin ``x`` (<= THIN_ROWS rows) on a multi-threaded CPU, one
    batched product split over the N output features (P = torch threads slices), whose autograd backward is split
    the same way."""
    n, k = lin.weight.shape
    p = torch.get_num_threads()
    if not _cpu_fp32(x) or lin.bias is None or p < 2 or n % p or x.numel() > THIN_ROWS * k:
        return lin(x)
    x2 = x.reshape(-1, k)  # (M, K)
    w = lin.weight.view(p, n // p, k).transpose(1, 2)  # (P, K, N/P): slice i = output features i*N/P ...
    out = torch.baddbmm(lin.bias.view(p, 1, n // p), x2.expand(p, *x2.shape), w)  # (P, M, N/P)
    return out.transpose(0, 1).reshape(*x.shape[:-1], n)  # (P, M, N/P) -> (M, P, N/P) -> (..., N)


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


class _WideHeadCPU(torch.autograd.Function):
    """``x (B, D) @ W.T + b`` for a wide ``W (C, D)`` and few rows: forward as ``(W @ x.T).T`` (streams W once),
    backward as the batched products above."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()  # (C, B) -> (B, C) view

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # g: (B, C)
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        p = max(2, torch.get_num_threads())
        return (
            _split_k_mm(g, weight, p) if need_x else None,  # (B, D)
            _chunked_outer_mm(g, x) if need_w else None,  # (C, D)
            g.sum(0) if need_b else None,  # (C,)
        )


def head_logits(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` for ``x (B, D)`` -> ``(B, C)``; on CPU through :class:`_WideHeadCPU` (see above)."""
    if not _cpu_fp32(x) or x.dim() != 2 or head.bias is None:
        return head(x)
    return _WideHeadCPU.apply(x, head.weight, head.bias)


def _ffn(ffn: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """DistilBERT's feed-forward (lin1 -> activation -> lin2 -> dropout; its chunking only saves memory)."""
    return ffn.dropout(linear(ffn.lin2, ffn.activation(linear(ffn.lin1, a))))


def _is_distilbert_block(layer: nn.Module) -> bool:
    att = getattr(layer, "attention", None)
    return (
        all(hasattr(att, n) for n in ("q_lin", "k_lin", "v_lin", "out_lin", "n_heads", "dropout"))
        and all(hasattr(layer, n) for n in ("sa_layer_norm", "ffn", "output_layer_norm"))
        and all(hasattr(getattr(layer, "ffn", None), n) for n in ("lin1", "lin2", "activation", "dropout"))
    )


def build_mapper(mcfg: DictConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The mapper is a swap point: ``mapper._target_`` names its class (default clipqa.model.MLPMapper)."""
    try:
        return instantiate(mcfg, in_dim, out_dim)
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ClipqaError):
            raise cause from None
        raise ClipqaError(f"Cannot build the mapper from mapper._target_={mcfg._target_}: {e}") from None


def build_model(cfg: DictConfig, backbone: Backbone, n_classes: int) -> ClipQA:
    """Assemble the model; the new layers (mapper, head) are initialised from the caller's seeded RNG state.

    Nothing is frozen here: the caller applies :func:`apply_freeze` (the one place that decides what trains).
    """
    v_dim, t_dim = backbone.vision.config.hidden_size, backbone.text.config.dim
    mapper = build_mapper(cfg.mapper, v_dim, t_dim)
    head = nn.Linear(t_dim, n_classes)
    return ClipQA(
        backbone.vision,
        mapper,
        backbone.text,
        head,
        image_position_offset=cfg.backbone.image_position_offset,
        readout=cfg.head.readout,
        image_tokens=(cfg.image_tokens.select, cfg.image_tokens.k),
        feature_dtype=FEATURE_DTYPES[cfg.features.dtype],
    )


def apply_freeze(model: ClipQA, *, vision: bool, text: bool, mapper: bool) -> dict[str, int]:
    """The one place that decides what trains. True = frozen. The head always trains.

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
        parts = {name for name in ("vision", "text", "mapper", "head") if name not in model.frozen}
    keep = tuple(f"{name}." for name in sorted(parts))
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k.startswith(keep)}
