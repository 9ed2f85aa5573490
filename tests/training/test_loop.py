"""The training loop (clipqa.training.loop.Trainer) through short runs: the same seed gives the same metrics, staged
runs train each phase and report the last, a non-finite loss stops the run naming where."""

import pytest

from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC
from clipqa.tracking.tracker import Tracker
from clipqa.training.run import train


@pytest.mark.slow  # two short runs (~2 s); tests/training/test_resume.py compares a run with the session's demo run
def test_same_config_and_seed_give_the_same_metrics_on_cpu(small_demo_cfg, tmp_path):
    cfg = small_demo_cfg("trainer.max_steps=12", "trainer.eval_every=6", "trainer.save_checkpoint=false")
    a, b = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    drop = ("train/seconds", "train/examples_per_s")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert a["steps"] == 12 and not (tmp_path / "a" / "best.pt").exists()


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
