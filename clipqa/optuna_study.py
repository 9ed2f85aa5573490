"""Optuna helpers shared by the sweeper plugin (hydra_plugins/clipqa_optuna_sweeper) and the training job.

The job side is :func:`pruning_callback`: the sweeper passes ``+optuna.storage``, ``+optuna.study_name`` and
``+optuna.trial_id`` as overrides; the job re-opens the study from the storage and reports its validation accuracy
to that very trial after each evaluation, raising ``optuna.TrialPruned`` when the pruner says so.
"""

from __future__ import annotations

from pathlib import Path

from clipqa.errors import ClipqaError
from clipqa.paths import absolute_sqlite, project_sqlite


def default_storage() -> str:
    return project_sqlite("optuna.db")


def make_storage(url: str | None):
    """An Optuna storage from a URL: any RDB URL (sqlite:///..., postgresql://...) or ``journal:///path/file.log``.

    A relative sqlite path is made absolute, so every job of a sweep opens the same file.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = url or default_storage()
    if url.startswith("journal://"):
        path = Path(url[len("journal://") :]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url = absolute_sqlite(url)
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        )
    except Exception as e:
        raise ClipqaError(
            f"Cannot open the Optuna storage {url!r} (hydra.sweeper.storage): {e}. Use sqlite:///PATH.db, "
            "journal:///PATH.log or a database URL such as postgresql://user:pw@host/db."
        ) from None


def make_pruner(p):
    """The pruner named by ``hydra.sweeper.pruner`` (median | hyperband | none); the job builds the same one."""
    import optuna

    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(p.n_startup_trials), n_warmup_steps=int(p.n_warmup_steps)
        )
    if p.name == "hyperband":
        max_resource = p.max_resource if p.max_resource == "auto" else int(p.max_resource)
        return optuna.pruners.HyperbandPruner(
            min_resource=int(p.min_resource), max_resource=max_resource, reduction_factor=int(p.reduction_factor)
        )
    if p.name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"hydra.sweeper.pruner.name={p.name!r}: choose median, hyperband or none")


def pruning_callback(ocfg):
    """``on_validation(val_acc, step)`` for :func:`clipqa.run.train` that reports to the job's Optuna trial."""
    import optuna

    study = optuna.load_study(
        study_name=ocfg.study_name, storage=make_storage(ocfg.storage), pruner=make_pruner(ocfg.pruner)
    )
    trial = optuna.trial.Trial(study, int(ocfg.trial_id))

    def report(value: float, step: int) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"trial {ocfg.trial} pruned at step {step} (val/acc {value:.4f})")

    return report
