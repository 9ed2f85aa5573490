"""Using a trained model: find its checkpoint, re-evaluate it on a split, answer questions about pictures.

A checkpoint is named by a ``best.pt`` path, a run folder, or an MLflow URI: ``runs:/<run_id>`` (the run's
``checkpoint/best.pt`` artifact) or ``models:/<name>/<version>`` (a registered clipqa model). Every file is loaded
through :func:`clipqa.training.checkpoint.safe_load` (tensors and plain containers only).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from clipqa import metrics as M
from clipqa.data.cocoqa import LabelSpace, load_pixels
from clipqa.errors import ClipqaError
from clipqa.evaluation.scoring import autocast, evaluate, json_safe, write_predictions
from clipqa.evaluation.wups import split_wups
from clipqa.models.backbones import Backbone
from clipqa.models.model import ClipQA
from clipqa.tracking.uris import process_wide, resolve_uri
from clipqa.training.checkpoint import restore_model
from clipqa.training.device import pick_device, resolve_precision
from clipqa.training.loaders import build_labels, cached_store, load_data, split_loader
from clipqa.training.schedule import resolve_phases

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")


@dataclass
class TrainedModel:
    """A model rebuilt from its checkpoint, with what it needs to read questions and name answers."""

    model: ClipQA
    backbone: Backbone
    labels: LabelSpace
    cfg: DictConfig  # the training run's resolved config
    device: torch.device
    path: Path


def find_checkpoint(ref: str, tracking_uri: str | None = None, download_to: Path | None = None) -> Path:
    """The local ``best.pt`` that ``ref`` names (downloading MLflow artifacts into ``download_to``)."""
    if ref.startswith(("runs:/", "models:/")):
        uri = resolve_uri(tracking_uri, "--tracking-uri", must_exist=True)
        return _download(ref, uri, Path(download_to or tempfile.mkdtemp(prefix="clipqa-")))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise ClipqaError(
                f"{path} holds no best.pt: is it a finished run's folder? (trainer.save_checkpoint=false runs keep "
                "none.) Pass a run folder, a best.pt, runs:/<run_id> or models:/<name>/<version>."
            )
        return path / "best.pt"
    if not path.is_file():
        raise ClipqaError(
            f"No checkpoint at {ref}: pass a best.pt file, a run folder, runs:/<run_id> or models:/<name>/<version>."
        )
    return path


def _download(ref: str, uri: str, dst: Path) -> Path:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/") :].strip("/").split("/")[0]
        artifact = f"runs:/{run_id}/checkpoint/best.pt"
        hint = (
            "Single runs log it (tracking.log_checkpoint); sweep jobs keep theirs in their run folder: pass the "
            "folder instead."
        )
    else:
        artifact, hint = ref, "List the registered models in the MLflow UI (Models) or with the MLflow client."
    try:  # models:/ URIs are resolved against the registry, which follows the process-wide URIs
        with process_wide(uri):
            local = Path(download_artifacts(artifact_uri=artifact, dst_path=str(dst), tracking_uri=uri))
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ClipqaError(f"Cannot fetch {ref} from the MLflow store {uri} ({first}). {hint}") from None
    found = [local] if local.is_file() else sorted(local.rglob("best.pt"))
    if not found:
        raise ClipqaError(f"{ref} at {uri} holds no best.pt: it is not a clipqa model. {hint}")
    return found[0]


def load_trained(path: Path, device: str = "auto", sources: tuple[str, str] | None = None) -> TrainedModel:
    """Rebuild the model of ``path`` (a best.pt) on ``device`` (auto | cpu | cuda[:N])."""
    dev = pick_device(device)
    model, backbone, ckpt = restore_model(path, dev, sources)
    kind = ckpt["label_kind"]
    labels = LabelSpace(kind, list(ckpt["classes"]), backbone.tokenizer if kind == "vocab" else None)
    return TrainedModel(model, backbone, labels, OmegaConf.create(ckpt["config"]), dev, Path(path))


def evaluate_checkpoint(
    trained: TrainedModel,
    split: str = "test",
    data_root: str | None = None,
    image_root: str | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, float], object, dict[int, int]]:
    """Metrics (``{split}/acc`` overall and per type, loss, answer prior, WUPS) over every question of ``split``, the
    split, and the predictions. Reads the training run's data unless ``data_root`` points at another COCO-QA-format
    folder; uses the feature cache as training did, so a run's own test split reproduces its ``test/acc``."""
    if split not in SPLITS:
        raise ClipqaError(f"--split {split}: choose one of {', '.join(SPLITS)}.")
    cfg = trained.cfg.copy()
    with open_dict(cfg):
        if data_root is not None:
            cfg.data.root, cfg.data.image_root, cfg.data.synthetic = data_root, image_root or data_root, None
        if batch_size is not None:
            cfg.trainer.eval_batch_size = batch_size
    train, val, test, index = load_data(cfg)
    prior = M.answer_prior(train.answers, train.types)  # as the training run computed it
    _, train, y_train, _ = build_labels(cfg, trained.backbone, train)  # the training run's train questions
    chosen = {"train": train, "val": val, "test": test}[split]
    y = y_train if split == "train" else trained.labels.labels(chosen.answers)
    # The same images as the training run, so its feature cache (keyed on them) is found, not rebuilt.
    store = cached_store(cfg, trained.backbone, [train, val, test], index, trained.device, resolve_phases(cfg))
    loader = split_loader(cfg, trained.backbone, store, index, chosen, y, cfg.trainer.eval_batch_size, None, 0, False)
    precision = resolve_precision(cfg.trainer.precision, trained.device)
    metrics, preds = evaluate(trained.model, loader, trained.device, precision, split)
    prior_correct = [prior.get(t) == a for t, a in zip(chosen.types, chosen.answers, strict=True)]
    metrics.update(M.accuracy_by_type(prior_correct, chosen.types, f"{split}/prior_acc"))
    metrics.update(split_wups(cfg.paths.get("wordnet"), chosen, preds, trained.labels.classes, split))
    metrics[f"data/n_{split}"] = len(chosen)
    metrics[f"data/n_{split}_evaluated"] = len(preds)
    return metrics, chosen, preds


def write_evaluation(out: Path, split: str, metrics: dict, chosen, preds: dict[int, int], classes) -> list[Path]:
    """``metrics.json`` and ``<split>_predictions.tsv`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    write_predictions(out / f"{split}_predictions.tsv", chosen, preds, classes)
    return [out / "metrics.json", out / f"{split}_predictions.tsv"]


def answer(
    trained: TrainedModel, items: list[tuple[str | Path | bytes, str]], top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """The ``top_k`` answers (with probabilities) to each ``(image, question)``; an image is a path or JPEG/PNG
    bytes. Under ``head=vocab`` answers are wordpieces of the tokenizer's vocabulary."""
    tok, offset = trained.backbone.tokenizer, trained.cfg.backbone.image_position_offset
    pixels, questions = [], []
    for image, question in items:
        source = io.BytesIO(image) if isinstance(image, bytes | bytearray) else Path(image)
        if not isinstance(source, io.BytesIO) and not source.is_file():
            raise ClipqaError(f"Image not found: {image}. Pass the path of a JPEG or PNG file.")
        image_pixels, problem = load_pixels(source, trained.backbone.image_processor, "skip", "", log_skip=False)
        if image_pixels is None:
            shown = "the image bytes" if isinstance(source, io.BytesIO) else str(image)
            raise ClipqaError(f"Cannot read {shown} as a picture ({problem}). Pass a JPEG or PNG file.")
        pixels.append(image_pixels)  # (3, H, W)
        if not any(ch.isalnum() for ch in question) or not tok(question, add_special_tokens=False)["input_ids"]:
            raise ClipqaError(f"The question {question!r} has no words to read; ask a question in words.")
        questions.append(question)
    k = max(1, min(top_k, len(trained.labels)))
    precision = resolve_precision(trained.cfg.trainer.precision, trained.device)
    results = []
    for i in range(0, len(items), trained.cfg.trainer.eval_batch_size):
        chunk = slice(i, i + trained.cfg.trainer.eval_batch_size)
        enc = tok(questions[chunk], padding=True, truncation=True, max_length=offset, return_tensors="pt")
        batch = torch.stack(pixels[chunk]).to(trained.device)  # (B, 3, H, W)
        with torch.no_grad(), autocast(trained.device, precision):
            logits = trained.model(
                enc["input_ids"].to(trained.device), enc["attention_mask"].to(trained.device), pixel_values=batch
            )  # (B, C)
        top = logits.float().softmax(-1).topk(k)  # (B, k)
        for probs, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            results.append([(trained.labels.classes[c], p) for c, p in zip(ids, probs, strict=True)])
    return results
