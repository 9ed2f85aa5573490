"""Checkpoints: a run's ``best.pt`` (written and read here) and the resume checkpoints of an interrupted run.

``best.pt`` holds the resolved config (a plain dict), the weights of every part that trained (frozen pretrained
parts are re-loaded from ``vision_source``/``text_source`` with ``from_pretrained``), the answer classes and the
run's metrics. Rebuild the model without Hydra::

    from clipqa.training.checkpoint import load_checkpoint
    model, backbone, classes = load_checkpoint("outputs/.../best.pt")

A resume checkpoint (``<run folder>/checkpoints/step_<N>.pt``, written atomically: temp file, then rename; the last
``trainer.keep_checkpoints`` are kept) holds everything the loop needs to continue as if it had never stopped
(:meth:`clipqa.training.loop.Trainer.resume_state`): weights of every part that trains, optimizer and grad-scaler state,
the torch RNG state, the data position (phase, epoch, batches done), step counters, the phase's best weights, the
history, earlier phases' test metrics, and the MLflow run id (a resumed run continues the same MLflow run).
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from clipqa.errors import ClipqaError
from clipqa.models.backbones import Backbone, load_sources
from clipqa.models.freeze import PARTS, apply_freeze
from clipqa.models.model import ClipQA
from clipqa.training.build import build_model
from clipqa.training.schedule import resolve_phases

log = logging.getLogger(__name__)

FORMAT = "clipqa-checkpoint-v1"
RESUME_FORMAT = "clipqa-resume-v1"


# ---- loading: tensors and plain containers only ----------------------------------------------------------------
def safe_load(path: str | Path, what: str) -> dict:
    """``torch.load(path, weights_only=True)``: tensors and plain containers, never arbitrary Python objects.

    Why: a checkpoint from a shared artifact store or a colleague's folder could otherwise run code while it is
    unpickled. Everything clipqa writes (best.pt, resume checkpoints) is tensors, numbers, strings, lists and dicts,
    so it loads this way. A file that needs more is refused, naming it; so is an unreadable one.
    """
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive
        raise ClipqaError(
            f"{what}: {path} is not a readable checkpoint (not a torch.save archive); the file is damaged or of "
            "another kind. Pass the best.pt of a finished clipqa run."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ClipqaError(f"{what}: {path} is not a readable checkpoint ({str(e).splitlines()[0]}).") from None
        raise ClipqaError(
            f"{what}: refusing to load {path}: it holds Python objects beyond tensors and plain containers, and "
            "loading them would run code from the file. clipqa never writes such files; this one was made by "
            "something else or altered. Use a best.pt written by a clipqa run you trust."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClipqaError(
            f"{what}: {path} is not a readable checkpoint ({type(e).__name__}: {first}); the file is damaged or of "
            "another kind. Pass the best.pt of a finished clipqa run."
        ) from None
    if not isinstance(ckpt, dict):
        raise ClipqaError(f"{what}: {path} is not a clipqa checkpoint (a {type(ckpt).__name__}, not a dict).")
    return ckpt


# ---- best.pt ----------------------------------------------------------------------------------------------------
def save_best(path: Path, **fields) -> None:
    """Write ``best.pt`` atomically (temp file, then rename): ``fields`` plus the format tag."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **fields}, tmp)
    os.replace(tmp, path)


def read_best(path: str | Path, what: str) -> dict:
    """The contents of a ``best.pt``; ``what`` names where the path came from in the error (e.g. a config key)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ClipqaError(f"{what}: no such file {path}. Pass the best.pt of an earlier run.")
    ckpt = safe_load(p, what)
    if ckpt.get("format") != FORMAT:
        raise ClipqaError(
            f"{what}: {path} is not a clipqa checkpoint (expected format {FORMAT}); pass a run's best.pt."
        )
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ClipQA, Backbone, list[str]]:
    """Return ``(model in eval mode, backbone with tokenizer/image processor, class names)``.

    Raises ClipqaError when the file is not a clipqa checkpoint or its backbone sources cannot be loaded.
    """
    model, backbone, ckpt = restore_model(path, device)
    return model, backbone, list(ckpt["classes"])


def restore_model(
    path: str | Path, device: str | torch.device = "cpu", sources: tuple[str, str] | None = None
) -> tuple[ClipQA, Backbone, dict]:
    """The trained model (eval mode), its backbone, and the checkpoint's contents.

    ``sources``: (vision, text) folders to load the pretrained parts from instead of the recorded ones (an MLflow
    model carries copies of local backbone folders).
    """
    ckpt = read_best(path, "checkpoint")
    cfg = OmegaConf.create(ckpt["config"])
    backbone = load_sources(*(sources or (ckpt["vision_source"], ckpt["text_source"])))
    model = build_model(cfg, backbone, len(ckpt["classes"]))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    trained = tuple(f"{n}." for n in PARTS if n not in ckpt["frozen"])
    if unexpected or any(k.startswith(trained) for k in missing):
        raise ClipqaError(f"{path} does not match its own config (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    apply_freeze(model, **resolve_phases(cfg)[-1].freeze)  # as in the run's last phase, which tested these weights
    return model.to(device).eval(), backbone, ckpt


def load_init(model: ClipQA, path: str) -> set[str]:
    """Warm start (``trainer.init_from``): load the trained weights of an earlier run's best.pt; return their parts."""
    ckpt = read_best(path, f"trainer.init_from={path}")
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatch: another mapper width, head, or backbone
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ClipqaError(
            f"trainer.init_from={path} does not fit this model ({first}). Use the same backbone, mapper and head "
            "settings as the run that wrote it."
        ) from None
    if unexpected:
        raise ClipqaError(f"trainer.init_from={path} has weights this model lacks: {unexpected[:3]}.")
    log.info("warm start from %s (its best step %s) <trainer.init_from>", path, ckpt.get("best_step"))
    return {k.split(".", 1)[0] for k in ckpt["state_dict"]}


# ---- resume checkpoints -----------------------------------------------------------------------------------------
def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_resume(out: Path, state: dict, keep: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/step_<step>.pt``; delete all but the newest ``keep``."""
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:08d}.pt"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    torch.save({"format": RESUME_FORMAT, **state}, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_resume(out: Path, resolved_config: dict) -> dict | None:
    """The newest readable resume checkpoint of this run folder, or None. A checkpoint written with another
    config is refused (naming the differing keys) rather than silently mixed into this run."""
    folder = checkpoint_dir(out)
    for path in sorted(folder.glob("step_*.pt"), reverse=True) if folder.is_dir() else []:
        try:
            state = safe_load(path, "resume (trainer.resume=auto)")
        except ClipqaError as e:
            if "refusing" in str(e):  # not a damaged file but one that would run code: stop, do not skip it
                raise
            log.warning("ignoring unreadable checkpoint %s (%s)", path, e)  # a damaged disk (writes are atomic)
            continue
        if state.get("format") != RESUME_FORMAT:
            continue
        if not same_run(state["config"], resolved_config):
            diff = _diff(_comparable(state["config"]), _comparable(resolved_config))
            raise ClipqaError(
                f"{out} holds checkpoints of a run with another config (differs in: {', '.join(diff[:5])}). "
                "Use a new output folder (hydra.run.dir=...), delete its checkpoints/ to start over, or pass "
                "trainer.resume=never."
            )
        log.info("resuming from %s (step %d) <trainer.resume=auto>", path, state["step"])
        return state
    return None


def same_run(a: dict, b: dict) -> bool:
    """Whether two resolved configs describe the same run (keys that may change on a restart are left out)."""
    return _comparable(a) == _comparable(b)


def _comparable(cfg: dict) -> dict:
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
