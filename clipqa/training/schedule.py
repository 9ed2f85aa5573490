"""The training schedule: ``trainer.phases`` (or one phase) with every inherited value filled in."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

PARTS = ("vision", "text", "mapper")  # the parts a phase may freeze (the head always trains)


@dataclass
class Phase:
    """One stage of training: ``epochs`` at ``lr`` with a freeze policy, optionally with a fresh optimizer."""

    name: str
    epochs: int
    lr: float
    freeze: dict[str, bool]
    fresh_optimizer: bool

    @property
    def trains(self) -> set[str]:
        """The parts this phase trains (besides the head)."""
        return {n for n in PARTS if not self.freeze[n]}


def resolve_phases(cfg: DictConfig) -> list[Phase]:
    """``trainer.phases`` (or one phase from trainer.epochs / optimizer.lr / freeze) with inherited values filled in.

    A phase's ``freeze.*`` left null inherits the previous phase's (the first inherits ``freeze``); its learning rate
    is ``lr`` if set, else ``optimizer.lr * lr_scale`` (default scale 1). Every phase's epochs (and trainer.epochs)
    are multiplied by ``trainer.epoch_multiplier`` (1; the demo's: one paper epoch is several passes over its data).
    """
    base_freeze = {k: bool(cfg.freeze[k]) for k in PARTS}
    times = cfg.trainer.epoch_multiplier
    if not cfg.trainer.phases:
        return [Phase("train", cfg.trainer.epochs * times, cfg.optimizer.lr, base_freeze, True)]
    phases, freeze = [], base_freeze
    for i, p in enumerate(cfg.trainer.phases):
        freeze = {k: (freeze[k] if p.freeze is None or p.freeze[k] is None else bool(p.freeze[k])) for k in freeze}
        lr = p.lr if p.lr is not None else cfg.optimizer.lr * (p.lr_scale if p.lr_scale is not None else 1.0)
        phases.append(Phase(p.name or f"phase{i + 1}", p.epochs * times, lr, dict(freeze), bool(p.fresh_optimizer)))
    return phases
