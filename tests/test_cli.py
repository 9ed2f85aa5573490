"""`python train.py ...` as a user runs it: bad input ends with one clear paragraph and exit status 2; runs from
another directory and the README's demo (slow) leave their run files."""

import json
import re

import pytest

from tests.helpers.runs import ROOT, SMALL_DEMO, check_test_metrics, run_cli


@pytest.mark.parametrize(
    "args, needles",
    [
        pytest.param(["experiment=demo", "optimizer.lr=abc"], ["optimizer.lr", "abc"], id="lr-abc"),
        pytest.param(
            ["experiment=demo", "mapper.num_layers=-1"], ["mapper.num_layers", ">= 0"], id="num-layers-negative"
        ),
        # ~10 s (a process that imports torch and opens the MLflow store): slow. The fast tier has the same error
        # in-process (tests/training/test_run.py, tests/tracking/test_tracker.py: the run ends FAILED with it); the
        # command-line paragraph of an error raised inside train() is the hub case below (slow too).
        pytest.param(
            ["data.root=no/such/cocoqa", "data.image_root=no/such/coco"],
            ["no/such/cocoqa/train", "experiment=demo"],
            id="missing-data",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_input_prints_one_paragraph_without_a_traceback(args, needles, tmp_path, cache_dir):
    r = run_cli(*args, f"hydra.run.dir={tmp_path}")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out


# ~8 s (a process that imports torch and tries the hub): slow; tests/models/test_model.py has the same error in-process.
@pytest.mark.slow
def test_unreachable_hub_model_offline_is_a_clear_error(tmp_path, cache_dir):
    r = run_cli(*SMALL_DEMO, "backbone=hub", "backbone.vision=no-such-org/clip", f"hydra.run.dir={tmp_path}")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-2000:]
    assert "Traceback" not in out and "backbone.vision=no-such-org/clip" in out and "local folder" in out


@pytest.mark.slow  # a full extra training run (fast tier <= 2 minutes)
def test_train_py_runs_from_another_directory_and_leaves_the_run_files(tmp_path, cache_dir):
    r = run_cli(*SMALL_DEMO, "trainer.max_steps=3", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3
    for f in (".hydra/config.yaml", ".hydra/overrides.yaml", "best.pt", "config.yaml"):
        assert (tmp_path / "run" / f).is_file(), f


@pytest.mark.slow
def test_the_readme_demo_beats_the_answer_prior_by_a_quarter(tmp_path, monkeypatch):
    """The README's quick-start command (`python train.py experiment=demo`, read from README.md) from an empty cache
    (data generation included)."""
    quick_start = re.search(r"^pip install .* && python train\.py (.+)$", (ROOT / "README.md").read_text(), re.M)
    assert quick_start, "README.md has no `pip install ... && python train.py ...` quick-start line"
    monkeypatch.setenv("CLIPQA_CACHE_DIR", str(tmp_path / "cache"))
    r = run_cli(*quick_start.group(1).split(), f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test/acc"] >= m["test/prior_acc"] + 0.25, m
    assert m["data/n_test"] == 1000
    check_test_metrics(tmp_path / "run")
