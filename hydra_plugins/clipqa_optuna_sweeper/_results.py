"""Outcomes and results: a job's return value told to Optuna (COMPLETE, PRUNED, or FAIL with the reason), and at the
end ``optimization_results.yaml`` (Hydra's Optuna sweeper's keys: ``best_params``/``best_value``, or ``solutions``
for a multi-objective study) plus ``pareto_front.png`` for two objectives, in the sweep folder.
"""

from __future__ import annotations

import logging
import math
import numbers
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from .hooks import Results

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
FRONT_PLOT = "pareto_front.png"


def objective_values(value: Any, n_objectives: int) -> tuple[list[float] | None, str | None]:
    """The job's return value as Optuna values, or the reason it is not one (the trial is then FAIL)."""

    def show(v: Any) -> str:
        text = repr(v)
        return f"{text[:80]}..." if len(text) > 80 else text

    if n_objectives == 1:
        items = [value]
    elif isinstance(value, str | bytes | dict | DictConfig) or not hasattr(value, "__len__"):
        return None, f"returned {show(value)}, not a list of {n_objectives} numbers (one per hydra.sweeper.direction)"
    else:
        items = list(value)
        if len(items) != n_objectives:
            return None, f"returned {len(items)} values for {n_objectives} objectives (hydra.sweeper.direction)"
    values = []
    for v in items:
        number = not isinstance(v, bool | str | bytes) and (
            isinstance(v, numbers.Real) or (hasattr(type(v), "__float__") and getattr(v, "ndim", 0) == 0)
        )
        if not number:
            return None, f"returned {show(v)} ({type(v).__name__}), not a number"
        values.append(float(v))
        if math.isnan(values[-1]):
            return None, "returned nan"
    return values, None


def tell(study, storage, trial, ret: JobReturn, n_objectives: int, grid: bool, grace_period: int) -> str | None:
    """Tell Optuna the job's outcome; the reason when the trial failed, else None."""
    import optuna
    from optuna.trial import TrialState

    if storage.get_trial(trial._trial_id).state.is_finished():  # failed by another worker as stale
        log.warning(
            "trial %d was failed by another worker while it ran here: no heartbeat from this process reached "
            "the storage for hydra.sweeper.grace_period=%d s (is the database reachable?); its result is "
            "dropped and the trial retried",
            trial.number,
            grace_period,
        )
        return None
    if ret.status == JobStatus.COMPLETED:
        values, reason = objective_values(ret.return_value, n_objectives)
    elif isinstance(ret._return_value, optuna.TrialPruned):
        study.tell(trial, state=TrialState.PRUNED)
        log.info("trial %d pruned", trial.number)
        return None
    else:
        err = ret._return_value
        values, reason = None, f"{type(err).__name__}: {err}"
    if reason is not None:
        tell_failed(study, [trial], reason)
        log.warning("trial %d failed: %s", trial.number, reason)
        return reason
    try:
        study.tell(trial, values)
    except RuntimeError:  # GridSampler stops the study (study.stop) after its last point: only inside optimize()
        if not grid or study._storage.get_trial(trial._trial_id).state != TrialState.COMPLETE:
            raise
    return None


def job_lost(ret: JobReturn) -> bool:
    """Whether the launcher reported the job lost outside the app (it vanished from the cluster: killed, its node
    gone), by an exception with ``job_lost = True``: the trial is then retried like a dead worker's."""
    return ret.status != JobStatus.COMPLETED and bool(getattr(ret._return_value, "job_lost", False))


def tell_failed(study, trials, reason: str) -> None:
    from optuna.trial import TrialState

    for trial in trials:
        try:
            trial.set_user_attr("fail_reason", reason[:2000])
            study.tell(trial, state=TrialState.FAIL)
        except Exception as e:  # already finished (or the storage is gone): nothing more to record
            log.debug("could not mark trial %d failed: %s", trial.number, e)


def write_results(study, storage_shown: str, dirs: list[str], names: list[str] | None, sweep_dir: Path,
                  launched: int) -> Results:  # fmt: skip
    """Log the summary; write optimization_results.yaml (and the Pareto plot for two objectives)."""
    from optuna.trial import TrialState

    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    log.info(
        "study %r: %d trials (%d complete, %d pruned, %d failed, %d running); launched %d now",
        study.study_name,
        len(study.trials),
        counts["complete"],
        counts["pruned"],
        counts["fail"],
        counts["running"],
        launched,
    )
    results: dict[str, Any] = {
        "name": "optuna",  # as Hydra's Optuna sweeper writes it
        "sweeper": "clipqa_optuna",
        "study_name": study.study_name,
        "storage": storage_shown,
        "directions": dirs,
        "metric_names": names,
        "trials": {k: v for k, v in counts.items() if v},
    }
    files = [sweep_dir / RESULTS_FILE]
    best, front = None, []
    if counts["complete"] and len(dirs) == 1:
        best = study.best_trial
        results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
        log.info("best trial %d: %s %.6g with %s", best.number, (names or ["value"])[0], best.value, best.params)
    elif counts["complete"]:
        front = sorted(study.best_trials, key=lambda t: t.number)
        results["solutions"] = [  # the Pareto front (Hydra's key)
            {"trial": t.number, "params": t.params, "values": t.values}
            | ({"metrics": dict(zip(names, t.values, strict=True))} if names else {})
            for t in front
        ]
        log.info("Pareto front: %d trial(s)", len(front))
        for t in front:
            log.info("    trial %d: values %s with %s", t.number, t.values, t.params)
        if len(dirs) == 2 and (plot := plot_front(study, front, dirs, names, sweep_dir / FRONT_PLOT)):
            files.append(plot)
    OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
    log.info("results: %s", sweep_dir / RESULTS_FILE)
    return Results(best=best, front=front, files=files, launched=launched, counts=counts)


def plot_front(study, front, dirs: list[str], names: list[str] | None, path: Path) -> Path | None:
    """pareto_front.png: every complete trial of a two-objective study, the front highlighted and joined."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s", path.name)
        return None
    from optuna.trial import TrialState

    labels = [f"{n} ({d[:3]})" for n, d in zip(names or ["objective 0", "objective 1"], dirs, strict=True)]
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    on_front = {t.number for t in front}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rest = [t for t in done if t.number not in on_front]
    ax.scatter([t.values[0] for t in rest], [t.values[1] for t in rest], c="0.6", label="other trials")
    line = sorted(front, key=lambda t: t.values[0])
    ax.plot([t.values[0] for t in line], [t.values[1] for t in line], "o-", c="C3", label="Pareto front")
    points: dict[tuple[float, ...], list[str]] = {}
    for t in line:  # trials with the same values share one label
        points.setdefault(tuple(t.values), []).append(str(t.number))
    for (x, y), numbers_ in points.items():
        ax.annotate(", ".join(numbers_), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(f"study {study.study_name!r}: {len(front)} of {len(done)} complete trials on the front")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
