"""The training step never makes the host wait for the GPU (issue 18).

On CUDA, an op whose result size or value the host must know (``.item()``, ``nonzero()``, boolean indexing, a
``torch.isfinite`` tested in an ``if``) stops the CPU until every queued kernel has run: the GPU then idles while
Python launches the next step's kernels. At the paper's batch of 8 a DistilBERT step is a few milliseconds of GPU
work, so one such op per step can halve the step rate. These ops are the same on the CPU, so a
``TorchDispatchMode`` sees them in a CPU run: the tests below train a few steps under one and fail on any such op
in a step that does not log (logging reads the loss: one read per ``trainer.log_every`` steps is the design).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipqa.training.loop import Trainer
from clipqa.training.run import train

aten = torch.ops.aten

# Ops that make the host wait for the device on CUDA: they return a host value, or an output whose size depends on
# the data (the host must read it to allocate).
_SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), `if t:` (is_nonzero), torch.isfinite(t) in an `if`
    aten.nonzero,
    aten.masked_select,
    aten.unique_dim,
    aten._unique2,
    aten.unique_consecutive,
    aten.equal,  # torch.equal returns a Python bool
    aten.allclose,
}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # with a boolean mask: a nonzero


def forces_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in _SYNC_OPS:
        return True
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None:
        return any(isinstance(a, torch.Tensor) and a.dtype == torch.long for a in args[-1:])  # output length read
    if packet in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])
    return False


class SyncRecorder(TorchDispatchMode):
    """Records ``(label, op name)`` for every op that would force a host-device sync on CUDA."""

    def __init__(self):
        super().__init__()
        self.label: object = "set-up"
        self.syncs: list[tuple[object, str]] = []
        self.n_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n_ops += 1
        kwargs = kwargs or {}
        if forces_sync(func, args, kwargs):
            self.syncs.append((self.label, str(func)))
        return func(*args, **kwargs)


def record_training(monkeypatch, cfg, out) -> tuple[SyncRecorder, dict]:
    """Train under a SyncRecorder. Ops are labelled with the step they belong to (from the start of step s to the
    start of step s + 1: data loading, the step, the loop's own work); validation, checkpoints and the end-of-phase
    test are labelled "eval" (they read results on purpose)."""
    rec = SyncRecorder()
    step = Trainer.step

    def labelled_step(self, batch, phase, state):
        rec.label = state.step + 1  # the step about to run
        return step(self, batch, phase, state)

    def as_eval(method):
        def run(self, *args, **kwargs):
            before, rec.label = rec.label, "eval"
            try:
                return method(self, *args, **kwargs)
            finally:
                rec.label = before

        return run

    monkeypatch.setattr(Trainer, "step", labelled_step)
    for name in ("validate", "save_checkpoint", "end_phase"):
        monkeypatch.setattr(Trainer, name, as_eval(getattr(Trainer, name)))
    with rec:
        metrics = train(cfg, out)
    return rec, metrics


@pytest.mark.parametrize(
    "extra",
    [
        [],  # the smoke demo: cached features, the packed text path, mapper + text model training
        # everything trains, pixels through CLIP every step (~20 s: CLIP over the whole test split under the recorder)
        pytest.param(["freeze=none", "features.cache=false"], marks=pytest.mark.slow),
    ],
    ids=["cached", "uncached-all-train"],
)
def test_training_steps_force_no_host_sync_outside_logging(small_demo_cfg, tmp_path, monkeypatch, extra):
    """Catches: nonzero() in the packed text path, `if not torch.isfinite(loss)` after every step, `.item()` of
    the loss every step -- each a full GPU pipeline drain per step."""
    cfg = small_demo_cfg(
        "trainer.max_steps=9", "trainer.log_every=4", "trainer.eval_every=1000", "trainer.checkpoint_every=1000", *extra
    )
    rec, metrics = record_training(monkeypatch, cfg, tmp_path)
    assert metrics["steps"] == 9 and rec.n_ops > 1000  # the mode saw the training ops
    logging_steps = {1, 4, 8}  # the phase's first step and every trainer.log_every-th
    in_steps = [(label, op) for label, op in rec.syncs if isinstance(label, int)]
    assert {label for label, _ in in_steps} <= logging_steps, in_steps
    # The recorder itself works: logging reads the loss once (aten._local_scalar_dense) at each logging step.
    assert {label for label, op in in_steps if "_local_scalar_dense" in op} == logging_steps
    assert any(label == "eval" for label, _ in rec.syncs)  # evaluation reads its results (allowed)


def test_the_recorder_sees_each_kind_of_sync():
    """The detector is not blind: each idiom that stalls a GPU is recorded (and plain arithmetic is not)."""
    x = torch.randn(6)
    idioms = {
        "item": lambda: x.sum().item(),
        "if": lambda: bool(torch.isfinite(x).all()),
        "nonzero": lambda: (x > 0).nonzero(),
        "bool-index": lambda: x[x > 0],
        "bool-assign": lambda: x.clone().__setitem__(x > 0, 0.0),
        "masked_select": lambda: x.masked_select(x > 0),
        "repeat_interleave": lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
    }
    for name, idiom in idioms.items():
        with SyncRecorder() as rec:
            idiom()
        assert rec.syncs, name
    with SyncRecorder() as rec:
        torch.where(x > 0, x, 0.0).sum() + x.index_select(0, torch.tensor([1, 2]))[0]
    assert not rec.syncs, rec.syncs
