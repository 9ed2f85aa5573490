"""Slow tier (`python -m pytest -m slow`; CI runs it): Hydra multiruns and the full demo as users run them."""

import json

import pytest
import yaml

from tests.test_cli import run_cli

pytestmark = pytest.mark.slow


def test_multirun_over_mapper_depth_leaves_three_independent_runs(tmp_path, cache_dir):
    small = [
        "data.synthetic.n_train=600",
        "data.synthetic.n_test=100",
        "data.synthetic.image_size=64",
        "trainer.max_steps=6",
        "trainer.num_workers=0",
    ]
    r = run_cli("-m", "experiment=demo", "mapper.num_layers=0,1,2", *small, f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    layers = []
    for job in range(3):
        d = tmp_path / str(job)
        metrics = json.loads((d / "metrics.json").read_text())
        assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["steps"] == 6
        assert (d / "best.pt").is_file()
        layers.append(yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["mapper"]["num_layers"])
        n_mapper = metrics["params/trainable/mapper"]
        assert (n_mapper == 0) == (layers[-1] == 0)
    assert layers == [0, 1, 2]


def test_the_readme_demo_beats_the_answer_prior_by_a_quarter(tmp_path, monkeypatch):
    """`python train.py experiment=demo` from an empty cache (data generation included), as in the README."""
    monkeypatch.setenv("CLIPQA_CACHE_DIR", str(tmp_path / "cache"))
    r = run_cli("experiment=demo", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test/acc"] >= m["test/prior_acc"] + 0.25, m
    assert m["data/n_test"] == 1000
