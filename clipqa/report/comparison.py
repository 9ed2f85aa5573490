"""The comparison report: read runs from MLflow, write ``report.md``, ``report.csv``, ``comparison.png`` and
``learning_curves.png``.

    clipqa-report --tracking-uri sqlite:///PATH/mlflow.db --experiment clipqa --out report/
    clipqa-report ... --sweep-dir multirun/2026-11-26/12-00-00      # only that sweep's runs
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

The pieces: :mod:`clipqa.report.runs` (runs -> rows), :mod:`clipqa.report.statistics`, :mod:`clipqa.report.paired`
(the comparison with the baseline), :mod:`clipqa.report.render` (report.md, report.csv), :mod:`clipqa.report.plots`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC
from clipqa.report.paired import PREDICTIONS, compare, pick_baseline, read_correctness
from clipqa.report.render import pareto_section, write_csv, write_markdown
from clipqa.report.runs import select_runs, summarise
from clipqa.tracking.uris import resolve_uri


def make_report(
    uri: str | None,
    out: str | Path,
    experiment: str | None = None,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    filter_string: str | None = None,
    baseline_run_id: str | None = None,
) -> Path:
    """Write the report files into ``out``; return the path of ``report.md``. Raises ClipqaError if no run matches
    or ``baseline_run_id`` is not one of the runs."""
    from mlflow.tracking import MlflowClient

    from clipqa.report.plots import comparison_chart, learning_curves_chart

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
    skipped = [f"{r.info.run_name} ({r.info.status})" for r in runs if r not in done]
    if not done:
        raise ClipqaError(
            f"No finished runs with {TEST_ACC} in experiment {experiment or experiment_id} at {uri}"
            + (f" under parent run {parent_run_id}" if parent_run_id else "")
            + (f" matching {filter_string!r}" if filter_string else "")
            + ". Check --experiment/--parent/--filter, or run a training first."
        )
    rows = summarise(done)
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

        baseline = pick_baseline(rows, baseline_run_id)
        compare(rows, baseline if len(rows) > 1 else None, correctness)  # one row: nothing to compare
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"clipqa comparison: experiment {experiment}" + (f", sweep {parent_run_id}" if parent_run_id else "")
    write_markdown(rows, out / "report.md", title, skipped)
    front = pareto_section(client, done, parent_run_id, out)
    if front:
        with open(out / "report.md", "a") as f:
            f.write("\n".join(front) + "\n")
    write_csv(rows, out / "report.csv")
    comparison_chart(rows, out / "comparison.png")
    curves = {}
    for r in done:
        curves[r.info.run_name] = {
            k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
            for k in ("val/acc", "train/loss")
        }
    learning_curves_chart(curves, out / "learning_curves.png")
    return out / "report.md"
