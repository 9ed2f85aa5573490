"""The architecture: mapper shapes, dynamic-padding invariance, readout, freezing, best-weights copies."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from clipqa.data.cocoqa import Collator
from clipqa.errors import ClipqaError
from clipqa.models.backbones import load_sources, n_image_tokens
from clipqa.models.cpu_kernels import ThinLinear, WideHead, use_cpu_kernels
from clipqa.models.freeze import apply_freeze, trainable_state
from clipqa.models.model import ClipQA, MLPMapper
from clipqa.models.packed_text import encode_packed
from clipqa.models.tiny_backbone import build_tiny

TINY = OmegaConf.create(
    dict(
        image_size=32,
        patch_size=8,
        vision_dim=32,
        vision_layers=1,
        text_dim=32,
        text_layers=1,
        heads=2,
        vocab_size=60,
        seed=0,
        pretrain=None,  # random init (backbone.tiny.pretrain)
    )
)
TEXT = ["what color is the circle", "how many squares are there in the kitchen", "red", "two"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = build_tiny(TINY, tmp_path_factory.mktemp("cache"), TEXT)
    return load_sources(str(folder / "vision"), str(folder / "text"))


def make_model(backbone, readout="cls", num_layers=2):
    mapper = MLPMapper(
        32, 32, num_layers=num_layers, hidden_dim=48, activation="relu", final_activation=True, dropout=0.0
    )
    torch.manual_seed(0)
    return ClipQA(backbone.vision, mapper, backbone.text, nn.Linear(32, 7), image_position_offset=64, readout=readout)


def test_tiny_backbone_is_saved_in_hub_format_and_reloaded_through_from_pretrained(tmp_path):
    folder = build_tiny(TINY, tmp_path, TEXT)
    for f in (
        "vision/config.json",
        "vision/model.safetensors",
        "vision/preprocessor_config.json",
        "text/config.json",
        "text/model.safetensors",
        "text/tokenizer.json",
    ):
        assert (folder / f).is_file(), f
    assert build_tiny(TINY, tmp_path, TEXT) == folder  # cached: same key, same folder
    assert build_tiny(TINY, tmp_path, TEXT + ["new text"]) != folder  # the key covers the training text
    b = load_sources(str(folder / "vision"), str(folder / "text"))
    assert n_image_tokens(b.vision) == 17  # (32 / 8)^2 patches + CLS
    assert b.tokenizer("what color")["input_ids"][0] == b.tokenizer.cls_token_id


def test_unreachable_hub_model_says_to_pass_a_local_folder():
    with pytest.raises(ClipqaError) as e:
        load_sources("no-such-org/no-such-clip-model", "distilbert-base-uncased")
    msg = str(e.value)
    assert "backbone.vision" in msg and "no-such-org/no-such-clip-model" in msg
    assert "local folder" in msg and "HF_HUB_OFFLINE" in msg


def test_paper_mapper_is_linear_relu_linear_relu_and_zero_layers_is_identity():
    m = MLPMapper(768, 768, num_layers=2, hidden_dim=1024, activation="relu", final_activation=True, dropout=0.0)
    assert [type(x).__name__ for x in m.net] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert (m.net[0].in_features, m.net[0].out_features, m.net[2].out_features) == (768, 1024, 768)
    x = torch.randn(2, 50, 768)
    assert m(x).shape == (2, 50, 768)
    ident = MLPMapper(768, 768, num_layers=0, hidden_dim=1024, activation="relu", final_activation=True, dropout=0)
    assert torch.equal(ident(x), x)
    no_final = MLPMapper(8, 4, num_layers=1, hidden_dim=16, activation="gelu", final_activation=False, dropout=0)
    assert [type(x).__name__ for x in no_final.net] == ["Linear"]


def test_zero_mapper_layers_with_unequal_widths_is_a_clear_config_error():
    with pytest.raises(ClipqaError) as e:
        MLPMapper(768, 64, num_layers=0, hidden_dim=1024, activation="relu", final_activation=True, dropout=0)
    assert "mapper.num_layers=0" in str(e.value) and "768" in str(e.value)


def test_extra_padding_does_not_change_the_answer(backbone):
    model = make_model(backbone).eval()
    tok = backbone.tokenizer
    pixels = torch.randn(1, 3, 32, 32)
    short = tok(["what color is the circle"], return_tensors="pt")
    padded = tok(["what color is the circle"], padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        a = model(short["input_ids"], short["attention_mask"], pixel_values=pixels)
        b = model(padded["input_ids"], padded["attention_mask"], pixel_values=pixels)
    assert a.shape == (1, 7)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_readout_last_reads_the_last_image_token(backbone):
    """readout=last feeds the head DistilBERT's output at the last image token; readout=cls at position 0."""
    enc = backbone.tokenizer(["what color is the circle"], return_tensors="pt")
    pixels = torch.randn(1, 3, 32, 32)
    for readout, position in (("last", -1), ("cls", 0)):
        model = make_model(backbone, readout).eval()
        apply_freeze(model, vision=True, text=True, mapper=False)
        with torch.no_grad():
            logits = model(enc["input_ids"], enc["attention_mask"], pixel_values=pixels)
            # DistilBERT's own forward over the same sequence: question tokens, then the mapped image tokens
            img = model.mapper(model.encode_image(pixels).float())  # (1, N, D)
            x = torch.cat([model.text.embeddings.word_embeddings(enc["input_ids"]), img], dim=1)  # (1, T + N, D)
            T, N = enc["input_ids"].shape[1], img.shape[1]
            positions = torch.cat([torch.arange(T), 64 + torch.arange(N)]).unsqueeze(0)  # (1, T + N)
            hidden = model.text(inputs_embeds=x, position_ids=positions).last_hidden_state  # (1, T + N, D)
        torch.testing.assert_close(logits, model.head(hidden[:, position]), atol=1e-5, rtol=1e-4)
        other = 0 if position == -1 else -1
        assert not torch.allclose(logits, model.head(hidden[:, other]), atol=1e-3)


def test_freezing_is_applied_in_one_place_with_counts_and_frozen_parts_stay_in_eval_mode(backbone):
    model = make_model(backbone)
    counts = apply_freeze(model, vision=True, text=True, mapper=False)
    n_vision = sum(p.numel() for p in model.vision.parameters())
    assert counts["params/frozen/vision"] == n_vision and counts["params/trainable/vision"] == 0
    assert counts["params/trainable/mapper"] == sum(p.numel() for p in model.mapper.parameters())
    assert counts["params/trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    assert not model.text.training and not model.vision.training and model.mapper.training
    apply_freeze(model, vision=True, text=False, mapper=False)
    model.train()
    assert model.text.training and all(p.requires_grad for p in model.text.parameters())


def test_gradients_reach_the_mapper_through_a_frozen_text_model(backbone):
    model = make_model(backbone)
    apply_freeze(model, vision=True, text=True, mapper=False)
    enc = backbone.tokenizer(["what color is the circle"], return_tensors="pt")
    model(enc["input_ids"], enc["attention_mask"], pixel_values=torch.randn(1, 3, 32, 32)).sum().backward()
    assert model.mapper.net[0].weight.grad is not None
    assert all(p.grad is None for p in model.text.parameters())


def test_best_weights_are_a_copy_not_a_reference(backbone):
    model = make_model(backbone)
    apply_freeze(model, vision=True, text=True, mapper=False)
    snap = trainable_state(model)
    assert not any(k.startswith(("vision.", "text.")) for k in snap)
    before = snap["head.weight"].clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert torch.equal(snap["head.weight"], before)


QUESTIONS = ["what is red", "how many circles are there in the field", "where is it"]


def no_dropout(model: ClipQA) -> ClipQA:
    """Training mode (the static-shape path runs only while training) without dropout noise: comparable numbers."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model.train()


def collate(backbone, pixels: torch.Tensor, buckets=None) -> dict[str, torch.Tensor]:
    items = [
        {"pixel_values": p, "question": q, "label": 0, "type": 0, "index": i}
        for i, (p, q) in enumerate(zip(pixels, QUESTIONS, strict=True))
    ]
    return Collator(backbone.tokenizer, 64, buckets)(items)


def run_text_path(model: ClipQA, path: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits through one text path: DistilBERT's own forward, the packed one (rows from the collator, or found
    on the device), or the padded layout that CUDA graphs use (encode_packed itself stands in for its compiled form)."""
    model.lean_text, model.graphed_text = path != "distilbert", encode_packed if path == "static shapes" else None
    rows = batch["question_rows"] if path in ("packed", "static shapes") else None
    return model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], question_rows=rows)


@pytest.mark.parametrize("path", ["packed", "packed, rows found on the device", "static shapes"])
@pytest.mark.parametrize("readout", ["cls", "last"])
def test_the_lean_text_path_gives_distilberts_own_answer_and_gradients(backbone, readout, path):
    """Padding removed (or kept, for static shapes) + readout-only last layer + SDPA with an additive float mask ==
    DistilBERT's own forward over the padded batch: same logits, same gradients for the mapper, the text model
    (were it unfrozen) and the head, with questions of 3 lengths. Catches a wrong packing index (e.g. rows from
    the collator that miss the image tokens) or a mask that lets real tokens attend to padding."""
    model = make_model(backbone, readout)
    apply_freeze(model, vision=True, text=False, mapper=False)  # text trains: its gradients are compared too
    no_dropout(model)  # both paths must give the same numbers
    torch.manual_seed(1)
    batch = collate(backbone, torch.randn(3, 3, 32, 32))
    assert (batch["attention_mask"] == 0).any()  # the batch has padding to remove
    watched = {
        "mapper": model.mapper.net[0].weight,
        "first text layer": model.text.transformer.layer[0].attention.q_lin.weight,
        "last text layer": model.text.transformer.layer[-1].ffn.lin1.weight,
        "head": model.head.weight,
    }
    outs, grads = [], []
    for p in (path, "distilbert"):
        model.zero_grad()
        logits = run_text_path(model, p, batch)
        logits.logsumexp(-1).sum().backward()
        outs.append(logits.detach())
        grads.append({name: p.grad.clone() for name, p in watched.items()})
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for name in watched:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("path", ["packed", "static shapes"])
def test_bucketed_padding_gives_the_same_logits_as_per_batch_padding(backbone, path):
    """trainer.length_buckets pads questions to 24 or 32 tokens (CUDA graphs need few shapes) instead of the
    batch's longest: the answer must not change (it would if padding leaked into attention or positions)."""
    model = no_dropout(make_model(backbone, "last"))
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 32, 32)
    plain, bucketed = collate(backbone, pixels), collate(backbone, pixels, buckets=[24, 32])
    assert plain["input_ids"].shape[1] < 24 and bucketed["input_ids"].shape[1] == 24
    with torch.no_grad():
        a, b = run_text_path(model, path, plain), run_text_path(model, path, bucketed)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_collator_rounds_question_length_up_to_a_bucket_and_lists_the_real_tokens(backbone):
    c = Collator(backbone.tokenizer, 20, buckets=[4, 8, 64])  # 64 > max_tokens: capped to 20
    items = [
        {"pixel_values": torch.zeros(3, 2, 2), "question": q, "label": 0, "type": 0, "index": 0} for q in QUESTIONS
    ]
    batch = c(items)
    assert batch["input_ids"].shape[1] in (8, 20) and c.buckets == [4, 8, 20]
    mask = batch["attention_mask"]
    assert torch.equal(batch["question_rows"], mask.reshape(-1).nonzero().squeeze(1))
    assert (batch["input_ids"][mask == 0] == backbone.tokenizer.pad_token_id).all()


@pytest.fixture(params=[2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    """The CPU products split work per torch thread (with 1 thread they are nn.Linear's own path)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _as(cls, lin: nn.Linear) -> nn.Linear:
    """A copy of ``lin`` with its class swapped, as use_cpu_kernels does."""
    other = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    other.load_state_dict(lin.state_dict())
    other.__class__ = cls
    return other


def _same_values_and_gradients(fast: nn.Linear, plain: nn.Linear, x: torch.Tensor, split: bool) -> None:
    outs, grads, grad_fns = [], [], []
    for module in (fast, plain):
        module.zero_grad()
        x.grad = None
        y = module(x)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs.append(y.detach())
        bias_grad = module.bias.grad.clone() if module.bias is not None else None
        grads.append((x.grad.clone(), module.weight.grad.clone(), bias_grad))
        grad_fns.append(type(y.grad_fn).__name__)
    # the split product really ran (or, where it must not, the ordinary one did)
    assert (grad_fns[0] != grad_fns[1]) == split, grad_fns
    assert outs[0].shape == outs[1].shape and torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5, rtol=1e-5))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias (the paper's head)"])
def test_the_cpu_head_product_gives_nn_linears_logits_and_gradients(threads, bias):
    torch.manual_seed(0)
    head = nn.Linear(16, 1100, bias=bias)  # 2 chunks of 512 output rows + 76 left over in the weight gradient
    for rows in (1, 8, 33):
        x = torch.randn(rows, 16, requires_grad=True)
        _same_values_and_gradients(_as(WideHead, head), head, x, split=True)


def test_the_cpu_split_linear_gives_nn_linears_values_and_gradients(threads):
    torch.manual_seed(0)
    for n_out in (48, 50):  # 50 does not split 3 ways: the plain path
        lin = nn.Linear(24, n_out)
        x = torch.randn(3, 7, 24, requires_grad=True)
        _same_values_and_gradients(_as(ThinLinear, lin), lin, x, split=n_out % threads == 0)


def test_the_model_with_cpu_kernels_swapped_in_equals_the_plain_model(backbone):
    """use_cpu_kernels changes only how products run: same logits and gradients, same state_dict keys."""
    import copy

    torch.set_num_threads(2)
    plain = make_model(backbone, num_layers=1)
    apply_freeze(plain, vision=True, text=False, mapper=False)
    fast = copy.deepcopy(plain)
    use_cpu_kernels(fast)
    assert type(fast.head) is WideHead and type(fast.text.transformer.layer[0].attention.q_lin) is ThinLinear
    assert type(plain.head) is nn.Linear and list(fast.state_dict()) == list(plain.state_dict())
    enc = backbone.tokenizer(["what is red", "how many circles are there"], padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for model in (fast.eval(), plain.eval()):
        model.zero_grad()  # the backbone fixture is shared: earlier tests leave gradients in it
        logits = model(enc["input_ids"], enc["attention_mask"], pixel_values=pixels)
        logits.logsumexp(-1).sum().backward()
        outs.append(logits.detach())
        grads.append([p.grad for p in (model.head.weight, model.text.transformer.layer[0].ffn.lin1.weight)])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides, readout, bias",
    [
        ([], "cls", True),
        (["+paper=V2"], "last", False),
        (["+paper=V4", "head.readout=cls", "head.bias=true"], "cls", True),
    ],
    ids=["defaults", "paper", "paper with the cls ablation"],
)
def test_the_built_head_follows_head_readout_and_head_bias(backbone, overrides, readout, bias):
    """+paper=V1..V4 build the original's head, Linear(D, vocab, bias=False) read at the last position; the
    defaults read [CLS] with a bias; command-line keys still win over the paper config."""
    from clipqa.config import validate
    from clipqa.training.build import build_model
    from tests.helpers.runs import SMALL_DEMO, compose_cfg

    cfg = validate(compose_cfg([*SMALL_DEMO, *overrides]))
    model = build_model(cfg, backbone, 7)
    assert model.readout == readout and (model.head.bias is not None) == bias
    enc = backbone.tokenizer(["what is red", "how many circles are there"], padding=True, return_tensors="pt")
    logits = model(enc["input_ids"], enc["attention_mask"], pixel_values=torch.randn(2, 3, 32, 32))
    logits.logsumexp(-1).sum().backward()  # the CPU head product with and without a bias term
    assert logits.shape == (2, 7) and model.head.weight.grad is not None
