"""benchmarks/throughput.py and table1_time.py leave the figures of every finished stage when a time limit stops
them (benchmarks/gpu.sh sends SIGINT: a KeyboardInterrupt), instead of writing their JSON only at the very end.
The heavy stages are replaced by stand-ins; what is checked is the bookkeeping around them."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers.runs import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import table1_time  # noqa: E402
import throughput  # noqa: E402


def stop(*args, **kwargs):
    raise KeyboardInterrupt  # what gpu.sh's `timeout --signal=INT` does to a part


@pytest.fixture
def light_setup(monkeypatch, tmp_path):
    """No real-size models, images or cache: the stages before the stopped one return fixed figures."""
    import clipqa.cli

    monkeypatch.setattr(throughput, "write_dataset", lambda *a, **k: ["what is on the table ?"])
    monkeypatch.setattr(throughput, "write_models", lambda folder, text: (tmp_path / "v", tmp_path / "t"))
    monkeypatch.setattr(clipqa.cli, "cache", lambda overrides: None)


def test_throughput_writes_each_finished_stage_before_a_time_limit_stops_it(light_setup, monkeypatch, tmp_path):
    monkeypatch.setattr(throughput, "clipqa_flops_per_example", lambda overrides, device_type="cpu": (3e9, 1e8))
    original = {"examples_per_s": 2.0, "wall_seconds": 30.0, "flops_per_example": 5e9}
    monkeypatch.setattr(throughput, "run_original", lambda *a: original)
    monkeypatch.setattr(throughput, "run_clipqa", stop)
    out = tmp_path / "throughput.json"
    with pytest.raises(KeyboardInterrupt):
        throughput.main(["--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(out)])
    partial = json.loads(out.read_text())
    assert partial["stages_done"] == ["flops", "original", "cache"] and partial["complete"] is False
    assert partial["original_examples_per_s"] == 2.0 and partial["clipqa_flops_per_example"] == 3e9


def test_table1_writes_each_finished_stage_before_a_time_limit_stops_it(light_setup, monkeypatch, tmp_path):
    import clipqa.models.feature_cache
    import clipqa.training.loop

    # The benchmark's clock wraps these two in place: monkeypatch puts the originals back afterwards.
    monkeypatch.setattr(clipqa.models.feature_cache, "_build", lambda *a, **k: None)
    monkeypatch.setattr(clipqa.training.loop, "evaluate", clipqa.training.loop.evaluate)
    monkeypatch.setattr(clipqa.cli, "cache", lambda overrides: clipqa.models.feature_cache._build())
    v2 = {"steps_per_s": 50.0, "startup_seconds": 9.0, "test_questions_per_s": 900.0}
    runs = iter([v2])
    monkeypatch.setattr(table1_time, "run_rate", lambda *a: next(runs, None) or stop())
    out = tmp_path / "table1.json"
    with pytest.raises(KeyboardInterrupt):
        table1_time.main(["--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(out)])
    partial = json.loads(out.read_text())
    assert partial["stages_done"] == ["cache", "V2"] and partial["complete"] is False
    assert partial["v2_steps_per_s"] == 50.0 and partial["cache_images_per_s"] > 0
    assert not out.with_name("table1.json.tmp").exists()
