"""The training loop: phases of epochs of optimizer steps, with validation, best weights and resume checkpoints.

:meth:`Trainer.fit` reads top to bottom::

    for each phase (trainer.phases, or one phase):
        1. the phase's freeze policy and optimizer                                  start_phase
        2. epochs of optimizer steps; validate every trainer.eval_every steps       train_phase / train_epoch / step
           and at each epoch end, keeping a copy of the best weights
        3. test the phase's best weights on the full test split                     end_phase

Everything the loop changes lives in one :class:`TrainState`. Resume (restoring a checkpoint's state), SIGTERM (a
:class:`clipqa.training.signals.StopRequest`) and timing (:class:`StepTimer`) are named calls, not branches in the
step loop.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from clipqa.errors import ClipqaError, Preempted
from clipqa.evaluation.scoring import autocast, evaluate, forward, to_device
from clipqa.metrics import TEST_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS
from clipqa.models.freeze import apply_freeze, trainable_state
from clipqa.models.model import ClipQA
from clipqa.tracking.tracker import Tracker
from clipqa.training.build import build_optimizer
from clipqa.training.checkpoint import save_resume
from clipqa.training.device import rng_state, set_rng_state
from clipqa.training.loaders import Loaders
from clipqa.training.schedule import Phase
from clipqa.training.signals import StopRequest
from clipqa.training.state import Best, FirstNonFinite, StepTimer, TrainState

log = logging.getLogger(__name__)


class Trainer:
    """Trains ``model`` through ``phases``; the optimizer, grad scaler and resume checkpoints are its own."""

    def __init__(
        self,
        model: ClipQA,
        loaders: Loaders,
        phases: list[Phase],
        cfg: DictConfig,
        device: torch.device,
        precision: str,
        tracker: Tracker,
        out,
        config: dict,
        on_validation=None,
        stop: StopRequest | None = None,
    ):
        self.model, self.loaders, self.phases, self.t, self.ocfg = model, loaders, phases, cfg.trainer, cfg.optimizer
        self.device, self.precision, self.tracker, self.out, self.config = device, precision, tracker, out, config
        self.on_validation, self.stop = on_validation, stop or StopRequest()
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
        self.optimizer: torch.optim.Optimizer | None = None
        self.params_by_name = dict(model.named_parameters())
        self.nonfinite = FirstNonFinite()  # checked where the loop reads results anyway, never per step
        self.compiled_calls: Counter = Counter()  # training steps per batch shape on the compiled text path

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def fit(self, state: TrainState, resumed: dict | None = None):
        """Train every phase; returns the last phase's (test metrics, test predictions, parameter counts).

        ``resumed``: a resume checkpoint (:func:`clipqa.training.checkpoint.latest_resume`) to continue from.
        """
        if resumed is not None:
            self.restore(state, resumed)
        resume_at = state.phase
        for p_idx, phase in enumerate(self.phases):
            if p_idx < resume_at:  # finished before a restart
                state.trained_parts |= phase.trains
                continue
            counts = self.start_phase(p_idx, phase, state, resumed if p_idx == resume_at else None)
            self.train_phase(p_idx, phase, state)
            test, preds = self.end_phase(p_idx, phase, state)
        return test, preds, counts

    def start_phase(self, p_idx: int, phase: Phase, state: TrainState, resumed: dict | None) -> dict[str, int]:
        counts = apply_freeze(self.model, **phase.freeze)
        state.trained_parts |= phase.trains
        mid_phase = resumed is not None and state.phase_started
        if p_idx == 0 and not mid_phase:
            self.tracker.log_params(counts)
        log.info(
            "phase %s: %d epoch(s) at lr %g, %s trainable parameters <trainer.phases[%d]>",
            phase.name,
            phase.epochs,
            phase.lr,
            f"{counts['params/trainable']:,}",
            p_idx,
        )
        if resumed is not None:
            self.restore_optimizer(resumed, phase)  # mid-phase: as it was; at a phase boundary: the previous phase's
        if not mid_phase:  # the phase begins: its optimizer, its position, a fresh best
            self.phase_optimizer(phase)
            state.phase, state.epoch, state.batch, state.phase_start = p_idx, 0, 0, state.step
            state.phase_started = True
            state.best = Best(-1.0, state.step, trainable_state(self.model, state.trained_parts))
        self.model.train()
        return counts

    def train_phase(self, p_idx: int, phase: Phase, state: TrainState) -> None:
        steps = self.phase_steps(phase)
        bar = tqdm(total=steps, initial=state.step - state.phase_start, desc="training", unit="step")
        first_epoch, first_batch = state.epoch, state.batch
        for epoch in range(first_epoch, phase.epochs):
            if state.step - state.phase_start >= steps:
                break
            first = first_batch if epoch == first_epoch else 0
            if first < self.loaders.batches_per_epoch:  # (a checkpoint at an epoch's end resumes with the next)
                self.train_epoch(p_idx, phase, epoch, first, state, bar, steps)
        bar.close()

    def train_epoch(self, p_idx, phase, epoch, first, state: TrainState, bar, steps: int) -> None:
        """Epoch ``epoch`` of the phase from batch ``first``, until its end or the phase's ``steps``."""
        bar.set_description(f"{phase.name} epoch {epoch + 1}/{phase.epochs}")
        self.loaders.sampler.epoch = sum(p.epochs for p in self.phases[:p_idx]) + epoch  # a new order every epoch
        self.loaders.sampler.start = first * self.t.batch_size
        state.phase, state.epoch, state.batch = p_idx, epoch, first
        timer = StepTimer(state)
        for batch in self.loaders.train:
            state.batch += 1
            if batch is None:  # every image of the batch unreadable (data.on_bad_image=skip)
                continue
            loss = self.step(batch, phase, state)
            bar.update(1)
            log_now = state.step % self.t.log_every == 0 or state.step == state.phase_start + 1
            loss_value = self.read_loss(loss, state) if log_now else None  # a host sync: only when logging
            timer.lap()
            if log_now:
                self.log_step(state, loss_value, bar)
            in_phase = state.step - state.phase_start
            if in_phase % self.t.eval_every == 0 and in_phase < steps:
                self.validate(state)
            if in_phase >= steps:
                break
            if state.batch < self.loaders.batches_per_epoch:  # the epoch's end has its own checkpoint below
                self.checkpoint_if_due(state)
            timer.restart()
        in_phase = state.step - state.phase_start
        if in_phase % self.t.eval_every != 0 or in_phase >= steps:  # the epoch's end, unless just validated
            self.validate(state)
        state.batch = self.loaders.batches_per_epoch
        self.save_checkpoint(state)
        self.stop_if_requested(state)

    def step(self, batch: dict[str, torch.Tensor], phase: Phase, state: TrainState) -> torch.Tensor:
        """One optimizer step; returns the loss (still on the device).

        Nothing here makes the host wait for the GPU (tests/training/test_sync_free.py): the next step's kernels are
        queued
        while this one runs. A non-finite loss is noted on the device and raised at the next read (logging,
        validation, checkpoint), naming the step where it happened.
        """
        n = batch.pop("n_real", None)  # rows padding the batch to its fixed size under CUDA graphs are not examples
        batch = to_device(batch, self.device)
        n = batch["labels"].shape[0] if n is None else n
        shape = tuple(batch["input_ids"].shape)  # (B, T)
        compiled = self.model.graphed_text is not None or self.model.compiled_text is not None
        if compiled and self.compiled_calls[shape] < 3:  # compiled, CUDA-graph warm-up, recorded: the risky calls
            self.compiled_calls[shape] += 1
            loss = self.first_calls(batch, state)
        else:
            loss = self.forward_backward(batch, state)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        state.step, state.seen, state.seen_here = state.step + 1, state.seen + n, state.seen_here + n
        return loss

    def forward_backward(self, batch: dict[str, torch.Tensor], state: TrainState) -> torch.Tensor:
        if self.model.graphed_text is not None:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the previous step's graph outputs are done
        with autocast(self.device, self.precision):
            logits = forward(self.model, batch)  # (B, C)
            loss = F.cross_entropy(logits.float(), batch["labels"])  # padding rows' label is ignore_index
        self.nonfinite.note(loss.detach(), state.step, state.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss

    def first_calls(self, batch: dict[str, torch.Tensor], state: TrainState) -> torch.Tensor:
        """:meth:`forward_backward` while torch.compile may still compile or record this shape. If that raises, the
        run goes on with the eager text path (once, with a warning, tagged ``clipqa.compile_fallback``), redoing the
        step with the same random numbers. Only an error falls back, never a numerical difference."""
        rng = rng_state(self.device)
        try:
            return self.forward_backward(batch, state)
        except ClipqaError:
            raise
        except Exception as e:  # inductor, dynamo and CUDA-graph failures have many types
            self.fall_back(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}", state)
            set_rng_state(rng, self.device)
            return self.forward_backward(batch, state)

    def fall_back(self, error: str, state: TrainState) -> None:
        log.warning(
            "torch.compile failed at step %d (%s); training on with the eager text path. Pass trainer.compile=off "
            "to skip compiling <trainer.compile=%s>",
            state.step + 1,
            error,
            self.t.compile,
        )
        self.model.graphed_text = self.model.compiled_text = None
        state.compile_fallback = error
        self.tracker.set_tags({"clipqa.compile_fallback": error})

    def end_phase(self, p_idx: int, phase: Phase, state: TrainState) -> tuple[dict[str, float], dict[int, int]]:
        """Test the phase's best weights on the full test split; the next phase starts from them."""
        self.model.load_state_dict(state.best.state, strict=False)
        test, preds = evaluate(self.model, self.loaders.test, self.device, self.precision, "test")
        if len(self.phases) > 1:
            per_phase = {f"phase/{phase.name}/{k}": v for k, v in {**test, VAL_ACC: state.best.acc}.items()}
            state.phase_metrics.update(per_phase)
            self.tracker.log_metrics(per_phase, state.step)
            log.info("phase %s: test/acc %.4f, val/acc %.4f", phase.name, test[TEST_ACC], state.best.acc)
        if p_idx + 1 < len(self.phases):  # a checkpoint at the boundary: the next phase has not started
            state.phase, state.epoch, state.batch, state.phase_start = p_idx + 1, 0, 0, state.step
            state.phase_started = False
            self.save_checkpoint(state)
        return test, preds

    # ---- pieces of the loop -----------------------------------------------------------------------------------------
    def phase_steps(self, phase: Phase) -> int:
        steps = phase.epochs * self.loaders.batches_per_epoch
        return min(steps, self.t.max_steps) if self.t.max_steps is not None else steps

    def phase_optimizer(self, phase: Phase) -> None:
        """A fresh optimizer, or (``fresh_optimizer: false``) the previous phase's state with newly unfrozen
        parameters joining as a new group; either way at the phase's learning rate."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer is None or phase.fresh_optimizer:
            self.optimizer = build_optimizer(self.ocfg, trainable, lr=phase.lr)
            return
        known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        new = [p for p in trainable if id(p) not in known]
        if new:
            self.optimizer.add_param_group({"params": new})
        for g in self.optimizer.param_groups:
            g["lr"] = phase.lr

    def read_loss(self, loss: torch.Tensor, state: TrainState) -> float:
        """The loss as a number (a host sync), after checking that no step since the last read had a non-finite one."""
        self.raise_if_nonfinite(state)
        return loss.item()

    def raise_if_nonfinite(self, state: TrainState) -> None:
        if (bad := self.nonfinite.first()) is None:
            return
        loss, step, epoch = bad
        phase = self.phases[state.phase]
        raise ClipqaError(
            f"Non-finite loss {loss} at step {step} (phase {phase.name}, epoch {epoch}, lr {phase.lr:g}). Lower "
            "optimizer.lr or use trainer.precision=fp32."
        )

    def log_step(self, state: TrainState, loss_value: float, bar) -> None:
        rate = state.seen_here / state.seconds
        bar.set_postfix(loss=f"{loss_value:.3f}", ex_s=f"{rate:.1f}")
        row = {
            TRAIN_LOSS: loss_value,
            "train/examples_per_s": rate,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "epoch": state.epoch,
            "phase": state.phase,
        }
        state.history.append({"step": state.step, **{k: v for k, v in row.items() if k != "train/examples_per_s"}})
        self.tracker.log_metrics(row, state.step)

    def validate(self, state: TrainState) -> None:
        """Validate; keep a copy of the weights if they are the phase's best; let a sweeper prune the run."""
        self.raise_if_nonfinite(state)
        val, _ = evaluate(self.model, self.loaders.val, self.device, self.precision, "val")
        state.history.append({"step": state.step, **val})
        self.tracker.log_metrics(val, state.step)
        log.info("step %d: val/acc %.4f val/loss %.4f", state.step, val[VAL_ACC], val[VAL_LOSS])
        if val[VAL_ACC] > state.best.acc:  # a copy of the weights, not a reference
            state.best = Best(val[VAL_ACC], state.step, trainable_state(self.model, state.trained_parts))
        if self.on_validation is not None:
            self.on_validation(val[VAL_ACC], state.step)  # e.g. Optuna pruning: may raise optuna.TrialPruned

    # ---- resume and stopping ----------------------------------------------------------------------------------------
    def checkpoint_if_due(self, state: TrainState) -> None:
        """Every ``trainer.checkpoint_every`` steps; on SIGTERM/SIGUSR2 save now, then stop."""
        every = self.t.checkpoint_every
        if every is not None and state.step % every == 0 or self.stop.requested:
            self.save_checkpoint(state)
        self.stop_if_requested(state)

    def stop_if_requested(self, state: TrainState) -> None:
        if self.stop.requested:
            raise Preempted(f"stopped by {self.stop.reason} at step {state.step}; re-run the same command to resume")

    def save_checkpoint(self, state: TrainState) -> None:
        """A resume checkpoint; none under ``trainer.checkpoint_every=null`` unless a signal asks the run to stop."""
        self.raise_if_nonfinite(state)  # never a checkpoint of weights that a non-finite loss has reached
        if self.t.checkpoint_every is not None or self.stop.requested:
            save_resume(self.out, self.resume_state(state), self.t.keep_checkpoints)

    def resume_state(self, state: TrainState) -> dict:
        """Everything needed to continue after ``state``'s position as if the run had never stopped."""
        opt, names = self.optimizer, {id(p): n for n, p in self.params_by_name.items()}
        return {
            "config": self.config,
            "step": state.step,
            "seen": state.seen,
            "phase": state.phase,
            "epoch": state.epoch,
            "batch": state.batch,
            "phase_start": state.phase_start,
            "phase_started": state.phase_started,
            "model": trainable_state(self.model, state.trained_parts),
            "trained_parts": sorted(state.trained_parts),
            "history": state.history,
            "phase_metrics": state.phase_metrics,
            "optimizer": opt.state_dict() if opt else None,
            "optimizer_groups": [[names[id(p)] for p in g["params"]] for g in opt.param_groups] if opt else None,
            "scaler": self.scaler.state_dict(),
            "best": {"acc": state.best.acc, "step": state.best.step, "state": state.best.state},
            "rng": rng_state(self.device),  # the CPU's generator and, on a GPU, the GPU's (dropout draws there)
            "compile_fallback": state.compile_fallback,
            "mlflow_run_id": self.tracker.run_id,
        }

    def restore(self, state: TrainState, resumed: dict) -> None:
        """Weights, counters, position, history and RNG exactly as they were at the checkpoint."""
        self.model.load_state_dict(resumed["model"], strict=False)
        state.trained_parts |= set(resumed["trained_parts"])
        state.history[:] = resumed["history"]
        state.phase_metrics.update(resumed["phase_metrics"])
        state.step, state.seen = resumed["step"], resumed["seen"]
        state.phase, state.epoch, state.batch = resumed["phase"], resumed["epoch"], resumed["batch"]
        state.phase_start, state.phase_started = resumed["phase_start"], resumed.get("phase_started", True)
        state.best = Best(**resumed["best"])
        set_rng_state(resumed["rng"], self.device)
        if resumed.get("compile_fallback"):  # the compiled path failed before the restart: do not try it again
            self.model.graphed_text = self.model.compiled_text = None
            state.compile_fallback = resumed["compile_fallback"]

    def restore_optimizer(self, resumed: dict, phase: Phase) -> None:
        """The checkpoint's optimizer: the same parameter groups, then its state (learning rates included)."""
        if resumed["optimizer"] is None:  # a checkpoint from before the first step
            return
        groups = [[self.params_by_name[n] for n in g] for g in resumed["optimizer_groups"]]
        self.optimizer = build_optimizer(self.ocfg, groups[0], lr=phase.lr)
        for g in groups[1:]:
            self.optimizer.add_param_group({"params": g})
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scaler.load_state_dict(resumed["scaler"])
