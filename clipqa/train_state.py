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


class StepTimer:
    """Adds the time of each training step (data wait included, validation and checkpoints excluded) to state."""

    def __init__(self, state: TrainState):
        self.state = state
        self.restart()

    def restart(self) -> None:
        self.tick = time.perf_counter()

    def lap(self) -> None:
        self.state.seconds += time.perf_counter() - self.tick
