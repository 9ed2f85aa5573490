"""Where a run sits: its Hydra overrides, its sweep (job number, sweep folder, parent run) and the name it gets.

- MLflow run names come from the overrides (``mapper.num_layers=2,freeze=text``), never random (:func:`run_name`).
- A Hydra multirun's jobs find their parent run through a small file in the sweep folder (:data:`PARENT_FILE`,
  written by :class:`clipqa.sweep.mlflow_parent.MlflowSweepCallback`, read by :func:`read_parent`).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from clipqa.paths import PROJECT_DIR

PARENT_FILE = ".clipqa_mlflow_parent.json"  # in the sweep folder: how jobs find their parent run
OVERRIDES_TAG = "clipqa.overrides"  # a run's Hydra overrides, space-separated; "(none)" without any
# Keys that never name a variant: where things are written, not what is trained.
NOT_VARIANT_PREFIXES = ("hydra.", "tracking.", "paths.", "optuna.", "trainer.num_workers", "trainer.save_checkpoint")


@dataclass
class RunInfo:
    """Where a run sits: its command-line overrides, and its sweep (job number, sweep folder) when in a multirun."""

    overrides: list[str] = field(default_factory=list)
    job_num: int | None = None
    sweep_dir: str | None = None
    multirun: bool = False


def hydra_run_info() -> RunInfo:
    """RunInfo from Hydra's runtime config; an empty RunInfo when called outside ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return RunInfo()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return RunInfo(
        overrides=list(hc.overrides.task),
        job_num=hc.job.num if multirun else None,
        sweep_dir=str(Path(hc.sweep.dir).resolve()) if multirun else None,
        multirun=multirun,
    )


def override_key(override: str) -> str:
    """``+mapper.num_layers=2`` -> ``mapper.num_layers``."""
    return override.split("=", 1)[0].lstrip("+~")


def overrides_tag(overrides: list[str]) -> str:
    """The value of the run's :data:`OVERRIDES_TAG`: Hydra's override strings, space-separated."""
    return " ".join(overrides) or "(none)"


def overrides_from_tag(text: str | None) -> list[str]:
    """The override strings back from an :data:`OVERRIDES_TAG` value (``[]`` for none): split at the spaces between
    overrides, not at those inside brackets or quotes (``trainer.length_buckets=[16, 32]``)."""
    if not text or text == "(none)":
        return []
    out, current, depth, quote = [], "", 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == " " and depth <= 0:
            out, current = ([*out, current] if current else out), ""
            continue
        current += ch
    return [*out, current] if current else out


def run_name(info: RunInfo, swept: list[str] | None = None) -> str:
    """Readable and unique within a sweep: the swept overrides (all overrides for a single run)."""
    picked = [o for o in info.overrides if not override_key(o).startswith(NOT_VARIANT_PREFIXES)]
    if swept:
        picked = [o for o in picked if override_key(o) in swept] or picked
    name = ",".join(picked) or "defaults"
    trial = next((o.split("=", 1)[1] for o in info.overrides if override_key(o) == "optuna.trial"), None)
    if trial is not None:  # an Optuna trial: its number, then its sampled values
        return f"trial {trial}: {name}"
    if info.multirun and not swept:
        name = f"{name}#{info.job_num}"
    return name


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def read_parent(sweep_dir: str | None) -> dict | None:
    if not sweep_dir or not (Path(sweep_dir) / PARENT_FILE).is_file():
        return None
    return json.loads((Path(sweep_dir) / PARENT_FILE).read_text())
