"""An untracked sweep's job folders read as runs: the fields the report reads from MLflow (``info.run_id``,
``info.run_name``, ``info.status``, start and end time; ``data.params``, ``data.metrics``, ``data.tags``), taken from
the files every job leaves, so :func:`clipqa.report.runs.summarise` and the paired comparison take either source.

- ``metrics.json``: the metrics (a job without one did not finish); ``config.yaml``: the params, flattened as
  MLflow's; ``.hydra/overrides.yaml``: the tag ``clipqa.overrides`` that names the report's rows; the job number
  from ``.hydra/hydra.yaml``; ``test_predictions.tsv``: the paired comparison; ``history.jsonl``: the curves.
- A job folder is any folder under the sweep folder holding ``.hydra/overrides.yaml`` (``0``, ``1``, ... with
  Hydra's default ``hydra.sweep.subdir``); its run id is its path relative to the sweep folder, which is what
  ``clipqa-report --baseline`` takes.
- Start and end time: when Hydra wrote the job's ``.hydra/overrides.yaml`` and when the job wrote ``metrics.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC
from clipqa.tracking.run_info import OVERRIDES_TAG, PARENT_FILE, RunInfo, override_key, overrides_tag, run_name
from clipqa.tracking.tracker import flatten

OVERRIDES = ".hydra/overrides.yaml"  # Hydra writes it into every job folder when the job starts


@dataclass
class FolderInfo:
    run_id: str  # the job folder, relative to the sweep folder
    run_name: str | None
    status: str  # FINISHED when the job wrote metrics.json with test/acc
    start_time: int | None  # milliseconds, as MLflow's
    end_time: int | None


@dataclass
class FolderData:
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass
class FolderRun:
    """One job folder in the shape of an MLflow run (``run.info``, ``run.data``)."""

    info: FolderInfo
    data: FolderData
    folder: Path


def job_folders(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders (those holding ``.hydra/overrides.yaml``)."""
    found = [p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"]
    return sorted(f for f in found if f != sweep_dir)


def _load(path: Path, kind: str):
    """A job file read with YAML (a superset of JSON); a ClipqaError naming the file if it is not readable."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ClipqaError(
            f"{path} cannot be read as a job's {kind} ({type(e).__name__}: {str(e).splitlines()[0]}). Re-run that "
            "job (the same `python train.py -m ...` command skips the jobs that finished) or delete its folder, "
            "then make the report again."
        ) from None


def _param(value) -> str:
    return json.dumps(value) if isinstance(value, list | tuple) else str(value)  # as MlflowTracker.log_params


def _read_job(folder: Path, sweep_dir: Path) -> tuple[list[str], dict, dict, int | None]:
    overrides = _load(folder / OVERRIDES, "Hydra overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ClipqaError(
            f"{folder / OVERRIDES} is not a list of Hydra overrides (like `- mapper.num_layers=1`); it was not "
            f"written by Hydra. Restore it or delete the job folder {folder.relative_to(sweep_dir)}."
        )
    metrics_file = folder / "metrics.json"
    metrics = _load(metrics_file, "metrics") if metrics_file.is_file() else {}
    if not isinstance(metrics, dict):
        raise ClipqaError(f"{metrics_file} is not a JSON object of metrics; re-run that job or delete its folder.")
    config_file = next((f for f in (folder / "config.yaml", folder / ".hydra/config.yaml") if f.is_file()), None)
    config = (_load(config_file, "config") or {}) if config_file else {}
    hydra_file = folder / ".hydra/hydra.yaml"
    hydra = (_load(hydra_file, "Hydra config") or {}) if hydra_file.is_file() else {}
    num = ((hydra.get("hydra") or {}).get("job") or {}).get("num")
    if num is None and folder.name.isdigit():
        num = int(folder.name)
    return overrides, metrics, config if isinstance(config, dict) else {}, num


def folder_runs(sweep_dir: str | Path) -> list[FolderRun]:
    """Every job folder of the sweep as a run, in job order. Raises ClipqaError when the folder holds no jobs or a
    job's files cannot be read."""
    sweep_dir = Path(sweep_dir).resolve()
    folders = job_folders(sweep_dir) if sweep_dir.is_dir() else []
    if not folders:
        raise ClipqaError(
            f"{sweep_dir} is not a Hydra multirun folder: it holds neither {PARENT_FILE} (a tracked sweep, whose runs "
            f"are in MLflow) nor job folders (<job>/{OVERRIDES}). Pass --sweep-dir the folder a `python train.py -m "
            "...` wrote (hydra.sweep.dir, by default multirun/<date>/<time>)."
        )
    jobs = [(f, *_read_job(f, sweep_dir)) for f in folders]
    by_key = [{override_key(o): o for o in job[1]} for job in jobs]  # the keys whose override differs: run names
    swept = sorted({k for job in by_key for k in job if len({j.get(k) for j in by_key}) > 1})
    runs = []
    for folder, overrides, metrics, config, num in jobs:
        config.pop("hydra", None)
        info = RunInfo(overrides=overrides, job_num=num, sweep_dir=str(sweep_dir), multirun=True)
        name = (config.get("tracking") or {}).get("run_name") or run_name(info, swept)  # as the tracker names it
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        tags = {OVERRIDES_TAG: overrides_tag(overrides)} | ({"hydra.job.num": str(num)} if num is not None else {})
        done = folder / "metrics.json"
        times = (
            int((folder / OVERRIDES).stat().st_mtime * 1000),
            (int(done.stat().st_mtime * 1000) if done.is_file() else None),
        )
        status = "FINISHED" if TEST_ACC in numbers else "no metrics.json"
        rid = folder.relative_to(sweep_dir).as_posix()
        params = {k: _param(v) for k, v in flatten(config).items()}
        runs.append(FolderRun(FolderInfo(rid, name, status, *times), FolderData(params, numbers, tags), folder))
    runs.sort(key=lambda r: (int(r.data.tags.get("hydra.job.num", 1 << 30)), r.info.run_id))
    return runs


def sweep_command(sweep_dir: Path) -> list[str] | None:
    """The sweep's command-line overrides (``hydra.overrides.task`` of the ``multirun.yaml`` Hydra writes at its
    start); None without that file."""
    f = sweep_dir / "multirun.yaml"
    if not f.is_file():
        return None
    task = ((_load(f, "multirun config") or {}).get("hydra") or {}).get("overrides", {}).get("task")
    return [str(o) for o in task] if isinstance(task, list) else None


def history_curves(run: FolderRun) -> dict[str, list[tuple[int, float]]]:
    """``val/acc`` and ``train/loss`` by optimizer step from the job's ``history.jsonl`` (empty without it)."""
    curves: dict[str, list[tuple[int, float]]] = {"val/acc": [], "train/loss": []}
    f = run.folder / "history.jsonl"
    if not f.is_file():
        return curves
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a job that was stopped
        for key, points in curves.items():
            if isinstance(row, dict) and isinstance(row.get(key), int | float) and "step" in row:
                points.append((int(row["step"]), float(row[key])))
    return curves
