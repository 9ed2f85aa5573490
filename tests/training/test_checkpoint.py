"""Checkpoints (clipqa.training.checkpoint): a run's best.pt rebuilds its model without Hydra, warm-starts another run
(trainer.init_from), and checkpoints that would run code when loaded are refused."""

import pathlib
from pathlib import Path

import pytest
import torch

from clipqa import cli
from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC
from clipqa.training.checkpoint import FORMAT, load_checkpoint, read_best
from clipqa.training.run import train
from tests.helpers.runs import SMALL_DEMO, SMALL_DEMO_RUN, compose_cfg


def test_best_checkpoint_loads_without_hydra_and_reproduces_test_accuracy(demo_run):
    from clipqa.data.cocoqa import Collator, LabelSpace, QADataset, index_images, read_split
    from clipqa.evaluation.scoring import evaluate
    from clipqa.training.loaders import make_loader

    _, out, metrics = demo_run
    model, backbone, classes = load_checkpoint(out / "best.pt")
    root = next(Path(demo_run[0].paths.cache_dir).glob("demo/v1-train1000-test200-*"))
    test = read_split(root, "test")
    labels = LabelSpace("vocab", classes, backbone.tokenizer).labels(test.answers)
    ds = QADataset(test, labels, index_images(root / "images"), backbone.image_processor, "error")
    loader = make_loader(ds, Collator(backbone.tokenizer, 64), 64, None, 0, False)
    again, _ = evaluate(model, loader, torch.device("cpu"), "fp32", "test")
    assert again[TEST_ACC] == pytest.approx(metrics[TEST_ACC])


def test_warm_start_from_a_best_checkpoint_continues_from_its_weights(demo_run, tmp_path):
    cfg, out, metrics = demo_run
    again = train(
        compose_cfg(
            [
                *SMALL_DEMO_RUN,
                f"trainer.init_from={out / 'best.pt'}",
                "trainer.max_steps=1",
                "optimizer.lr=1e-12",
                "trainer.save_checkpoint=false",
            ],
            Path(cfg.paths.cache_dir),
        ),
        tmp_path / "warm",
    )
    assert again[TEST_ACC] == pytest.approx(metrics[TEST_ACC], abs=0.011)  # lr ~0: the same model answers
    with pytest.raises(ClipqaError, match="trainer.init_from"):
        train(
            compose_cfg([*SMALL_DEMO_RUN, f"trainer.init_from={tmp_path}/missing.pt"], Path(cfg.paths.cache_dir)),
            tmp_path / "bad",
        )


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_unpickled(demo_run, tmp_path, capsys, cache_dir):
    _, out, _ = demo_run
    marker = tmp_path / "code-ran"
    ckpt = read_best(out / "best.pt", "test")
    torch.save({**ckpt, "payload": _Payload(marker)}, tmp_path / "best.pt")
    assert ckpt["format"] == FORMAT
    with pytest.raises(ClipqaError, match="refusing to load"):
        load_checkpoint(tmp_path / "best.pt")
    with pytest.raises(SystemExit) as exit_:  # clipqa-eval
        cli.evaluate([str(tmp_path / "best.pt")])
    assert exit_.value.code == 2 and "would run code" in capsys.readouterr().err
    # the same for a warm start and for a resume checkpoint found in a run folder
    cfg = compose_cfg([*SMALL_DEMO, f"trainer.init_from={tmp_path / 'best.pt'}"], cache_dir)
    with pytest.raises(ClipqaError, match="refusing to load"):
        train(cfg, tmp_path / "warm")
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"format": "clipqa-resume-v1", "payload": _Payload(marker)}, run / "checkpoints" / "step_00000001.pt")
    with pytest.raises(ClipqaError, match="refusing to load"):
        train(compose_cfg(SMALL_DEMO, cache_dir), run)
    assert not marker.exists()
