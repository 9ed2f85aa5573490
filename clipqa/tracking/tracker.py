"""Experiment tracking: the only module that writes to MLflow. The training loop calls a :class:`Tracker`.

- One MLflow run per training run, named from its overrides (``mapper.num_layers=2,freeze=text``), never random.
- Default store: ``sqlite:///<project folder>/mlflow.db`` (absolute, so every run of every sweep lands in one store
  whatever the working directory), artifacts in ``<project folder>/mlartifacts``. ``tracking.uri`` and
  ``tracking.experiment`` point at any tracking server; ``tracking=none`` turns tracking off.
- A Hydra multirun gets a parent run (:class:`clipqa.sweep.mlflow_parent.MlflowSweepCallback`, registered in
  ``conf/config.yaml``) created in the launching process before any job starts (which also initialises a fresh
  SQLite store once: two processes creating it at once fail in MLflow 3.17). Jobs, also in other processes (joblib
  launcher), find it through a small file in the sweep folder and nest under it (``mlflow.parentRunId``).
- ``mlflow`` is imported lazily, so ``tracking=none`` runs never pay for it.
- A shared server with logins (MLflow's basic-auth app): credentials come only from MLFLOW_TRACKING_USERNAME /
  MLFLOW_TRACKING_PASSWORD (a URI with credentials is refused); a refused login or a missing permission on the
  experiment stops the run before training with one error (:func:`server_errors`, also around the sweep's parent).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from clipqa.errors import ClipqaError
from clipqa.paths import PROJECT_DIR, absolute_sqlite, project_sqlite

log = logging.getLogger(__name__)

PARENT_FILE = ".clipqa_mlflow_parent.json"  # in the sweep folder: how jobs find their parent run
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value; longer values live in the config.yaml artifact
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


def resolve_uri(uri: str | None) -> str:
    """``None`` -> the project's SQLite store; a relative ``sqlite:///`` path -> absolute (cwd-independent).

    A URI with credentials (``http://user:secret@host``) is refused: the override would stay in Hydra's
    ``.hydra/overrides.yaml``, ``config.yaml`` and the MLflow params; credentials come from the environment.
    """
    if uri and without_credentials(uri) != uri:
        scrub_hydra_files(uri)
        raise ClipqaError(
            "tracking.uri (or $MLFLOW_TRACKING_URI) has a user name or password in it (a URI like "
            f"{_with_placeholders(uri)}): config.yaml, Hydra's .hydra/ files and the MLflow params would keep them, so "
            f"clipqa refuses it. Fix: use tracking.uri={without_credentials(uri)} and put the credentials in the "
            "environment variables MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
        )
    return absolute_sqlite(uri) if uri else project_sqlite("mlflow.db")


def scrub_hydra_files(uri: str) -> None:
    """Replace ``uri`` by its credential-free form in the files Hydra wrote before the run started (the run's or
    the sweep's ``.hydra/*.yaml`` and ``multirun.yaml``): a refused URI must not stay on disk."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    folders = {Path(hc.sweep.dir)} if hc.mode == RunMode.MULTIRUN else set()
    if output_dir := OmegaConf.select(hc, "runtime.output_dir"):
        folders.add(Path(output_dir))
    for folder in folders:
        for f in [*folder.glob("*.yaml"), *folder.glob(".hydra/*.yaml"), *folder.glob("*.log")]:
            text = f.read_text(errors="replace")
            if uri in text:
                f.write_text(text.replace(uri, without_credentials(uri)))


def fail_fast_http() -> None:
    """Fail within seconds instead of MLflow's default minutes of HTTP retries (4 min for a server that is down)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@contextmanager
def server_errors(uri: str, experiment: str, access: str = "write to", outcome: str = "Nothing was trained."):
    """Turn what a tracking server answers at start-up into one clear :class:`ClipqaError` (exit status 2, before
    any training): no or wrong login (HTTP 401), no permission on the experiment (HTTP 403), server unreachable.
    ``access`` / ``outcome``: what the command needed and what it did not do (clipqa-report reads, writes nothing).

    MLflow's client does not retry 401/403, so a bad login is reported within a second (the tests time it).
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        shown = without_credentials(uri)
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")  # a name, not a secret: the messages show it
        has_password = bool(os.environ.get("MLFLOW_TRACKING_PASSWORD"))
        if e.error_code == "UNAUTHENTICATED":
            if user and has_password:
                why = f"did not accept user {user!r} with the password in MLFLOW_TRACKING_PASSWORD (HTTP 401)"
            else:
                names = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": has_password}
                unset = [n for n, v in names.items() if not v]
                verb = "are" if len(unset) > 1 else "is"
                why = f"asks for a login (HTTP 401), but {' and '.join(unset)} {verb} not set"
            raise ClipqaError(
                f"The MLflow tracking server {shown} <tracking.uri> {why}. Fix: set the environment variables "
                "MLFLOW_TRACKING_USERNAME (your MLflow user name) and MLFLOW_TRACKING_PASSWORD (its password; the "
                f"server's admin creates accounts). {outcome}"
            ) from None
        if e.error_code == "PERMISSION_DENIED":
            raise ClipqaError(
                f"The MLflow tracking server {shown} <tracking.uri> refused user {user or '(none)'!r} access to "
                f"experiment {experiment!r} <tracking.experiment> (HTTP 403): the user has no permission to {access} "
                "it. Fix: ask the experiment's owner or the server's admin for EDIT permission on it, or log to an "
                f"experiment of your own with tracking.experiment=NAME. {outcome}"
            ) from None
        if "failed with exception" in str(e):  # MLflow's wording for a connection that failed (no HTTP answer)
            raise ClipqaError(
                f"Cannot reach the MLflow tracking server {shown} <tracking.uri>: {_first_line(e)}. Start it (or fix "
                f"tracking.uri), or train without tracking: tracking=none. {outcome}"
            ) from None
        raise


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"mapper": {"num_layers": 2}} -> {"mapper.num_layers": 2}``; lists are kept as values."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def override_key(override: str) -> str:
    """``+mapper.num_layers=2`` -> ``mapper.num_layers``."""
    return override.split("=", 1)[0].lstrip("+~")


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


@contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """SQLite stores: one process at a time sets the database up. Why: MLflow creates and migrates a new database's
    schema on its first use, and two processes doing that at once fail inside MLflow (``Online migration expected to
    match one row``, ``duplicate column name``): two single runs or two sweep workers started together on a fresh
    ``mlflow.db``. A file lock beside the database (``<db>.lock``) serializes that first use; servers need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import filelock

    with filelock.FileLock(uri[len("sqlite:///") :] + ".lock", timeout=300):
        yield


def get_or_create_experiment(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException:  # created by a concurrent process in the meantime
        return client.get_experiment_by_name(name).experiment_id


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

    def __init__(self, uri: str, experiment: str, name: str, tags: dict[str, str], run_id: str | None = None):
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
        with server_errors(uri, experiment):
            self.experiment_id = get_or_create_experiment(self.client, experiment, uri)
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
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
        the
        run's *Models*, optionally registered. ``example``: one input row (image bytes + question) for the UI and
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
        previous = mlflow.get_tracking_uri()
        try:
            mlflow.set_tracking_uri(self.uri)
            with _ctrl_c_after(), mlflow.start_run(run_id=self.run_id):
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
        finally:
            mlflow.set_tracking_uri(previous)

    def finish(self, status: str = "FINISHED", error: str | None = None, run_dir: Path | None = None) -> None:
        import time

        if error:
            self.set_tags({"error": error})
        self._call("set_terminated", self.run_id, status=status)
        for _ in range(6):  # the server may be coming back: give the queue a last chance
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
    def _flush(self) -> bool:
        """Replay queued writes in order; True when the queue is empty."""
        import time

        while self.pending:
            method, args, kwargs = self.pending[0]
            try:
                with _ctrl_c_after():
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
            with _ctrl_c_after():
                getattr(self.client, method)(*args, **kwargs)
        except Exception as e:
            self.failed_at = time.monotonic()
            self.pending.append((method, args, kwargs))
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            log.warning(
                "MLflow write failed (%s): %s; training goes on, the write is queued and retried", method, first
            )


@contextmanager
def _ctrl_c_after():
    """Hold a Ctrl-C (SIGINT) that arrives during an MLflow write until the write has finished, then raise it.

    Why: a KeyboardInterrupt inside a write can leave its database transaction open (an SQLite store stays locked),
    and the run's last write, the one that marks it KILLED, then waits on that lock for minutes. Python runs signal
    handlers in the main thread only, so elsewhere this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
        elif caught and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)  # the operating system's default: end the process


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


PENDING_FILE = "mlflow_pending.json"  # MLflow writes a run could not make; plain JSON, uploaded by clipqa-sync
QUEUEABLE = ("log_batch", "log_artifact", "set_terminated")  # the only client methods a pending file may name


def _with_placeholders(uri: str) -> str:
    """``http://bob:secret@host`` -> ``http://USER:PASSWORD@host``: the shape of a refused URI, without its secret."""
    scheme, _, rest = without_credentials(uri).partition("://")
    return f"{scheme}://USER:PASSWORD@{rest}"


def without_credentials(uri: str) -> str:
    """``http://user:secret@host`` -> ``http://host``: credentials come from the environment, never from files."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def encode_op(method: str, args: tuple, kwargs: dict) -> dict:
    """A queued MLflow write as JSON: entity lists (Param, Metric, RunTag) become lists of their fields."""
    kw = {k: v for k, v in kwargs.items() if k not in ("params", "metrics", "tags")}
    kw["params"] = [[p.key, p.value] for p in kwargs.get("params") or []]
    kw["metrics"] = [[m.key, m.value, m.timestamp, m.step] for m in kwargs.get("metrics") or []]
    kw["tags"] = [[t.key, t.value] for t in kwargs.get("tags") or []]
    return {"method": method, "args": list(args), "kwargs": kw}


def decode_op(op: dict) -> tuple[str, list, dict]:
    from mlflow.entities import Metric, Param, RunTag

    if op.get("method") not in QUEUEABLE:
        raise ValueError(f"unknown MLflow write {op.get('method')!r} (expected one of {', '.join(QUEUEABLE)})")
    kw = dict(op["kwargs"])
    params, metrics, tags = kw.pop("params", []), kw.pop("metrics", []), kw.pop("tags", [])
    if op["method"] == "log_batch":
        kw.update(
            params=[Param(*p) for p in params], metrics=[Metric(*m) for m in metrics], tags=[RunTag(*t) for t in tags]
        )
    return op["method"], op["args"], kw


def sync(run_dir: str | Path) -> int:
    """Upload the MLflow writes a run could not make (``mlflow_pending.json``); return how many were made."""
    from mlflow.tracking import MlflowClient

    path = Path(run_dir) / PENDING_FILE
    data = json.loads(path.read_text())
    client = MlflowClient(tracking_uri=data["uri"])
    ops = [decode_op(op) for op in data["ops"]]
    for method, args, kwargs in ops:
        getattr(client, method)(*args, **kwargs)
    path.unlink()
    return len(ops)


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
    tags = {"clipqa.overrides": " ".join(info.overrides) or "(none)"}
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
    tracker = MlflowTracker(uri, t.experiment, name, tags)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    tracker.log_params(flatten(resolved))
    return tracker


def read_parent(sweep_dir: str | None) -> dict | None:
    if not sweep_dir or not (Path(sweep_dir) / PARENT_FILE).is_file():
        return None
    return json.loads((Path(sweep_dir) / PARENT_FILE).read_text())
