"""Loading the towers: by what a folder is (its config's model_type), never as something else; complete weights
only; a tiny preset fills only the towers not given; what was loaded is recorded.

Each folder is a tiny model of its family, built here from a config and saved with save_pretrained (offline)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2Model,
    ViTConfig,
    ViTModel,
)

from clipqa.errors import ClipqaError
from clipqa.models.backbones import load_backbone, load_sources, weights_digest
from tests.helpers.runs import SMALL_DEMO, compose_cfg

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
SMALL_IMAGE = dict(image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory, cache_dir):
    """The small demo's backbone config and the preset's folders (built once per session in the cache)."""
    cfg = compose_cfg(SMALL_DEMO, cache_dir)
    b = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    return cfg, b


def save(model, folder, processor=True):
    model.save_pretrained(folder)
    if processor:  # the refusal must come from the model type, not from a missing file beside it
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "key, make, model_type",
    [
        ("backbone.text", lambda: GPT2Model(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2)), "gpt2"),
        ("backbone.vision", lambda: ViTModel(ViTConfig(**SMALL, **SMALL_IMAGE)), "vit"),
    ],
)
def test_a_folder_of_an_unsupported_family_is_refused_by_its_model_type(key, make, model_type, tiny_preset, tmp_path):
    """Catches: a folder of another family loaded as DistilBERT / CLIP (a BERT folder once kept its embeddings and
    trained every layer from random: test acc 0.065, exit 0)."""
    _, preset = tiny_preset
    folder = save(make(), tmp_path / model_type)
    vision, text = (folder, preset.text_source) if key == "backbone.vision" else (preset.vision_source, folder)
    with pytest.raises(ClipqaError) as refused:
        load_sources(vision, text)
    msg = str(refused.value)
    assert msg.startswith(f"{key}={folder} holds a {model_type!r} model"), msg
    assert "the supported model types are" in msg and "randomly initialised" in msg


def test_a_checkpoint_missing_weights_is_an_error_not_a_log_table(tiny_preset, tmp_path):
    """Catches: transformers' MISSING table in the log as the only trace of a half-random tower."""
    _, preset = tiny_preset
    model = DistilBertModel(DistilBertConfig(vocab_size=99, dim=32, hidden_dim=64, n_layers=1, n_heads=2))
    folder = tmp_path / "short"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layers": 2}))  # a second layer with no weights
    with pytest.raises(ClipqaError, match=r"is not a complete 'distilbert' text model: its weights are \d+ missing"):
        load_sources(preset.vision_source, str(folder))


def test_a_whole_clip_model_loads_as_the_vision_tower_and_says_so(tiny_preset, tmp_path):
    """openai/clip-vit-base-patch32 is a two-tower 'clip' folder: its text tower's weights are skipped on purpose,
    not an error, and the provenance names the folder's type."""
    _, preset = tiny_preset
    clip = CLIPModel(CLIPConfig(text_config=SMALL, vision_config={**SMALL, **SMALL_IMAGE}, projection_dim=16))
    folder = save(clip, tmp_path / "clip")
    b = load_sources(folder, preset.text_source)
    assert b.loaded["vision"]["model_type"] == "clip"
    loaded, saved = b.vision.state_dict(), clip.vision_model.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_tower_given_under_a_tiny_preset_is_the_one_loaded_and_recorded(tiny_preset, tmp_path):
    """Catches: backbone.text=DIR silently ignored under experiment=smoke|demo (the preset took priority) while the
    run's config.yaml recorded DIR."""
    cfg, preset = tiny_preset
    other = DistilBertModel.from_pretrained(preset.text_source)
    torch.manual_seed(7)
    for p in other.parameters():  # the same architecture and tokenizer, other weights
        p.data.normal_(0, 0.02)
    folder = tmp_path / "my-text"
    other.save_pretrained(folder)
    preset.tokenizer.save_pretrained(folder)
    bcfg = OmegaConf.merge(cfg.backbone, {"text": str(folder)})
    b = load_backbone(bcfg, cfg.paths.cache_dir)
    assert b.text_source == str(folder) and b.vision_source == preset.vision_source  # the preset filled the vision
    assert b.loaded["text"] == {
        "source": str(folder),
        "model_type": "distilbert",
        "parameters": sum(p.numel() for p in other.parameters()),
        "sha256": weights_digest(other),
    }
    assert b.loaded["text"]["sha256"] != preset.loaded["text"]["sha256"]


@pytest.mark.slow
def test_train_py_with_a_given_text_folder_trains_it_and_a_gpt2_folder_exits_2(tiny_preset, tmp_path, cache_dir):
    """The issue's commands as a user types them: ``experiment=smoke backbone.text=DIR`` trains DIR (metrics.json and
    the MLflow params say so); a GPT-2 folder ends with exit 2 and the paragraph, never with a trained DistilBERT."""
    import yaml
    from mlflow.tracking import MlflowClient

    from tests.helpers.runs import mlflow_store, run_cli

    _, preset = tiny_preset
    other = DistilBertModel.from_pretrained(preset.text_source)
    torch.manual_seed(7)
    for p in other.parameters():
        p.data.normal_(0, 0.02)
    folder = tmp_path / "my-text"
    other.save_pretrained(folder)
    preset.tokenizer.save_pretrained(folder)
    uri = mlflow_store(tmp_path)
    run = tmp_path / "run"
    common = [f"paths.cache_dir={cache_dir}", "tracking=mlflow", f"tracking.uri={uri}"]
    r = run_cli("experiment=smoke", f"backbone.text={folder}", *common, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads((run / "metrics.json").read_text())["loaded"]
    assert loaded["text"]["source"] == str(folder) and loaded["text"]["sha256"] == weights_digest(other)
    assert yaml.safe_load((run / "config.yaml").read_text())["backbone"]["text"] == str(folder)
    params = MlflowClient(uri).get_run((run / "mlflow_run_id.txt").read_text().strip()).data.params
    assert params["loaded.text.source"] == str(folder) and params["loaded.text.sha256"] == weights_digest(other)
    assert params["loaded.vision.source"] == preset.vision_source

    gpt2 = save(GPT2Model(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2)), tmp_path / "gpt2", False)
    r = run_cli("experiment=smoke", f"backbone.text={gpt2}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}2")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "holds a 'gpt2' model" in out and "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "run2" / "metrics.json").exists()
