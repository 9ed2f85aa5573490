"""The architecture: CLIP vision tokens -> MLP mapper -> [question embeddings ; image tokens] -> DistilBERT -> head.

How image tokens reach DistilBERT (current transformers): we pass the concatenated sequence as ``inputs_embeds``.
DistilBERT's embedding layer then adds a *position embedding* to every token and applies its *LayerNorm* and
dropout, image tokens included. The paper's transformers (late 2022) skipped that block for ``inputs_embeds``, so
its image tokens entered the transformer raw. We keep the current behaviour (image tokens get positions and are
normalised to the scale DistilBERT expects) and make the positions explicit: question token j gets position j,
image token i gets position ``backbone.image_position_offset + i`` (default 64, i.e. right after the paper's
63-token question slot). Because image positions do not depend on how long the padded question batch is,
dynamic padding never changes what the model computes for a question.

The model is assembled by :func:`clipqa.training.build.build_model`; what trains is decided by
:mod:`clipqa.models.freeze`.
"""

from __future__ import annotations

import torch
from torch import nn

from clipqa.errors import ClipqaError
from clipqa.models.image_tokens import select_tokens
from clipqa.models.packed_text import encode_packed, is_packable, packed_rows

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
    read from the feature cache (:mod:`clipqa.models.feature_cache`; the selected tokens of a frozen tower).

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
        position_start: int = 0,
        image_tokens: tuple[str, int | None] = ("all", None),
        feature_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.vision, self.mapper, self.text, self.head = vision, mapper, text, head
        self.image_position_offset = image_position_offset
        self.position_start = position_start  # the text model's first position id (clipqa.models.backbones)
        self.readout = readout
        self.image_tokens = image_tokens
        self.feature_dtype = feature_dtype
        self.lean_text = (
            True  # clipqa.models.packed_text for a DistilBERT; False: its own forward (padding, all positions)
        )
        self.compiled_text = None  # trainer.compile: encode_packed compiled (dynamic shapes, packed tokens)
        self.graphed_text = None  # trainer.compile with CUDA graphs: encode_packed compiled for training's fixed shapes
        self.frozen: set[str] = set()  # set by clipqa.models.freeze.apply_freeze

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
        # Frozen: exactly what clipqa.models.feature_cache stores (fp32, no autocast, no graph), rounded to the stored
        # dtype.
        with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
            hidden = self.vision(pixel_values=pixel_values.float()).last_hidden_state  # (B, 1 + P, D)
            return select_tokens(hidden, *self.image_tokens).to(self.feature_dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        question_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``question_rows (n_q,)``: flat positions of the real question tokens in ``(B, T)`` (the collator's); None:
        found here with ``nonzero()``, a host-device sync (fine outside training)."""
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
            positions = self.position_start + torch.cat(
                [
                    torch.arange(T, device=x.device),
                    self.image_position_offset + torch.arange(N, device=x.device),
                ]
            ).unsqueeze(0)  # (1, T + N): fixed image positions, independent of padding (RoBERTa's start at 2)
            at = 0 if self.readout == "cls" else -1  # [CLS] or the last image token (the paper); no size: no recompile
            pooled = self._encode_text(x, mask, positions, at, attention_mask, question_rows)  # (B, D)
        return self.head(pooled)  # (B, n_classes): the head sees only the readout position

    def compile_text(self, mode: str, static: bool) -> None:
        """``trainer.compile``: torch.compile the lean text path (:func:`clipqa.models.packed_text.encode_packed`).

        ``static`` (CUDA graphs, ``mode="reduce-overhead"``): training steps run the padded layout, whose shapes are
        fixed by the loader's few bucket lengths, so each shape's graph is recorded once and replayed (one launch
        instead of hundreds); evaluation keeps the eager packed path (large batches are not launch-bound). Otherwise
        dynamic shapes on the packed tokens. Parameters and ``state_dict`` keys are unchanged, so checkpoints load
        either way. The first steps pay the compilation (tens of seconds; minutes on a CPU).
        """
        # dynamic=True: one compilation for every batch and bucket size (CUDA graphs are still recorded per shape)
        compiled = torch.compile(encode_packed, mode=mode, dynamic=True)
        if static:
            self.graphed_text = compiled
        else:
            self.compiled_text = compiled

    def _encode_text(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        at: int,
        question_mask: torch.Tensor,
        question_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """DistilBERT over ``x (B, L, D)`` with padding ``mask (B, L)``: its last layer's output at ``at`` (an index,
        -1 = the last position), (B, D)."""
        if not (self.lean_text and is_packable(self.text)):
            return self.text(inputs_embeds=x, attention_mask=mask, position_ids=positions).last_hidden_state[:, at]
        if self.graphed_text is not None and self.training:  # static shapes: every position, no packing
            return self.graphed_text(self.text, x, mask, positions, at)
        (B, T), N = question_mask.shape, x.shape[1] - question_mask.shape[1]
        if question_rows is None:
            question_rows = question_mask.reshape(-1).nonzero().squeeze(1)  # (n_q,): a host sync; not in training
        rows = packed_rows(question_rows, B, T, N)  # (n,): where the real tokens sit in the flat (B, T + N) batch
        return (self.compiled_text or encode_packed)(self.text, x, mask, positions, at, rows)
