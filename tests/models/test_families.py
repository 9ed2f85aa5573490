"""Every supported backbone family, from tiny folders built here (tests/helpers/families.py): SigLIP's patch grid
without a class token, RoBERTa's positions, start-up errors for combinations that cannot work, and (slow) a run of
each family pair trained end to end, re-scored exactly by clipqa-eval."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipqa import cli
from clipqa.errors import ClipqaError
from clipqa.models.backbones import load_sources, n_image_tokens, position_start
from clipqa.models.image_tokens import select_tokens
from clipqa.models.model import ClipQA, MLPMapper
from clipqa.training.build import check_positions
from tests.helpers.families import text_folder, vision_folder
from tests.helpers.runs import SMALL_DEMO, compose_cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: str(vision_folder(f, root)) for f in ("clip", "siglip")} | {
        f: str(text_folder(f, root)) for f in ("distilbert", "bert", "roberta")
    }


def test_siglip_tokens_are_its_patch_grid_and_cls_is_a_clear_error(folders):
    b = load_sources(folders["siglip"], folders["distilbert"])
    assert n_image_tokens(b.vision) == 16  # 4 x 4 patches, no class token
    hidden = b.vision(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state  # (2, 16, 48)
    assert hidden.shape == (2, 16, 48) and torch.equal(select_tokens(hidden, "all", None), hidden)
    grid = hidden.transpose(1, 2).reshape(2, 48, 4, 4)
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (2, 4, 48): each 2 x 2 block of patches
    torch.testing.assert_close(select_tokens(hidden, "pooled", 4), expected)
    with pytest.raises(ClipqaError, match="image_tokens=cls reads the vision tower's class token"):
        select_tokens(hidden, "cls", None)
    clip = load_sources(folders["clip"], folders["distilbert"])
    assert n_image_tokens(clip.vision) == 17  # CLS + 4 x 4 patches
    cfg = compose_cfg([*SMALL_DEMO, "image_tokens=cls"])
    with pytest.raises(ClipqaError, match=r"image_tokens=cls reads the class token, but the vision tower .*siglip"):
        check_positions(cfg, b)
    check_positions(cfg, clip)


def test_roberta_positions_start_after_its_padding_index(folders):
    """Catches: RoBERTa given positions 0.. (DistilBERT's and BERT's), which it reserves for padding: the question
    would be read at positions it never saw in pretraining."""
    b = load_sources(folders["clip"], folders["roberta"])
    text = b.text.eval()
    assert position_start(text) == 2 and position_start(load_sources(folders["clip"], folders["bert"]).text) == 0
    ids = b.tokenizer(["what color is the circle"], return_tensors="pt")["input_ids"]  # (1, T), no padding
    own = text(input_ids=ids).last_hidden_state  # RoBERTa numbers the positions itself
    words = text.embeddings.word_embeddings(ids)
    ours = text(inputs_embeds=words, position_ids=2 + torch.arange(ids.shape[1])[None]).last_hidden_state
    torch.testing.assert_close(ours, own)
    # ... and the model passes those positions: its [CLS] output is RoBERTa's own over [question ; image tokens]
    model = ClipQA(
        b.vision, MLPMapper(48, 32, num_layers=1, hidden_dim=32, activation="relu", final_activation=False, dropout=0),
        text, nn.Identity(), image_position_offset=64, readout="cls", position_start=position_start(text),
    ).eval()  # fmt: skip
    model.head = nn.Linear(32, 32)
    nn.init.eye_(model.head.weight), nn.init.zeros_(model.head.bias)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = model(ids, torch.ones_like(ids), pixel_values=pixels)  # (1, 32)
        img = model.mapper(model.encode_image(pixels))  # (1, 17, 32)
        x = torch.cat([words, img], dim=1)  # (1, T + 17, 32)
        positions = 2 + torch.cat([torch.arange(ids.shape[1]), 64 + torch.arange(17)])[None]
        want = text(inputs_embeds=x, position_ids=positions).last_hidden_state[:, 0]
    torch.testing.assert_close(got, want)


def test_a_text_model_without_room_for_the_image_tokens_fails_at_start_up(folders):
    b = load_sources(folders["clip"], folders["roberta"])  # 162 positions, the first 2 for padding: 160
    check_positions(compose_cfg([*SMALL_DEMO, "backbone.image_position_offset=143"]), b)  # 143 + 17 = 160: fits
    with pytest.raises(ClipqaError) as e:
        check_positions(compose_cfg([*SMALL_DEMO, "backbone.image_position_offset=144"]), b)
    assert "needs 161 positions" in str(e.value) and "has 160" in str(e.value)
    assert "image_position_offset to at most 143" in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "vision, text", [("siglip", "roberta"), ("clip", "bert"), ("siglip", "distilbert"), ("clip", "roberta")]
)
def test_each_family_pair_trains_and_clipqa_eval_reproduces_it(vision, text, folders, tmp_path, cache_dir, capsys):
    """The issue's command for every family: python train.py experiment=smoke backbone.vision=DIR
    backbone.text=DIR; metrics finite, the loaded towers recorded, clipqa-eval's test/acc exactly the run's."""
    import math

    from clipqa.training.run import train

    overrides = [*SMALL_DEMO, f"backbone.vision={folders[vision]}", f"backbone.text={folders[text]}"]
    metrics = train(compose_cfg(overrides, cache_dir), tmp_path / "run")
    assert all(math.isfinite(metrics[k]) for k in ("test/acc", "val/acc", "test/loss"))
    loaded = json.loads((tmp_path / "run" / "metrics.json").read_text())["loaded"]
    assert loaded["vision"]["source"] == folders[vision] and loaded["text"]["model_type"] == text
    try:
        cli.evaluate([str(tmp_path / "run"), "--out", str(tmp_path / "eval")])
    except SystemExit as e:
        pytest.fail(f"clipqa-eval exited {e.code}: {capsys.readouterr().err}")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
    if (vision, text) == ("siglip", "roberta"):  # the feature cache and the vision tower's own forward agree
        uncached = train(compose_cfg([*overrides, "features.cache=false"], cache_dir), tmp_path / "uncached")
        assert uncached["test/acc"] == metrics["test/acc"]


def test_unequal_widths_with_no_mapper_layers_is_the_clear_error(folders):
    b = load_sources(folders["siglip"], folders["bert"])  # vision 48, text 32
    with pytest.raises(ClipqaError, match=r"mapper.num_layers=0 .* widths differ \(vision 48, text 32\)"):
        from clipqa.training.build import build_model

        build_model(compose_cfg([*SMALL_DEMO, "mapper.num_layers=0"]), b, 10)


def test_the_tiny_preset_builds_a_bert_style_text_model_when_asked(tmp_path):
    """backbone.tiny.text_family=bert (sweep=tiny_backbones): a BERT folder, loaded as one, with BERT's tokenizer."""
    from omegaconf import OmegaConf

    from clipqa.models.tiny_backbone import build_tiny
    from tests.models.test_model import TEXT, TINY

    folder = build_tiny(OmegaConf.merge(TINY, {"text_family": "bert"}), tmp_path, TEXT)
    b = load_sources(str(folder / "vision"), str(folder / "text"))
    assert b.loaded["text"]["model_type"] == "bert" and type(b.tokenizer).__name__.startswith("BertTokenizer")
    assert build_tiny(TINY, tmp_path, TEXT) != folder  # the family is part of the build's key


@pytest.mark.slow
def test_a_siglip_roberta_model_is_an_mlflow_model_that_answers_as_clipqa_predict(folders, tmp_path, cache_dir, capsys):
    """The logged pyfunc model carries both towers' folders and rebuilds them by their own families."""
    import mlflow
    import pandas as pd

    from clipqa.training.run import train
    from tests.helpers.runs import mlflow_store

    uri = mlflow_store(tmp_path)
    overrides = [
        *SMALL_DEMO, f"backbone.vision={folders['siglip']}", f"backbone.text={folders['roberta']}",
        "tracking=mlflow", f"tracking.uri={uri}", "tracking.log_model=true",
    ]  # fmt: skip
    train(compose_cfg(overrides, cache_dir), tmp_path / "run")
    run_id = (tmp_path / "run" / "mlflow_run_id.txt").read_text().strip()
    (data,) = (cache_dir / "demo").glob("v1-train1000-test200-*")
    image = sorted((data / "images" / "val2014").iterdir())[0]
    question = (data / "test" / "questions.txt").read_text().splitlines()[0]
    try:
        cli.predict([str(tmp_path / "run"), "--image", str(image), "--question", question, "--top-k", "1", "--json"])
    except SystemExit as e:
        pytest.fail(f"clipqa-predict exited {e.code}: {capsys.readouterr().err}")
    (expected,) = json.loads(capsys.readouterr().out)["answers"]
    mlflow.set_tracking_uri(uri)
    got = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(
        pd.DataFrame({"image": [image.read_bytes()], "question": [question]})
    )
    assert got["answer"][0] == expected["answer"]
    assert got["probability"][0] == pytest.approx(expected["probability"], rel=1e-5)
