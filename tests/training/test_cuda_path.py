"""The CUDA path, checked on the CPU (issue 25): what a read of it found before any GPU ran it.

CUDA calls are faked by monkeypatching; CUDA graphs' loaders are what ``trainer.compile=reduce-overhead`` builds on
any device. tests/training/test_gpu.py runs the same paths on a real GPU.
"""

from __future__ import annotations

import json
import logging
import pickle
import types

import pytest
import torch
from torch import nn

from clipqa.config import validate
from clipqa.models.backbones import load_backbone
from clipqa.training.loaders import build_labels, build_loaders, load_data
from clipqa.training.loop import Trainer
from clipqa.training.run import train
from clipqa.training.schedule import resolve_phases
from clipqa.training.state import Best, TrainState
from tests.helpers.runs import compose_cfg

CPU = torch.device("cpu")
BUCKETS = "trainer.length_buckets=[16,24,32,64]"  # the default, spelt out: the tests count shapes against it


def loaders_for(cache_dir, *overrides: str, device=CPU):
    """The run's loaders (clipqa.training.run's set-up steps) for the smoke demo with ``overrides``."""
    cfg = validate(compose_cfg(["experiment=smoke", *overrides], cache_dir))
    train_split, val_split, test_split, index = load_data(cfg)
    backbone = load_backbone(cfg.backbone, cfg.paths.cache_dir, train_split.questions + train_split.answers)
    labels, train_split, y_train, _ = build_labels(cfg, backbone, train_split)
    splits = [train_split, val_split, test_split]
    return cfg, build_loaders(cfg, backbone, splits, y_train, labels, index, device, resolve_phases(cfg))


# ---- defect 1: exact resume covers the GPU's generator ------------------------------------------------------------
class FakeCudaGenerator:
    """torch.cuda.get_rng_state / set_rng_state over one state tensor, as on a one-GPU machine."""

    def __init__(self):
        self.state = torch.arange(16, dtype=torch.uint8)

    def get(self, device=None):
        return self.state.clone()

    def set(self, new_state, device=None):
        self.state = new_state.clone()


def test_a_resume_checkpoint_restores_every_generator_the_device_draws_from(monkeypatch):
    """On CUDA, dropout draws from the GPU's generator; a checkpoint with only the CPU's made a resumed run replay
    the first steps' masks. The round trip must give back the CPU's and the GPU's state as they were at saving."""
    fake = FakeCudaGenerator()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set)
    model = nn.Module()
    model.head = nn.Linear(2, 2)
    trainer = Trainer.__new__(Trainer)  # only the pieces resume_state/restore use
    trainer.model, trainer.device, trainer.optimizer, trainer.params_by_name = model, torch.device("cuda", 0), None, {}
    trainer.config, trainer.tracker = {}, types.SimpleNamespace(run_id=None)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainState(best=Best(0.5, 3, {}))
    cpu_before, cuda_before = torch.get_rng_state(), fake.get()
    saved = pickle.loads(pickle.dumps(trainer.resume_state(state)))  # as written to and read from disk

    torch.rand(100)  # both generators move on (training after the checkpoint, or a restart's seed_everything)
    fake.set(torch.zeros(16, dtype=torch.uint8))
    trainer.restore(TrainState(), saved)
    assert torch.equal(torch.get_rng_state(), cpu_before)
    assert torch.equal(fake.get(), cuda_before), "the GPU's generator was not restored"


# ---- defects 2 and 3: CUDA graphs' shapes ------------------------------------------------------------------------
@pytest.mark.slow  # ~6 s: one epoch of the smoke demo's training loader
def test_one_epoch_under_cuda_graphs_has_at_most_one_shape_per_bucket(cache_dir):
    """A graph is recorded per (B, T): the last partial batch (and skipped images) must not add shapes. 900
    training questions at batch 32 leave a last batch of 4, padded to 32 rows whose label the loss ignores."""
    cfg, loaders = loaders_for(cache_dir, "trainer.compile=reduce-overhead", BUCKETS)
    batches = list(loaders.train)
    shapes = {tuple(b["input_ids"].shape) for b in batches}  # (B, T)
    assert len(shapes) <= len(cfg.trainer.length_buckets), shapes
    assert {b for b, _ in shapes} == {cfg.trainer.batch_size}, shapes  # one B: shapes = the buckets' T at most
    real = sum(b["n_real"] for b in batches)
    assert all((b["labels"][b["n_real"] :] == -100).all() for b in batches)
    assert real == len(loaders.train.dataset)


@pytest.mark.parametrize("tokens", ["all", "cls", "pooled"])
def test_bucket_lengths_align_the_text_sequence_for_fused_attention(tokens):
    """T + N image tokens must be a multiple of 16 for every bucket (computed from image_tokens, not fixed), and the
    longest bucket holds the longest question."""
    from clipqa.data.cocoqa import Collator

    n_image = {"all": 50, "cls": 1, "pooled": 16}[tokens]
    tok = types.SimpleNamespace(pad_token_id=0)
    c = Collator(tok, 64, [16, 24, 32, 64], image_tokens=n_image)
    assert all((t + n_image) % 16 == 0 for t in c.buckets), c.buckets
    assert max(c.buckets) >= 64 and min(c.buckets) >= 16


@pytest.mark.slow  # ~3 s: three loader set-ups
def test_the_loaders_under_cuda_graphs_use_aligned_buckets(cache_dir):
    """build_loaders passes the configured image tokens (the smoke demo's tiny CLIP: 1 + 16 patches) to the
    collator; CPU runs (no graphs) keep per-batch padding, so their metrics do not change."""
    for select, n in (("all", 17), ("cls", 1)):
        _, loaders = loaders_for(cache_dir, "trainer.compile=reduce-overhead", f"image_tokens={select}")
        assert all((t + n) % 16 == 0 for t in loaders.train.collate_fn.buckets), (select, loaders.train.collate_fn)
    _, eager = loaders_for(cache_dir)
    assert eager.train.collate_fn.buckets is None and eager.train.collate_fn.pad_to is None


# ---- defect 4: no fork after CUDA is initialised -------------------------------------------------------------------
def test_gpu_runs_start_data_workers_from_a_forkserver(cache_dir, monkeypatch):
    """On a GPU the DataLoader workers (and the cache build's) must not be forked from a process with CUDA and
    threads running. The device is faked: nothing is iterated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, loaders = loaders_for(
        cache_dir, "features.cache=false", "trainer.num_workers=1", "trainer.compile=off", device=torch.device("cuda")
    )
    for loader in (loaders.train, loaders.val, loaders.test):
        assert loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")
    from clipqa.data.cocoqa import worker_context

    assert worker_context(2, torch.device("cpu")).get_start_method() == "fork"  # CPU runs: as before
    assert worker_context(0, torch.device("cuda")) is None


@pytest.mark.slow  # ~15 s: spawned workers import torch
@pytest.mark.parametrize("cache", ["true", "false"], ids=["cached features", "decoded images"])
def test_datasets_and_collators_pickle_and_a_spawned_loader_gives_the_same_batches(cache_dir, cache):
    import multiprocessing

    from torch.utils.data import DataLoader

    _, loaders = loaders_for(cache_dir, f"features.cache={cache}", "trainer.num_workers=0")
    for loader in (loaders.train, loaders.val):
        pickle.loads(pickle.dumps(loader.dataset))
        pickle.loads(pickle.dumps(loader.collate_fn))
    val = loaders.val
    spawned = DataLoader(
        val.dataset,
        batch_size=val.batch_size,
        collate_fn=val.collate_fn,
        num_workers=1,
        multiprocessing_context=multiprocessing.get_context("spawn"),
    )
    for a, b in zip(val, spawned, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- defect 5: resume checkpoints can be turned off ----------------------------------------------------------------
@pytest.mark.slow  # ~5 s: a short run
def test_checkpoint_every_null_writes_no_resume_checkpoint(small_demo_cfg, tmp_path):
    """Benchmarks time training: epoch-end checkpoints (GBs at real size) must not be written or timed."""
    cfg = small_demo_cfg("trainer.max_steps=3", "trainer.eval_every=3", "trainer.checkpoint_every=null")
    metrics = train(cfg, tmp_path)
    assert metrics["steps"] == 3 and not (tmp_path / "checkpoints").exists()


# ---- fail safe: a failing compilation falls back to eager once ----------------------------------------------------
def test_a_failing_compile_falls_back_to_eager_with_eagers_metrics(small_demo_cfg, tmp_path, monkeypatch, caplog):
    def compile_that_fails(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: simulated compile failure")

        return run

    short = ("trainer.max_steps=6", "trainer.eval_every=3", "trainer.save_checkpoint=false")
    eager = train(small_demo_cfg(*short, "trainer.compile=off"), tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", compile_that_fails)
    caplog.set_level(logging.WARNING)
    fell_back = train(small_demo_cfg(*short, "trainer.compile=default"), tmp_path / "fallback")
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "simulated compile failure" in warnings[0] and "trainer.compile=off" in warnings[0]
    assert fell_back["train/compile_fallback"] == 1 and eager["train/compile_fallback"] == 0
    saved = json.loads((tmp_path / "fallback" / "metrics.json").read_text())
    assert saved["train/compile_fallback"] == 1
    for key in ("test/acc", "test/loss", "val/acc", "best_step"):
        assert fell_back[key] == eager[key], key


def test_the_fallback_is_tagged_and_the_step_redone_with_the_same_random_numbers(monkeypatch):
    """The failed call may have drawn dropout masks; the eager retry starts from the generator state before it."""
    model = nn.Module()
    model.graphed_text, model.compiled_text = None, object()
    tags = {}
    trainer = Trainer.__new__(Trainer)
    trainer.model, trainer.device = model, torch.device("cpu")
    trainer.t = types.SimpleNamespace(compile="default")
    trainer.tracker = types.SimpleNamespace(set_tags=tags.update)
    draws = []

    def forward_backward(batch, state):
        draws.append(torch.rand(1).item())
        if model.compiled_text is not None:
            raise RuntimeError("BackendCompilerFailed: simulated")
        return torch.tensor(1.0)

    trainer.forward_backward = forward_backward
    state = TrainState()
    trainer.first_calls({}, state)
    assert draws[0] == draws[1] and model.compiled_text is None
    assert "simulated" in tags["clipqa.compile_fallback"] and state.compile_fallback == tags["clipqa.compile_fallback"]


# ---- defect 6: CPU and GPU nodes share one feature cache ------------------------------------------------------------
def test_the_feature_cache_key_ignores_torchs_build_tag(monkeypatch):
    """torch 2.x+cu124 on a GPU node and 2.x+cpu on a CPU node compute the same features (the build runs fp32, TF32
    off): one key, so a sweep's nodes share one store; another torch release still gets its own."""
    from clipqa.models.feature_cache import describe, store_key

    vision = nn.Linear(2, 2)
    vision.config = types.SimpleNamespace(to_dict=lambda: {"hidden_size": 2})
    processor = types.SimpleNamespace(to_json_string=lambda: "{}")

    def key(version: str) -> str:
        monkeypatch.setattr(torch, "__version__", version)
        return store_key(describe(vision, processor, "all", None, "fp16"), [])

    assert key("2.13.0+cu124") == key("2.13.0+cpu") == key("2.13.0")
    assert key("2.14.0+cpu") != key("2.13.0+cpu")
