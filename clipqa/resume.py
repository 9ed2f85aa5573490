"""Checkpoints for resuming an interrupted run exactly where it stopped.

A resume checkpoint (``<run folder>/checkpoints/step_<N>.pt``, written atomically: temp file, then rename; the last
``trainer.keep_checkpoints`` are kept) holds everything the loop needs to continue as if it had never stopped: the
weights of every part that trains, optimizer and grad-scaler state, the torch RNG state, the data position (phase,
epoch, batches done), step counters, the phase's best validation accuracy and best weights, the history, earlier
phases' test metrics, and the MLflow run id (a resumed run continues the same MLflow run).

The training order is a pure function of (``trainer.seed``, epoch) (:class:`EpochSampler`), so a resumed epoch
skips the batches already done without replaying them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Sampler

from clipqa.errors import ClipqaError

log = logging.getLogger(__name__)

FORMAT = "clipqa-resume-v1"


class EpochSampler(Sampler[int]):
    """Shuffled indices for epoch ``epoch`` (seeded by ``seed`` and the epoch), starting at position ``start``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.start :].tolist())

    def __len__(self) -> int:
        return self.n - self.start


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save(out: Path, state: dict, keep: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/step_<step>.pt``; delete all but the newest ``keep``."""
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:08d}.pt"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest(out: Path, resolved_config: dict) -> dict | None:
    """The newest readable resume checkpoint of this run folder, or None. A checkpoint written with another
    config is refused (naming the differing keys) rather than silently mixed into this run."""
    folder = checkpoint_dir(out)
    for path in sorted(folder.glob("step_*.pt"), reverse=True) if folder.is_dir() else []:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a torn file cannot happen (atomic rename), but a damaged disk can
            log.warning("ignoring unreadable checkpoint %s (%s)", path, e)
            continue
        if state.get("format") != FORMAT:
            continue
        if _comparable(state["config"]) != _comparable(resolved_config):
            diff = _diff(_comparable(state["config"]), _comparable(resolved_config))
            raise ClipqaError(
                f"{out} holds checkpoints of a run with another config (differs in: {', '.join(diff[:5])}). "
                "Use a new output folder (hydra.run.dir=...), delete its checkpoints/ to start over, or pass "
                "trainer.resume=never."
            )
        log.info("resuming from %s (step %d) <trainer.resume=auto>", path, state["step"])
        return state
    return None


def _comparable(cfg: dict) -> dict:
    """Config keys that may change between an interrupted run and its resumption are left out."""
    c = {k: v for k, v in cfg.items() if k not in ("tracking",)}
    c["trainer"] = {k: v for k, v in cfg.get("trainer", {}).items() if k not in ("resume", "num_workers")}
    return c


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
