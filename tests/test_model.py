"""The architecture: mapper shapes, dynamic-padding invariance, readout, freezing, best-weights copies."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from clipqa.errors import ClipqaError
from clipqa.cpu_kernels import ThinLinear, WideHead, use_cpu_kernels
from clipqa.freeze import apply_freeze, trainable_state
from clipqa.model import ClipQA, MLPMapper
from clipqa.pretrained import build_tiny, load_sources, n_image_tokens

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
    tok = backbone.tokenizer
    enc = tok(["what color is the circle"], return_tensors="pt")
    pixels = torch.randn(1, 3, 32, 32)
    cls_model, last_model = make_model(backbone, "cls").eval(), make_model(backbone, "last").eval()
    last_model.head.load_state_dict(cls_model.head.state_dict())
    with torch.no_grad():
        a = cls_model(enc["input_ids"], enc["attention_mask"], pixel_values=pixels)
        b = last_model(enc["input_ids"], enc["attention_mask"], pixel_values=pixels)
    assert not torch.allclose(a, b)


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


@pytest.mark.parametrize("readout", ["cls", "last"])
def test_the_lean_text_path_gives_distilberts_own_answer_and_gradients(backbone, readout):
    """Padding removed + readout-only last layer == DistilBERT's own forward over the padded batch: same logits,
    same gradients for the mapper, the text model (were it unfrozen) and the head, with questions of 3 lengths."""
    model = make_model(backbone, readout)
    apply_freeze(model, vision=True, text=False, mapper=False)  # text trains: its gradients are compared too
    model.eval()  # no dropout: both paths must give the same numbers
    enc = backbone.tokenizer(
        ["what is red", "how many circles are there in the field", "where is it"], padding=True, return_tensors="pt"
    )
    assert (enc["attention_mask"] == 0).any()  # the batch has padding to remove
    pixels = torch.randn(3, 3, 32, 32)
    watched = {
        "mapper": model.mapper.net[0].weight,
        "first text layer": model.text.transformer.layer[0].attention.q_lin.weight,
        "last text layer": model.text.transformer.layer[-1].ffn.lin1.weight,
        "head": model.head.weight,
    }
    outs, grads = [], []
    for lean in (True, False):
        model.lean_text = lean
        model.zero_grad()
        logits = model(enc["input_ids"], enc["attention_mask"], pixel_values=pixels)
        logits.logsumexp(-1).sum().backward()
        outs.append(logits.detach())
        grads.append({name: p.grad.clone() for name, p in watched.items()})
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for name in watched:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    """The CPU products split work per torch thread: run the test with 1 (plain path), 2 and 3 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _same_values_and_gradients(f, module: nn.Linear, x: torch.Tensor) -> None:
    outs, grads = [], []
    for g in (f, lambda m, v: m(v)):
        module.zero_grad()
        x.grad = None
        y = g(module, x)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs.append(y.detach())
        grads.append((x.grad.clone(), module.weight.grad.clone(), module.bias.grad.clone()))
    assert outs[0].shape == outs[1].shape and torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_the_cpu_head_product_gives_nn_linears_logits_and_gradients(threads):
    torch.manual_seed(0)
    head = nn.Linear(16, 1100)  # 2 chunks of 512 output rows + 76 left over in the weight gradient
    for rows in (1, 8, 33):
        _same_values_and_gradients(head_logits, head, torch.randn(rows, 16, requires_grad=True))


def test_the_cpu_split_linear_gives_nn_linears_values_and_gradients(threads):
    torch.manual_seed(0)
    for n_out in (48, 50):  # 50 does not split 3 ways: the plain path
        lin = nn.Linear(24, n_out)
        _same_values_and_gradients(linear, lin, torch.randn(3, 7, 24, requires_grad=True))
