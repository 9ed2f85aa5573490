"""The run's runtime (clipqa.training.device): CPU memory reuse (keep_freed_memory) and torch.compile
(trainer.compile, compile_model)."""

import resource
import sys

import pytest
import torch

from clipqa.training.checkpoint import load_checkpoint
from clipqa.training.device import keep_freed_memory
from clipqa.training.run import train


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
def test_trainer_compile_trains_the_same_model(small_demo_cfg, tmp_path):
    """torch.compile on the text encoder (lean path included): same losses as eager; its best.pt loads as usual."""
    runs = {}
    for compiled in (False, True):
        cfg = small_demo_cfg("trainer.max_steps=3", "trainer.eval_every=3", f"trainer.compile={compiled}")
        runs[compiled] = train(cfg, tmp_path / str(compiled))
    for key in ("test/loss", "val/acc"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-3), key
    load_checkpoint(tmp_path / "True" / "best.pt")  # the compiled run's weights load into a plain model
