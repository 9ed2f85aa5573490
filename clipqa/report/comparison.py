"""The comparison report: read runs from MLflow, or an untracked sweep's job folders, and write ``report.md``,
``report.csv``, ``report.tex`` (the main table for a paper: booktabs), ``comparison.png`` and ``learning_curves.png``.

    clipqa-report --tracking-uri sqlite:///PATH/mlflow.db --experiment clipqa --out report/
    clipqa-report ... --sweep-dir multirun/2026-11-26/12-00-00      # only that sweep's runs (tracked or not)
    clipqa-report ... --parent RUN_ID --filter "params.head.kind = 'vocab'" --baseline RUN_ID

One row per *variant*: the config values that differ between the selected runs, ignoring ``trainer.seed`` and
output locations. Runs of one variant that differ only by seed are aggregated (mean +- sd, n) with a t-interval;
a single run gets a Wilson 95% interval over the test questions it answered (``data/n_test_evaluated``). Beside
accuracy: WUPS@0.9 and WUPS@0.0, overall and per question type (when the runs computed them, clipqa.evaluation.wups).

Which differences are real: every variant answers the same test questions, so each row is compared *paired* with
a baseline row (the paper's V1 when the runs are the paper's versions, else ``--baseline RUN_ID``'s row, else the
sweep's first job): an exact McNemar test on per-question correctness read from the runs' ``test_predictions.tsv``
artifacts, the accuracy difference with an Agresti-Min 95% interval, and Holm's correction over the rows. Rows of
several seeds are paired with the baseline's runs seed by seed (a paired t-test over seeds; one shared seed: that
pair's McNemar test). When the runs are the paper's versions (named V1..V4), the paper's published accuracy is
shown beside ours; it was measured on 80 test questions.

Both sources go through :func:`write_report`: :func:`make_report` reads MLflow, :func:`make_folder_report` the job
folders of a sweep run with tracking off (:mod:`clipqa.report.folders` gives them the fields of an MLflow run).
The title names a sweep by its overrides and folder (:func:`sweep_title`); an MLflow parent run is a detail.

The pieces: :mod:`clipqa.report.runs` (runs -> rows), :mod:`clipqa.report.statistics`, :mod:`clipqa.report.paired`
(the comparison with the baseline), :mod:`clipqa.report.render` (report.md, .csv, .tex), :mod:`clipqa.report.plots`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC
from clipqa.paths import PROJECT_DIR
from clipqa.report.folders import folder_runs, history_curves, sweep_command
from clipqa.report.paired import PREDICTIONS, compare, pick_baseline, read_correctness
from clipqa.report.render import pareto_section, write_csv, write_latex, write_markdown
from clipqa.report.runs import select_runs, summarise
from clipqa.tracking.reaped import REAPED_TAG
from clipqa.tracking.run_info import NOT_VARIANT_PREFIXES, OVERRIDES_TAG, override_key, overrides_from_tag
from clipqa.tracking.uris import resolve_uri

REPORT_FILES = ("report.md", "report.csv", "report.tex", "comparison.png", "learning_curves.png")


def make_report(
    uri: str | None,
    out: str | Path,
    experiment: str | None = None,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    filter_string: str | None = None,
    baseline_run_id: str | None = None,
    sweep_run_id: str | None = None,
) -> Path:
    """Write the report files of MLflow runs into ``out``; return the path of ``report.md``. ``sweep_run_id``: the
    sweep parent run the title names (default ``parent_run_id``; an Optuna study's report selects its runs by
    ``filter_string``). Raises ClipqaError if no run matches or ``baseline_run_id`` is not one of the runs."""
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(uri, "--tracking-uri", must_exist=True)
    client = MlflowClient(tracking_uri=uri)
    if experiment_id is None:
        exp = client.get_experiment_by_name(experiment or "clipqa")
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments())
            raise ClipqaError(
                f"No MLflow experiment {experiment!r} at {uri} (--experiment). Experiments there: {names}."
            )
        experiment_id = exp.experiment_id
    experiment = experiment or client.get_experiment(experiment_id).name
    runs = select_runs(client, experiment_id, parent_run_id, filter_string)
    done = [r for r in runs if r.info.status == "FINISHED" and TEST_ACC in r.data.metrics]
    reaped = [r.info.run_name for r in runs if r not in done and REAPED_TAG in r.data.tags]  # dead workers' runs
    skipped = [f"{r.info.run_name} ({r.info.status})" for r in runs if r not in done and REAPED_TAG not in r.data.tags]
    if reaped:  # counted apart from failed runs: their worker died, another ended them (clipqa.sweep.reaping)
        skipped.append(f"{len(reaped)} reaped (KILLED: their worker died; its trials retried): {', '.join(reaped)}")
    if not done:
        raise ClipqaError(
            f"No finished runs with {TEST_ACC} in experiment {experiment or experiment_id} at {uri}"
            + (f" under parent run {parent_run_id}" if parent_run_id else "")
            + (f" matching {filter_string!r}" if filter_string else "")
            + ". Check --experiment/--parent/--filter, or run a training first."
        )
    sweep = sweep_run_id or parent_run_id
    if sweep:
        tags = (parent := client.get_run(sweep)).data.tags
        command = overrides_from_tag(tags.get(OVERRIDES_TAG)) if OVERRIDES_TAG in tags else None
        name = (parent.info.run_name or "").removeprefix("sweep: ") or None  # a parent made without the tag
        title = sweep_title(command, tags.get("hydra.sweep.dir"), len(done), name)
        title[1] += f" MLflow: parent run `{sweep}` in experiment `{experiment}`."
    else:
        title = [f"clipqa comparison of MLflow experiment `{experiment}`", f"{len(done)} runs in the table."]
        title[1] += f" Runs matching `{filter_string}`." if filter_string else ""
    with tempfile.TemporaryDirectory() as tmp:
        cache: dict[str, dict | None] = {}

        def correctness(run) -> dict | None:
            rid = run.info.run_id
            if rid not in cache:
                try:
                    local = client.download_artifacts(rid, PREDICTIONS, str(Path(tmp) / rid))
                    cache[rid] = read_correctness(Path(local))
                except ClipqaError:
                    raise
                except Exception:  # no such artifact (a run from before it was logged)
                    cache[rid] = None
            return cache[rid]

        def curves(run) -> dict[str, list[tuple[int, float]]]:
            rid = run.info.run_id
            return {
                k: [(m.step, m.value) for m in client.get_metric_history(rid, k)] for k in ("val/acc", "train/loss")
            }

        md = write_report(done, skipped, Path(out), title, correctness, curves, baseline_run_id)
    front = pareto_section(client, done, parent_run_id, Path(out))
    if front:
        with open(md, "a") as f:
            f.write("\n".join(front) + "\n")
    return md


def make_folder_report(sweep_dir: str | Path, out: str | Path, baseline_run_id: str | None = None) -> Path:
    """The report of an untracked sweep (``tracking=none``), read from its job folders (:mod:`clipqa.report.folders`)
    instead of MLflow: the same rows, statistics and files. ``baseline_run_id``: a job folder (``0``, ``1``, ...)."""
    sweep_dir = Path(sweep_dir).resolve()
    runs = folder_runs(sweep_dir)
    done = [r for r in runs if r.info.status == "FINISHED"]
    skipped = [f"{r.info.run_name} (job {r.info.run_id}: {r.info.status})" for r in runs if r not in done]
    if not done:
        raise ClipqaError(
            f"No job folder under {sweep_dir} holds a metrics.json with {TEST_ACC} ({len(runs)} job folders: "
            f"{', '.join(r.info.run_id for r in runs)}): the sweep's jobs did not finish. Re-run the sweep command "
            "(jobs that finished are skipped) and make the report again."
        )
    title = sweep_title(sweep_command(sweep_dir), str(sweep_dir), len(done), None)
    title[1] += " Tracking was off: read from the job folders (metrics.json, test_predictions.tsv)."
    cache: dict[str, dict | None] = {}

    def correctness(run) -> dict | None:
        if run.info.run_id not in cache:
            f = run.folder / PREDICTIONS
            cache[run.info.run_id] = read_correctness(f) if f.is_file() else None
        return cache[run.info.run_id]

    return write_report(done, skipped, Path(out), title, correctness, history_curves, baseline_run_id)


def sweep_title(command: list[str] | None, folder: str | None, n_runs: int, name: str | None) -> list[str]:
    """[title, detail line]: the sweep named by its overrides (without the output locations: hydra.*, tracking.*)
    and its folder (relative to the project folder when inside it); the detail line gives the whole command."""
    shown = [o for o in command or [] if not override_key(o).startswith(NOT_VARIANT_PREFIXES)]
    where = ""
    if folder:
        path = Path(folder)
        where = f" in `{path.relative_to(PROJECT_DIR) if path.is_relative_to(PROJECT_DIR) else path}`"
    if command is None:
        title = f"clipqa sweep `{name}`{where}" if name else f"clipqa sweep{where}"
        return [title, f"{n_runs} runs in the table."]
    cmd = " ".join(["python train.py -m", *shown])
    return [f"clipqa sweep `{' '.join(shown) or 'defaults'}`{where}", f"Command: `{cmd}`; {n_runs} runs in the table."]


def write_report(
    done: list,
    skipped: list[str],
    out: Path,
    title: list[str],
    correctness: Callable,
    curves: Callable,
    baseline_run_id: str | None,
) -> Path:
    """The report files of finished runs from either source (MLflow runs or job folders): rows, the paired
    comparison, report.md/.csv/.tex and the charts. ``correctness(run)`` and ``curves(run)`` read a run's
    predictions and learning curves from its source."""
    from clipqa.report.plots import comparison_chart, learning_curves_chart

    rows = summarise(done)
    baseline = pick_baseline(rows, baseline_run_id)
    compare(rows, baseline if len(rows) > 1 else None, correctness)  # one row: nothing to compare
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, out / "report.md", title[0], skipped, details=title[1:])
    write_csv(rows, out / "report.csv")
    write_latex(rows, out / "report.tex", title[0])
    comparison_chart(rows, out / "comparison.png")
    learning_curves_chart({r.info.run_name: curves(r) for r in done}, out / "learning_curves.png")
    return out / "report.md"
