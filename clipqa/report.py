"""The comparison report: read runs from MLflow, write ``report.md``, ``report.csv``, ``comparison.png`` and
``learning_curves.png``.

    clipqa-report --tracking-uri sqlite:///PATH/mlflow.db --experiment clipqa --out report/
    clipqa-report ... --sweep-dir multirun/2026-11-26/12-00-00      # only that sweep's runs
    clipqa-report ... --parent RUN_ID --filter "params.head.kind = 'vocab'"

One row per *variant*: the config values that differ between the selected runs, ignoring ``trainer.seed`` and
output locations. Runs of one variant that differ only by seed are aggregated (mean +- sd, n) with a t-interval;
a single run gets a Wilson 95% interval over its test questions (``data/n_test``). When the runs are the paper's
versions (named V1..V4), the paper's published accuracy is shown beside ours; it was measured on 80 test questions.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC, TEST_PRIOR_ACC, TYPE_NAMES, VAL_ACC
from clipqa.tracking import NOT_VARIANT_PREFIXES, resolve_uri

# CLIQQA (Abbo), Table 1: accuracy on 80 test questions (10 shuffled batches of 8).
PAPER = {"V1": 0.288, "V2": 0.513, "V3": 0.550, "V4": 0.625}
NOT_VARIANT = ("trainer.seed", "params/")  # seeds are aggregated; parameter counts follow from the config
# t_{0.975, df} for 95% intervals of a mean over few seeds
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy ``p`` over ``n`` questions."""
    if n <= 0:
        return (float("nan"), float("nan"))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def select_runs(client, experiment_id: str, parent_run_id: str | None, filter_string: str | None) -> list:
    clauses = [f"tags.mlflow.parentRunId = '{parent_run_id}'"] if parent_run_id else []
    if filter_string:
        clauses.append(filter_string)
    runs = client.search_runs([experiment_id], " and ".join(clauses), max_results=5000)
    return [r for r in runs if r.data.tags.get("clipqa.sweep") != "true"]


def variant_keys(runs: list) -> list[str]:
    """The params whose values differ between the runs (ignoring seeds and output locations)."""
    keys = set().union(*(r.data.params for r in runs)) if runs else set()
    varying = []
    for k in sorted(keys):
        if k.startswith(NOT_VARIANT_PREFIXES + NOT_VARIANT):
            continue
        if len({r.data.params.get(k) for r in runs}) > 1:
            varying.append(k)
    return varying


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else None


def summarise(runs: list) -> list[dict]:
    """Group finished runs by variant; one dict per variant with means, intervals and bookkeeping."""
    keys = variant_keys(runs)
    groups: dict[str, list] = {}
    for r in runs:
        label = ",".join(f"{k}={r.data.params.get(k)}" for k in keys) if keys else r.info.run_name
        if r.info.run_name in PAPER:
            label = r.info.run_name
        groups.setdefault(label, []).append(r)
    rows = []
    for label, members in groups.items():
        m = [r.data.metrics for r in members]
        accs = [x[TEST_ACC] for x in m]
        mean = statistics.fmean(accs)
        if len(accs) > 1:
            sd = statistics.stdev(accs)
            half = T975.get(len(accs) - 1, 1.96) * sd / math.sqrt(len(accs))
            lo, hi = max(0.0, mean - half), min(1.0, mean + half)
        else:
            sd = None
            lo, hi = wilson(mean, int(m[0].get("data/n_test", 0)))
        wall = [(r.info.end_time - r.info.start_time) / 1000 for r in members if r.info.end_time]
        row = {
            "variant": label,
            "n": len(members),
            TEST_ACC: mean,
            "sd": sd,
            "ci_low": lo,
            "ci_high": hi,
            **{f"{TEST_ACC}/{t}": _mean([x.get(f"{TEST_ACC}/{t}") for x in m]) for t in TYPE_NAMES.values()},
            VAL_ACC: _mean([x.get(VAL_ACC) for x in m]),
            TEST_PRIOR_ACC: _mean([x.get(TEST_PRIOR_ACC) for x in m]),
            "epochs": m[0].get("epochs", members[0].data.params.get("trainer.epochs")),
            "steps": _mean([x.get("steps") for x in m]),
            "trainable_params": _mean([x.get("params/trainable") for x in m]),
            "wall_s": _mean(wall),
            "paper_acc": PAPER.get(label),
            "runs": " ".join(r.info.run_id for r in members),
        }
        rows.append(row)
    rows.sort(key=lambda r: (r["variant"] not in PAPER, r["variant"]))
    return rows


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def write_markdown(rows: list[dict], path: Path, title: str, skipped: list[str]) -> None:
    paper = any(r["paper_acc"] is not None for r in rows)
    head = [
        "variant",
        "n",
        "test acc %",
        "95% interval",
        *TYPE_NAMES.values(),
        "val acc %",
        "prior %",
        "epochs",
        "steps",
        "trainable params",
        "wall s",
    ] + (["paper acc % (80 q)"] if paper else [])
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = _pct(r[TEST_ACC]) + (f" ± {100 * r['sd']:.1f}" if r["sd"] is not None else "")
        cells = [
            f"`{r['variant']}`",
            str(r["n"]),
            acc,
            f"{_pct(r['ci_low'])}–{_pct(r['ci_high'])}",
            *[_pct(r[f"{TEST_ACC}/{t}"]) for t in TYPE_NAMES.values()],
            _pct(r[VAL_ACC]),
            _pct(r[TEST_PRIOR_ACC]),
            f"{float(r['epochs']):g}" if r["epochs"] else "",
            f"{r['steps']:.0f}" if r["steps"] else "",
            f"{r['trainable_params']:,.0f}" if r["trainable_params"] else "",
            f"{r['wall_s']:.0f}" if r["wall_s"] else "",
        ]
        if paper:
            cells.append(_pct(r["paper_acc"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Test accuracy is over the full test split; n = runs aggregated (differing only by seed; ± is "
        "the sd, the interval a t-interval of the mean). A single run's interval is a Wilson interval over its "
        "test questions.",
    ]
    if paper:
        lines += [
            "",
            "The paper's numbers were measured on only 80 test questions (10 shuffled batches of 8), so each "
            "is uncertain by about ±11 points at 95%; ours use every test question.",
        ]
    if skipped:
        lines += ["", f"Not in the table (not finished or without test metrics): {', '.join(skipped)}."]
    lines += ["", "![comparison](comparison.png)", "", "![learning curves](learning_curves.png)", ""]
    path.write_text("\n".join(lines))


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def make_report(
    uri: str | None,
    out: str | Path,
    experiment: str | None = None,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    filter_string: str | None = None,
) -> Path:
    """Write the report files into ``out``; return the path of ``report.md``. Raises ClipqaError if no run matches."""
    from mlflow.tracking import MlflowClient

    from clipqa.plots import comparison_chart, learning_curves_chart

    uri = resolve_uri(uri)
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"clipqa comparison: experiment {experiment}" + (f", sweep {parent_run_id}" if parent_run_id else "")
    write_markdown(rows, out / "report.md", title, skipped)
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
