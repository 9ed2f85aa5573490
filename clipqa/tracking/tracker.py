"""Per-run tracking: the :class:`Tracker` the training loop calls, and its MLflow backend (queued writes).

- One MLflow run per training run, named from its overrides (``mapper.num_layers=2,freeze=text``), never random.
- Default store: ``sqlite:///<project folder>/mlflow.db`` (absolute, so every run of every sweep lands in one store
  whatever the working directory), artifacts in ``<project folder>/mlartifacts``. ``tracking.uri`` and
  ``tracking.experiment`` point at any tracking server; ``tracking=none`` turns tracking off.
- A Hydra multirun gets a parent run (:class:`clipqa.sweep.mlflow_parent.MlflowSweepCallback`, registered in
  ``conf/config.yaml``) created in the launching process before any job starts (which also initialises a fresh
  SQLite store once: two processes creating it at once fail in MLflow 3.17). Jobs, also in other processes (joblib
  launcher), find it through a small file in the sweep folder and nest under it (``mlflow.parentRunId``).
- ``mlflow`` is imported lazily, so ``tracking=none`` runs never pay for it.
- The rest of :mod:`clipqa.tracking`: run names and the sweep's parent (``run_info``), URIs (``uris``), the
  server preflight (``preflight``), Ctrl-C held during a write (``interrupts``), the pending-file sync (``pending``).
- A shared server with logins (MLflow's basic-auth app): credentials come only from MLFLOW_TRACKING_USERNAME /
  MLFLOW_TRACKING_PASSWORD (a URI with credentials is refused); a refused login or a missing permission on the
  experiment stops the run before training with one error (:func:`server_errors`, also around the sweep's parent).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from clipqa.errors import ClipqaError
from clipqa.tracking.interrupts import ctrl_c_after
from clipqa.tracking.pending import PENDING_FILE, encode_op
from clipqa.tracking.preflight import fail_fast_http, first_use_lock, get_or_create_experiment, server_errors
from clipqa.tracking.reaped import revive_if_reaped
from clipqa.tracking.run_info import OVERRIDES_TAG, RunInfo, git_commit, overrides_tag, read_parent, run_name
from clipqa.tracking.uris import process_wide, resolve_uri, without_credentials

log = logging.getLogger(__name__)

SWEEP_JOB_WAIT_S = 120  # a sweep's job waits this long for a tracking server that restarts (a single run fails fast)
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value; longer values live in the config.yaml artifact


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"mapper": {"num_layers": 2}} -> {"mapper.num_layers": 2}``; lists are kept as values."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


class Tracker:
    """The interface the training loop uses. This base class records nothing (``tracking=none``)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_model(self, checkpoint: Path, example: dict, register_as: str | None, backbone_dirs: dict) -> None: ...

    def finish(self, status: str = "FINISHED", error: str | None = None, run_dir: Path | None = None) -> None: ...


class MlflowTracker(Tracker):
    """One MLflow run, written through ``MlflowClient`` (explicit run ids: no global active-run state).

    Tracking faults never stop training: a write that fails (server down, database locked) is queued, a warning
    says what was not logged, and the queue is replayed in order at the next write once the server answers again,
    and at the end of the run. What still cannot be written then is kept in ``<run folder>/mlflow_pending.json`` and
    uploaded later with ``clipqa-sync <run folder>``.
    """

    RETRY_AFTER_S = 5.0  # after a failure, wait this long before trying the server again
    REAPED_CHECK_S = 30.0  # this often (at a write), whether a reaper ended the run as a dead worker's: RUNNING again
    _reaped_checked_at = float("-inf")
    wait_s = 0.0  # how long an unreachable server is waited for, at the start and at the end (a sweep's job: longer)

    def __init__(self, uri: str, experiment: str, name: str, tags: dict[str, str], run_id: str | None = None,
                 wait_s: float = 0):  # fmt: skip
        from mlflow.tracking import MlflowClient

        fail_fast_http()  # we queue and retry ourselves
        self.uri = uri
        with first_use_lock(uri):  # (a SQLite store's schema is created here, on the client's first connection)
            self.client = MlflowClient(tracking_uri=uri)
        self.pending: list[tuple[str, tuple, dict]] = []
        self.failed_at = 0.0
        if run_id is not None:  # resume: the same run continues
            self.run_id = run_id
            with server_errors(uri, experiment):
                self.client.update_run(run_id, status="RUNNING")
            log.info("continuing MLflow run %s at %s <trainer.resume=auto>", run_id, uri)
            return
        # The first calls are the preflight: a bad login, a missing permission or no server stop here, before
        # training, with one clear error (later write failures are queued instead: see _call).
        # ``wait_s`` (a sweep's job): an unreachable server (restarting) is waited for that long, here and at the end.
        self.wait_s, deadline = wait_s, time.monotonic() + wait_s
        while True:
            try:
                with server_errors(uri, experiment):
                    self.experiment_id = get_or_create_experiment(self.client, experiment, uri)
                    run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
                break
            except ClipqaError as e:  # (server_errors's wording for no answer at all; a refused login is not retried)
                if not str(e).startswith("Cannot reach") or time.monotonic() > deadline:
                    raise
                log.warning("MLflow tracking server unreachable at %s: this sweep job waits for it", uri)
                time.sleep(self.RETRY_AFTER_S)
        self.run_id = run.info.run_id
        log.info("MLflow run %r (%s) in experiment %r at %s <tracking.uri>", name, self.run_id, experiment, uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = []
        for k, v in params.items():
            s = json.dumps(v) if isinstance(v, list | tuple) else str(v)
            if len(s) > MAX_PARAM_LEN:
                s = s[: MAX_PARAM_LEN - 40] + "... (truncated; see config.yaml)"
            items.append(Param(k, s))
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._call("log_batch", self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, int | float) and v == v
        ]  # NaN (absent type) is not logged
        for i in range(0, len(items), 1000):
            self._call("log_batch", self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("log_batch", self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.run_id, str(path), artifact_path)

    def log_model(self, checkpoint: Path, example: dict, register_as: str | None, backbone_dirs: dict) -> None:
        """The trained model as an MLflow pyfunc model named ``model`` (:mod:`clipqa.inference.pyfunc`), listed under
        the run's *Models*, optionally registered. ``example``: one input row (image bytes + question) for the UI and
        MLflow's check that the logged model loads and answers. A failure is a warning, as for every write."""
        import mlflow
        import pandas as pd
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        signature = ModelSignature(
            inputs=Schema(
                [
                    ColSpec("binary", "image", required=False),
                    ColSpec("string", "image_path", required=False),
                    ColSpec("string", "question"),
                ]
            ),
            outputs=Schema([ColSpec("string", "answer"), ColSpec("double", "probability")]),
        )
        try:
            with process_wide(self.uri), ctrl_c_after(), mlflow.start_run(run_id=self.run_id):
                mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(
                        Path(__file__).parents[1] / "inference" / "pyfunc.py"
                    ),  # a model from code: nothing pickled
                    artifacts={"checkpoint": str(checkpoint), **backbone_dirs},
                    signature=signature,
                    input_example=pd.DataFrame([example]),
                    registered_model_name=register_as,
                    pip_requirements=_model_requirements(),
                )
            log.info("logged the MLflow model runs:/%s/model <tracking.log_model>", self.run_id)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            log.warning(
                "could not log the MLflow model (%s): %s; best.pt is in the run folder", type(e).__name__, first
            )

    def finish(self, status: str = "FINISHED", error: str | None = None, run_dir: Path | None = None) -> None:
        import time

        if error:
            self.set_tags({"error": error})
        self._check_reaped(force=True)
        self._call("set_terminated", self.run_id, status=status)
        tries = max(6, int(self.wait_s // self.RETRY_AFTER_S) if self.RETRY_AFTER_S else 0)
        for _ in range(tries):  # the server may be coming back: give the queue a last chance
            if not self.pending:
                return
            time.sleep(self.RETRY_AFTER_S)
            self._flush()
        if self.pending and run_dir is not None:
            ops = [encode_op(method, args, kwargs) for method, args, kwargs in self.pending]
            (run_dir / PENDING_FILE).write_text(json.dumps({"uri": without_credentials(self.uri), "ops": ops}))
            log.warning(
                "%d MLflow writes could not be made; upload them later with: clipqa-sync %s",
                len(self.pending),
                run_dir,
            )

    # --- fault tolerance -----------------------------------------------------------------------------------------
    def _check_reaped(self, force: bool = False) -> None:
        """A run ended KILLED by a reaper while alive (clipqa.tracking.reaped) is RUNNING again."""
        import time

        if not self.pending and (force or time.monotonic() - self._reaped_checked_at >= self.REAPED_CHECK_S):
            self._reaped_checked_at = time.monotonic()
            try:
                revive_if_reaped(self.client, self.run_id)
            except Exception as e:  # the server is away: checked again later
                log.debug("could not check whether run %s was reaped: %s", self.run_id, e)

    def _flush(self) -> bool:
        """Replay queued writes in order; True when the queue is empty."""
        import time

        while self.pending:
            method, args, kwargs = self.pending[0]
            try:
                with ctrl_c_after():
                    getattr(self.client, method)(*args, **kwargs)
            except Exception as e:
                self.failed_at = time.monotonic()
                log.debug("MLflow still unreachable: %s", e)
                return False
            self.pending.pop(0)
        log.warning("MLflow reachable again at %s: queued writes were logged", self.uri)
        return True

    def _call(self, method: str, *args, **kwargs) -> None:
        import time

        if self.pending:
            if time.monotonic() - self.failed_at < self.RETRY_AFTER_S or not self._flush():
                self.pending.append((method, args, kwargs))
                return
        try:
            with ctrl_c_after():
                getattr(self.client, method)(*args, **kwargs)
            if method != "set_terminated":
                self._check_reaped()
        except Exception as e:
            self.failed_at = time.monotonic()
            self.pending.append((method, args, kwargs))
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            log.warning(
                "MLflow write failed (%s): %s; training goes on, the write is queued and retried", method, first
            )


def _model_requirements() -> list[str]:
    """What the logged model needs besides clipqa itself (not on PyPI: install it where the model is loaded)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "tokenizers", "pillow", "omegaconf", "hydra-core", "mlflow", "pandas"]
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def make_tracker(cfg: DictConfig, info: RunInfo, run_id: str | None = None) -> Tracker:
    """Start the run's tracker from ``cfg.tracking`` and log the flattened resolved config as params.

    ``run_id``: continue that MLflow run (a resumed training run) instead of creating one.
    """
    t = cfg.tracking
    if t.backend == "none":
        return Tracker()
    uri = resolve_uri(t.uri)
    if run_id is not None:
        return MlflowTracker(uri, t.experiment, "", {}, run_id=run_id)
    parent = read_parent(info.sweep_dir) if info.multirun else None
    tags = {OVERRIDES_TAG: overrides_tag(info.overrides)}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    if info.multirun:
        tags.update({"hydra.job.num": str(info.job_num), "hydra.sweep.dir": str(info.sweep_dir)})
    if "optuna" in cfg:
        tags.update({"optuna.trial": str(cfg.optuna.trial), "optuna.study_name": str(cfg.optuna.study_name)})
    if parent:
        tags["mlflow.parentRunId"] = parent["run_id"]
        tags["hydra.sweep.id"] = parent["run_id"]
    name = t.run_name or run_name(info, parent["swept"] if parent else None)
    tracker = MlflowTracker(uri, t.experiment, name, tags, wait_s=SWEEP_JOB_WAIT_S if info.multirun else 0)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    tracker.log_params(flatten(resolved))
    return tracker
