"""Short real training runs on the demo and on a hand-made COCO-QA folder (the run function called directly)."""

import json
import resource
import sys
from pathlib import Path

import pytest
import torch

from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC, TEST_PRIOR_ACC, TYPE_NAMES, VAL_ACC
from clipqa.tracking.tracker import Tracker
from clipqa.training.build import keep_freed_memory
from clipqa.training.checkpoint import load_checkpoint
from clipqa.training.run import train
from tests.helpers.handmade import make_cocoqa
from tests.helpers.runs import SMALL_DEMO, check_test_metrics, compose_cfg, run_cli

SMALL_DEMO_RUN = [*SMALL_DEMO, "trainer.epochs=4", "trainer.eval_every=20"]
INTERFACE_KEYS = [TEST_ACC, VAL_ACC, TEST_PRIOR_ACC] + [f"{TEST_ACC}/{t}" for t in TYPE_NAMES.values()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cache_dir):
    """One short demo run shared by the tests below (4 epochs x 29 steps, about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("demo-run")
    cfg = compose_cfg(SMALL_DEMO_RUN, cache_dir)
    return cfg, out, train(cfg, out)


def test_short_demo_run_beats_the_answer_prior_and_writes_the_interface_files(demo_run):
    _, out, metrics = demo_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(INTERFACE_KEYS) <= set(on_disk) and on_disk == pytest.approx(metrics)
    check_test_metrics(out)  # test/acc[/type] and the prior are the numbers the predictions and split files imply
    assert metrics[TEST_ACC] >= metrics[TEST_PRIOR_ACC] + 0.15, metrics
    assert metrics["data/n_test"] == 200  # the full test split, not a few batches
    assert (out / "best.pt").is_file() and (out / "config.yaml").is_file()
    assert len((out / "test_predictions.tsv").read_text().splitlines()) == 1 + 200
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    # every trainer.eval_every steps and at each epoch end (29 steps per epoch)
    assert [h["step"] for h in history if VAL_ACC in h][:3] == [20, 29, 40]


def test_best_checkpoint_loads_without_hydra_and_reproduces_test_accuracy(demo_run):
    from clipqa.data.cocoqa import Collator, LabelSpace, QADataset, index_images, read_split
    from clipqa.evaluation.scoring import evaluate
    from clipqa.training.build import make_loader

    _, out, metrics = demo_run
    model, backbone, classes = load_checkpoint(out / "best.pt")
    root = next(Path(demo_run[0].paths.cache_dir).glob("demo/v1-train1000-test200-*"))
    test = read_split(root, "test")
    labels = LabelSpace("vocab", classes, backbone.tokenizer).labels(test.answers)
    ds = QADataset(test, labels, index_images(root / "images"), backbone.image_processor, "error")
    loader = make_loader(ds, Collator(backbone.tokenizer, 64), 64, None, 0, False)
    again, _ = evaluate(model, loader, torch.device("cpu"), "fp32", "test")
    assert again[TEST_ACC] == pytest.approx(metrics[TEST_ACC])


def test_same_config_and_seed_give_the_same_metrics_on_cpu(small_demo_cfg, tmp_path):
    cfg = small_demo_cfg("trainer.max_steps=12", "trainer.eval_every=6", "trainer.save_checkpoint=false")
    a, b = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    drop = ("train/seconds", "train/examples_per_s")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert a["steps"] == 12 and not (tmp_path / "a" / "best.pt").exists()


def test_trains_on_a_hand_made_folder_in_the_real_cocoqa_and_coco_layout(tmp_path, cache_dir):
    data_root, image_root = make_cocoqa(tmp_path, n_train_images=40, n_test_images=12)
    cfg = compose_cfg(
        [
            f"data.root={data_root}",
            f"data.image_root={image_root}",
            "backbone=tiny",
            "backbone.tiny.image_size=32",
            "mapper.hidden_dim=32",
            "head=answers",
            "head.readout=last",
            "trainer.batch_size=16",
            "trainer.epochs=1",
            "trainer.num_workers=1",
            "optimizer=adamw",
            "optimizer.lr=1e-3",
        ],
        cache_dir,
    )
    metrics = train(cfg, tmp_path / "run")
    assert metrics["data/n_test"] == 24 and metrics["data/n_train"] + metrics["data/n_val"] == 80
    assert metrics["params/frozen/text"] > 0 and metrics["params/trainable/text"] == 0  # freeze=text default
    assert set(INTERFACE_KEYS) <= set(json.loads((tmp_path / "run" / "metrics.json").read_text()))


def test_vocab_head_drops_and_counts_multi_wordpiece_training_answers(tmp_path, cache_dir, caplog):
    data_root, image_root = make_cocoqa(tmp_path, n_train_images=20, n_test_images=4)
    answers = data_root / "train" / "answers.txt"
    lines = answers.read_text().splitlines()
    lines[:3] = ["xylophonequartz"] * 3  # too rare for the tiny WordPiece vocabulary to hold as one piece
    answers.write_text("\n".join(lines) + "\n")
    cfg = compose_cfg(
        [
            f"data.root={data_root}",
            f"data.image_root={image_root}",
            "backbone=tiny",
            "backbone.tiny.image_size=32",
            "backbone.tiny.vocab_size=120",
            "trainer.max_steps=2",
            "trainer.num_workers=0",
            "data.val_fraction=0.05",
            "trainer.save_checkpoint=false",
        ],
        cache_dir,
    )
    metrics = train(cfg, tmp_path / "run")
    assert metrics["data/n_train_dropped"] >= 1
    assert "not one wordpiece" in caplog.text


def test_missing_dataset_error_names_the_folder_and_the_demo(tmp_path, cache_dir):
    cfg = compose_cfg([f"data.root={tmp_path}/cocoqa", f"data.image_root={tmp_path}/coco"], cache_dir)
    with pytest.raises(ClipqaError) as e:
        train(cfg, tmp_path / "out")
    assert f"{tmp_path}/cocoqa/train" in str(e.value) and "experiment=demo" in str(e.value)


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


def test_staged_run_logs_each_phase_and_ends_with_the_last(small_demo_cfg, tmp_path):
    class Recorder(Tracker):  # a caller's own tracker (benchmarks/throughput.py times steps with one)
        def __init__(self):
            self.steps, self.status = [], None

        def log_metrics(self, metrics, step=None):
            if "train/examples_per_s" in metrics:
                self.steps.append(step)

        def finish(self, status="FINISHED", error=None, run_dir=None):
            self.status = status

    rec = Recorder()
    cfg = small_demo_cfg("freeze=staged", "trainer.max_steps=3", "trainer.log_every=1", "trainer.save_checkpoint=false")
    m = train(cfg, tmp_path, tracker=rec)
    assert sorted(set(rec.steps)) == [1, 2, 3, 4, 5, 6] and rec.status == "FINISHED"  # every step, both phases
    assert m["steps"] == 6 and m["epochs"] == 2
    assert m["phase/unfrozen_text/test/acc"] == m[TEST_ACC]
    assert "phase/frozen_text/test/acc" in m and m["params/trainable/text"] > 0


def test_a_non_finite_loss_stops_the_run_naming_step_phase_and_lr(small_demo_cfg, tmp_path):
    cfg = small_demo_cfg("optimizer=sgd", "optimizer.lr=1e30", "trainer.max_steps=20")
    with pytest.raises(ClipqaError) as e:
        train(cfg, tmp_path)
    msg = str(e.value)
    assert "Non-finite loss" in msg and "at step" in msg and "phase train" in msg and "lr 1e+30" in msg


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_cpu_runs_reuse_freed_memory_instead_of_faulting_it_in_again():
    """A 100 MB tensor made and freed every step (the vocab head's weight gradient) stops costing page faults once
    keep_freed_memory() has run (train() calls it for CPU runs): the heap settles on a few reusable blocks. glibc's
    default maps and unmaps it every time: ~24,000 faults (one per 4 KiB page) per step."""

    def faulting_rounds(n: int) -> int:
        hits = 0
        for _ in range(n):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(25_000_000)  # 100 MB, touched, freed at once
            hits += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before > 5_000
        return hits

    assert keep_freed_memory()
    faulting_rounds(6)  # let the heap settle
    assert faulting_rounds(10) <= 2


@pytest.mark.slow
def test_the_readme_demo_beats_the_answer_prior_by_a_quarter(tmp_path, monkeypatch):
    """`python train.py experiment=demo` from an empty cache (data generation included), as in the README."""
    monkeypatch.setenv("CLIPQA_CACHE_DIR", str(tmp_path / "cache"))
    r = run_cli("experiment=demo", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test/acc"] >= m["test/prior_acc"] + 0.25, m
    assert m["data/n_test"] == 1000
    check_test_metrics(tmp_path / "run")


@pytest.mark.slow
def test_trainer_compile_trains_the_same_model(small_demo_cfg, tmp_path):
    """torch.compile on the text encoder (lean path included): same losses as eager; its best.pt loads as usual."""
    runs = {}
    for compiled in (False, True):
        cfg = small_demo_cfg("trainer.max_steps=3", "trainer.eval_every=3", f"trainer.compile={compiled}")
        runs[compiled] = train(cfg, tmp_path / str(compiled))
    for key in ("test/loss", "val/acc"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-3), key
    load_checkpoint(tmp_path / "True" / "best.pt")  # the compiled run's weights load into a plain model
