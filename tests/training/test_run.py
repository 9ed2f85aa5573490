"""The run function (clipqa.training.run.train) called directly: the files a finished run leaves, metrics.json as
the numbers its files imply, the start-up error for a missing dataset. Resume and skip: tests/training/test_resume.py.
"""

import json

import pytest

from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC, TEST_PRIOR_ACC, VAL_ACC
from clipqa.training.run import train
from tests.helpers.runs import INTERFACE_KEYS, check_test_metrics, compose_cfg


def test_short_demo_run_beats_the_answer_prior_and_writes_the_interface_files(demo_run):
    _, out, metrics = demo_run
    on_disk = json.loads((out / "metrics.json").read_text())
    loaded = on_disk.pop("loaded")  # what was loaded per tower (tests/models/test_backbones.py): not a metric
    assert set(loaded) == {"vision", "text"} and loaded["text"]["model_type"] == "distilbert"
    assert set(INTERFACE_KEYS) <= set(on_disk) and on_disk == pytest.approx(metrics)
    check_test_metrics(out)  # test/acc[/type] and the prior are the numbers the predictions and split files imply
    assert metrics[TEST_ACC] >= metrics[TEST_PRIOR_ACC] + 0.15, metrics
    assert metrics["data/n_test"] == 200  # the full test split, not a few batches
    assert (out / "best.pt").is_file() and (out / "config.yaml").is_file()
    assert len((out / "test_predictions.tsv").read_text().splitlines()) == 1 + 200
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    # every trainer.eval_every steps and at each epoch end (29 steps per epoch), counted across epochs
    assert [h["step"] for h in history if VAL_ACC in h] == [10, 20, 29, 30, 40, 50, 58]


def test_missing_dataset_error_names_the_folder_and_the_demo(tmp_path, cache_dir):
    cfg = compose_cfg([f"data.root={tmp_path}/cocoqa", f"data.image_root={tmp_path}/coco"], cache_dir)
    with pytest.raises(ClipqaError) as e:
        train(cfg, tmp_path / "out")
    assert f"{tmp_path}/cocoqa/train" in str(e.value) and "experiment=demo" in str(e.value)
