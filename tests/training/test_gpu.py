"""The CUDA tier (``python -m pytest -m gpu``; benchmarks/gpu.sh runs it): what only a GPU can show.

Skipped without a CUDA GPU. ``CLIPQA_GPU_TESTS_ON=cpu`` runs the same bodies on the CPU instead (slow: torch.compile
on two cores takes minutes), which checks that they compose and run before scarce GPU minutes are spent on them.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from clipqa.training.loop import Trainer
from clipqa.training.run import train
from tests.helpers.runs import SMALL_DEMO, compose_cfg

DEVICE = "cuda" if torch.cuda.is_available() else os.environ.get("CLIPQA_GPU_TESTS_ON")
ON_GPU = DEVICE == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (CLIPQA_GPU_TESTS_ON=cpu runs it on the CPU)"),
]

# The smoke demo with random-init tiny backbones (nothing to pretrain), the paper's V2 training policy (frozen text:
# no dropout noise, so eager and compiled runs draw no random numbers and must agree), 24 steps, every loss logged.
BASE = [
    *SMALL_DEMO,
    "backbone=tiny",
    "freeze=text",
    f"trainer.device={DEVICE}",
    "trainer.max_steps=24",
    "trainer.eval_every=12",
    "trainer.log_every=1",
    "trainer.checkpoint_every=1000",
]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each run compiles its own model; the previous runs' graphs must not count towards torch's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(tmp_path, name: str, *extra: str, cache_dir=None, **kwargs) -> tuple[dict, list[float]]:
    """One training run; (metrics, the training loss at every step). ``extra`` replaces BASE's value of a key."""
    keys = {e.split("=")[0] for e in extra}
    base = [b for b in BASE if b.split("=")[0] not in keys]
    cfg = compose_cfg([*base, *extra], cache_dir or os.environ["CLIPQA_CACHE_DIR"])
    metrics = train(cfg, tmp_path / name, **kwargs)
    return metrics, [r["train/loss"] for r in history(tmp_path / name) if "train/loss" in r]


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def val_losses(run_dir) -> list[float]:
    return [r["val/loss"] for r in history(run_dir) if "val/loss" in r]


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) > 0 and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b, strict=True))


def test_bf16_autocast_trains_like_fp32(tmp_path):
    """trainer.precision=auto is bf16 on CUDA: its losses and accuracy must follow fp32's (catches a part left in
    bf16 that should not be, e.g. the loss or the frozen features, or an additive mask overflowing in bf16)."""
    fp32, fp32_losses = run(tmp_path, "fp32", "trainer.precision=fp32", "trainer.compile=off")
    bf16, bf16_losses = run(tmp_path, "bf16", "trainer.precision=bf16", "trainer.compile=off")
    assert close(bf16_losses, fp32_losses, rel=0.05), list(zip(bf16_losses, fp32_losses, strict=True))
    assert bf16["test/loss"] == pytest.approx(fp32["test/loss"], rel=0.05)
    assert bf16["test/acc"] == pytest.approx(fp32["test/acc"], abs=0.06)


def test_cuda_graphs_train_the_same_model_as_eager(tmp_path, caplog):
    """trainer.compile=reduce-overhead (CUDA graphs over the padded, bucketed layout) gives eager's losses step by
    step; graphs were really recorded (no inductor "cudagraph skip"); its best.pt loads into a plain model."""
    from torch._dynamo.utils import counters

    from clipqa.training.checkpoint import load_checkpoint

    caplog.set_level("INFO")
    eager, eager_losses = run(tmp_path, "eager", "trainer.precision=fp32", "trainer.compile=off")
    counters.clear()
    graphs, graph_losses = run(tmp_path, "graphs", "trainer.precision=fp32", "trainer.compile=reduce-overhead")
    assert "static shapes" in caplog.text  # the graph path (buckets, padded layout) was taken
    if ON_GPU:
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert close(graph_losses, eager_losses, rel=1e-3), list(zip(graph_losses, eager_losses, strict=True))
    assert graphs["test/loss"] == pytest.approx(eager["test/loss"], rel=1e-3)
    # Not best_step: on ~100 validation questions one answer flipped by float order would move it; the losses do not
    assert close(val_losses(tmp_path / "graphs"), val_losses(tmp_path / "eager"), rel=1e-3)
    assert graphs["train/compile_fallback"] == 0  # the graphs really ran, not the eager fallback
    load_checkpoint(tmp_path / "graphs" / "best.pt")


def test_a_resumed_gpu_run_ends_with_the_uninterrupted_metrics(tmp_path):
    """The defaults on a GPU (bf16, CUDA graphs): a run that crashed and resumed from its checkpoint ends where an
    uninterrupted one does (float order of a recompiled graph aside). The text model trains (``freeze=none``: V3/V4's
    DistilBERT dropout draws from the GPU's generator), so a resume that restored only the CPU's generator would
    replay the first steps' dropout masks and drift off."""
    extra = ("trainer.checkpoint_every=7", "freeze=none")
    reference, ref_losses = run(tmp_path, "reference", *extra)

    def crash_at_step_24(val_acc, step):
        if step == 24:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, "run", *extra, on_validation=crash_at_step_24)
    resumed, resumed_losses = run(tmp_path, "run", *extra)
    assert resumed["steps"] == reference["steps"]
    assert close(resumed_losses, ref_losses, rel=2e-3)
    assert close(val_losses(tmp_path / "run"), val_losses(tmp_path / "reference"), rel=2e-3)
    for key in ("val/acc", "test/acc"):
        assert resumed[key] == pytest.approx(reference[key], abs=0.011), key  # at most one answer apart


def test_the_feature_cache_built_on_the_gpu_gives_the_uncached_metrics(tmp_path, tmp_path_factory):
    """The cache is built with CLIP on the GPU (decoding in worker processes) and read back into pinned batches:
    the same losses and accuracy as running CLIP on every batch."""
    cache_dir = tmp_path_factory.mktemp("gpu-cache")  # a fresh cache: this run builds it on the device
    cached, cached_losses = run(tmp_path, "cached", "features.cache=true", "trainer.compile=off", cache_dir=cache_dir)
    uncached, uncached_losses = run(
        tmp_path, "uncached", "features.cache=false", "trainer.compile=off", cache_dir=cache_dir
    )
    assert any((cache_dir / "features").glob("*/features.npy"))
    assert close(cached_losses, uncached_losses, rel=2e-3)
    assert cached["test/acc"] == pytest.approx(uncached["test/acc"], abs=0.011)


@pytest.mark.skipif(not ON_GPU, reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_no_training_step_waits_for_the_gpu(tmp_path, monkeypatch):
    """CUDA's own sync detector, raising inside every training step (eager): the CPU never waits for the GPU there
    (tests/training/test_sync_free.py checks the same ops on the CPU)."""
    step = Trainer.step

    def strict_step(self, batch, phase, state):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, batch, phase, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "step", strict_step)
    metrics, _ = run(tmp_path, "strict", "trainer.compile=off")
    assert metrics["steps"] == 24


@pytest.mark.skipif(not ON_GPU, reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_no_graphed_training_step_waits_for_the_gpu(tmp_path, monkeypatch):
    """The same detector over CUDA-graph replays (trainer.compile=reduce-overhead): a shape's first calls compile,
    warm up and record (recording syncs by design), so only steps of a shape already run 3 times are checked."""
    step, seen = Trainer.step, {}

    def strict_after_warmup(self, batch, phase, state):
        shape = tuple(batch["input_ids"].shape)
        seen[shape] = seen.get(shape, 0) + 1
        if seen[shape] <= 3:
            return step(self, batch, phase, state)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, batch, phase, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "step", strict_after_warmup)
    metrics, _ = run(tmp_path, "strict-graphs", "trainer.compile=reduce-overhead", "trainer.max_steps=40")
    assert metrics["steps"] == 40 and metrics["train/compile_fallback"] == 0
    assert max(seen.values()) > 3  # some steps were checked
