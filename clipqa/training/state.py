"""What the training loop changes as it goes: step counters, data position, best weights, history, timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Best:
    """The best validation accuracy of the current phase, its step, and a copy of its weights."""

    acc: float
    step: int
    state: dict[str, torch.Tensor]


@dataclass
class TrainState:
    """Where training stands. A resume checkpoint is this state plus the weights, optimizer and RNG."""

    step: int = 0  # optimizer steps so far (all phases)
    seen: int = 0  # examples trained on (all phases, every process of this run)
    phase: int = 0  # position of the next step: phase index,
    epoch: int = 0  # epoch within the phase,
    batch: int = 0  # and batches of that epoch already done
    phase_start: int = 0  # the step at which the phase began
    phase_started: bool = False  # False at a phase boundary: the phase's optimizer and best weights are not set yet
    best: Best | None = None
    history: list[dict] = field(default_factory=list)  # rows of history.jsonl
    phase_metrics: dict[str, float] = field(default_factory=dict)  # phase/<name>/... of finished phases
    trained_parts: set[str] = field(default_factory=lambda: {"head"})  # what best.pt must hold
    seconds: float = 0.0  # this process: time in training steps (data wait included, validation excluded)
    seen_here: int = 0  # this process: examples trained on
    compile_fallback: str | None = None  # the error that made the run leave the compiled text path, if one did


class FirstNonFinite:
    """The first training step whose loss was not finite, noted on the loss's device.

    Testing ``torch.isfinite(loss)`` in an ``if`` every step would make the host wait for the GPU every step; here
    the test is a few device ops and the answer is read (one sync) only where the loop reads results anyway.
    """

    def __init__(self):
        self.seen: list[torch.Tensor] | None = None  # 0-dim float64 loss, step, epoch of the first one; step -1: none

    def note(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        if self.seen is None:
            self.seen = [torch.full((), v, dtype=torch.float64, device=loss.device) for v in (0.0, -1.0, 0.0)]
        first = torch.logical_and(~torch.isfinite(loss), self.seen[1] < 0)  # () bool, stays on the device
        # Python numbers enter as kernel arguments (no host-to-device copy); where() keeps the first one seen.
        self.seen = [
            torch.where(first, new, old) for new, old in zip((loss.double(), step, epoch), self.seen, strict=True)
        ]

    def first(self) -> tuple[float, int, int] | None:
        """(loss, step, epoch) of the first non-finite loss, or None (a host read)."""
        if self.seen is None:
            return None
        loss, step, epoch = torch.stack(self.seen).tolist()
        return None if step < 0 else (loss, int(step), int(epoch))


class StepTimer:
    """Adds the time of each training step (data wait included, validation and checkpoints excluded) to state."""

    def __init__(self, state: TrainState):
        self.state = state
        self.restart()

    def restart(self) -> None:
        self.tick = time.perf_counter()

    def lap(self) -> None:
        self.state.seconds += time.perf_counter() - self.tick
