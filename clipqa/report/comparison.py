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
"""

from __future__ import annotations

import csv
import math
import shutil
import statistics
import tempfile
from collections import Counter
from pathlib import Path

from clipqa.errors import ClipqaError
from clipqa.metrics import (
    N_TEST_EVALUATED,
    TEST_ACC,
    TEST_PRIOR_ACC,
    TYPE_NAMES,
    VAL_ACC,
    WUPS_THRESHOLDS,
    wups_key,
    wups_label,
)
from clipqa.tracking.run_info import NOT_VARIANT_PREFIXES
from clipqa.tracking.uris import resolve_uri

# CLIQQA (Abbo), Table 1: accuracy on 80 test questions (10 shuffled batches of 8).
PAPER = {"V1": 0.288, "V2": 0.513, "V3": 0.550, "V4": 0.625}
NOT_VARIANT = ("trainer.seed", "params/")  # seeds are aggregated; parameter counts follow from the config
# t_{0.975, df} for 95% intervals of a mean over few seeds
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
ALPHA = 0.05  # significance level of the Holm-corrected comparisons
PREDICTIONS = "test_predictions.tsv"  # the per-question artifact every run logs (clipqa.training.run)
WUPS_KEYS = [wups_key(th) for th in WUPS_THRESHOLDS]


# ---- statistics ---------------------------------------------------------------------------------------------------
def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy ``p`` over ``n`` questions."""
    if n <= 0:
        return (float("nan"), float("nan"))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b`` questions only the baseline got right, ``c`` only the other run.

    Under no difference each of the ``b + c`` discordant questions goes either way with probability 1/2, so
    p = min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)]) (summed in log space: COCO-QA gives thousands).
    """
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(x - top) for x in logs))


def paired_difference(b: int, c: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Accuracy difference (other - baseline) over ``n`` paired questions, ``b``/``c`` discordant as in
    :func:`mcnemar_exact`, with the Agresti-Min 95% interval (half a question added to each cell of the 2x2 table,
    so it is not empty when b = c = 0)."""
    if n <= 0:
        return (float("nan"), float("nan"), float("nan"))
    d = (c - b) / n
    b2, c2, n2 = b + 0.5, c + 0.5, n + 2
    d2 = (c2 - b2) / n2
    se = math.sqrt(max(0.0, (b2 + c2) - (c2 - b2) ** 2 / n2)) / n2
    return (d, max(-1.0, d2 - z * se), min(1.0, d2 + z * se))


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4, exact for integer df)."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(3, df, 2):  # 1 + (2/3) c^2 + (2*4)/(3*5) c^4 + ...
            term *= (k - 1) / k * c2
            total += term
        a = (2 / math.pi) * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:
        term, total = 1.0, 1.0
        for k in range(2, df, 2):  # 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ...
            term *= (k - 1) / k * c2
            total += term
        a = s * total
    return min(1.0, max(0.0, 1.0 - a))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m - i + 1), kept monotone, capped at 1.
    NaN (no comparison) stays NaN and does not count in m."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out, running = [float("nan")] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


# ---- runs -> rows ---------------------------------------------------------------------------------------------------
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


def variant_label(run, keys: list[str]) -> str:
    """The row a run belongs to: its paper version name, else its values of the varying keys. When nothing but the
    seed varies every run is one variant (a seeds sweep: one row)."""
    if run.info.run_name in PAPER:
        return run.info.run_name
    if keys:
        return ",".join(f"{k}={run.data.params.get(k)}" for k in keys)
    return "same config"


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else None


def _seed(run) -> str | None:
    return run.data.params.get("trainer.seed")


def summarise(runs: list) -> list[dict]:
    """Group finished runs by variant; one dict per variant with means, intervals and bookkeeping."""
    keys = variant_keys(runs)
    groups: dict[str, list] = {}
    for r in runs:  # (a single run, e.g. the one job of a sweep that finished, is named as in MLflow)
        label = variant_label(r, keys) if keys or len(runs) > 1 or r.info.run_name is None else r.info.run_name
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
            lo, hi = wilson(mean, int(m[0].get(N_TEST_EVALUATED, m[0].get("data/n_test", 0))))
        if label == "same config" and len(members) > 1:
            label = f"same config (seeds {', '.join(sorted(str(_seed(r)) for r in members))})"
        wall = [(r.info.end_time - r.info.start_time) / 1000 for r in members if r.info.end_time]
        per_type = {f"{TEST_ACC}/{t}": _mean([x.get(f"{TEST_ACC}/{t}") for x in m]) for t in TYPE_NAMES.values()}
        wups = {}
        for key in WUPS_KEYS:
            wups[key] = _mean([x.get(key) for x in m])
            wups.update({f"{key}/{t}": _mean([x.get(f"{key}/{t}") for x in m]) for t in TYPE_NAMES.values()})
        rows.append(
            {
                "variant": label,
                "n": len(members),
                TEST_ACC: mean,
                "sd": sd,
                "ci_low": lo,
                "ci_high": hi,
                **per_type,
                **wups,
                VAL_ACC: _mean([x.get(VAL_ACC) for x in m]),
                TEST_PRIOR_ACC: _mean([x.get(TEST_PRIOR_ACC) for x in m]),
                "epochs": m[0].get("epochs", members[0].data.params.get("trainer.epochs")),
                "steps": _mean([x.get("steps") for x in m]),
                "trainable_params": _mean([x.get("params/trainable") for x in m]),
                "wall_s": _mean(wall),
                "paper_acc": PAPER.get(label),
                "runs": " ".join(r.info.run_id for r in members),
                "_members": members,
            }
        )
    rows.sort(key=lambda r: (r["variant"] not in PAPER, r["variant"]))
    return rows


# ---- paired comparison ------------------------------------------------------------------------------------------
def read_correctness(path: Path) -> dict[tuple, bool]:
    """Per-question correctness from a ``test_predictions.tsv``: (image id, type, question, answer, occurrence) ->
    correct. Columns are found by name; a question asked twice about one image is told apart by its occurrence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return {}
    head = lines[0].split("\t")
    try:
        cols = [head.index(c) for c in ("image_id", "type", "question", "answer")]
        correct_col = head.index("correct")
    except ValueError:
        raise ClipqaError(
            f"{path} lacks the columns image_id, type, question, answer and correct; it is not a clipqa "
            f"{PREDICTIONS}. Re-run the training that logged it."
        ) from None
    seen: Counter = Counter()
    out = {}
    for line in lines[1:]:
        cells = line.split("\t")
        key = tuple(cells[i] for i in cols)
        seen[key] += 1
        out[(*key, seen[key])] = cells[correct_col] == "1"
    return out


def mcnemar_counts(base: dict[tuple, bool], other: dict[tuple, bool]) -> tuple[int, int, int]:
    """(b, c, n) over the questions both runs answered: b only the baseline right, c only the other run right."""
    common = base.keys() & other.keys()
    b = sum(base[q] and not other[q] for q in common)
    c = sum(other[q] and not base[q] for q in common)
    return b, c, len(common)


def pick_baseline(rows: list[dict], baseline_run_id: str | None) -> dict | None:
    """``--baseline``'s row; else V1 when the paper's versions are there; else the row of the sweep's first job
    (the smallest ``hydra.job.num`` tag, then the earliest start)."""
    if baseline_run_id:
        for row in rows:
            if any(r.info.run_id == baseline_run_id for r in row["_members"]):
                return row
        raise ClipqaError(
            f"--baseline {baseline_run_id} is not one of the finished runs in this report. Pass the run id of one "
            "of them (the `runs` column of report.csv), or leave --baseline out to compare with the first job."
        )
    for row in rows:
        if row["variant"] == "V1":
            return row

    def order(r) -> tuple:
        num = r.data.tags.get("hydra.job.num")
        return (int(num) if num is not None and num.isdigit() else math.inf, r.info.start_time or 0)

    return min(rows, key=lambda row: min(order(r) for r in row["_members"])) if rows else None


def _pairs(row: dict, base: dict) -> list[tuple]:
    """(run, baseline run) pairs: the two runs when both rows have one, else the runs sharing a seed."""
    if row["n"] == 1 and base["n"] == 1:
        return [(row["_members"][0], base["_members"][0])]
    by_seed = {_seed(r): r for r in base["_members"]}
    return [(r, by_seed[_seed(r)]) for r in row["_members"] if _seed(r) in by_seed]


def compare(rows: list[dict], baseline: dict | None, correctness) -> None:
    """Fill every row's paired comparison with ``baseline`` (in place); ``correctness(run)`` gives a run's
    per-question correctness (None if it has no predictions artifact). Holm's correction runs over the rows."""
    for row in rows:
        row.update(baseline=baseline["variant"] if baseline else None, test=None, b=None, c=None, n_paired=None)
        row.update(diff=None, diff_low=None, diff_high=None, p=float("nan"))
        if baseline is None or row is baseline:
            continue
        pairs = _pairs(row, baseline)
        if len(pairs) == 1:
            run, base = pairs[0]
            cr, cb = correctness(run), correctness(base)
            if cr is None or cb is None:
                row["test"] = f"no {PREDICTIONS} artifact"
                continue
            b, c, n = mcnemar_counts(cb, cr)
            d, lo, hi = paired_difference(b, c, n)
            row.update(test="McNemar", b=b, c=c, n_paired=n, diff=d, diff_low=lo, diff_high=hi, p=mcnemar_exact(b, c))
        elif len(pairs) > 1:
            diffs = [r.data.metrics[TEST_ACC] - base.data.metrics[TEST_ACC] for r, base in pairs]
            d, sd, k = statistics.fmean(diffs), statistics.stdev(diffs), len(diffs)
            half = T975.get(k - 1, 1.96) * sd / math.sqrt(k)
            t = d / (sd / math.sqrt(k)) if sd > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
            row.update(test=f"paired t, {k} seeds", n_paired=k, diff=d, diff_low=d - half, diff_high=d + half)
            row["p"] = t_two_sided_p(t, k - 1)
        else:
            row["test"] = "no shared seed"
    adjusted = holm([row["p"] for row in rows])
    for row, p_adj in zip(rows, adjusted, strict=True):
        row["p_holm"] = p_adj
        row["significant"] = bool(not math.isnan(p_adj) and p_adj < ALPHA)


# ---- files --------------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _p(x: float) -> str:
    if math.isnan(x):
        return ""
    return f"{x:.2g}" if x >= 1e-4 else "<1e-4"


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body)]


def write_markdown(rows: list[dict], path: Path, title: str, skipped: list[str]) -> None:
    paper = any(r["paper_acc"] is not None for r in rows)
    wups = any(r[k] is not None for r in rows for k in WUPS_KEYS)
    base = next((r["baseline"] for r in rows if r.get("baseline")), None)
    head = ["variant", "n", "test acc %", "95% interval"]
    head += [f"{wups_label(th)} %" for th in WUPS_THRESHOLDS] if wups else []
    head += [f"Δ acc vs `{base}` (points)", "95% interval of Δ", "p (Holm)", "test"] if base else []
    head += ["paper acc % (80 q)"] if paper else []
    body = []
    for r in rows:
        acc = _pct(r[TEST_ACC]) + (f" ± {100 * r['sd']:.1f}" if r["sd"] is not None else "")
        cells = [f"`{r['variant']}`", str(r["n"]), acc, f"{_pct(r['ci_low'])}–{_pct(r['ci_high'])}"]
        cells += [_pct(r[k]) for k in WUPS_KEYS] if wups else []
        if base and r["variant"] == base:
            cells += ["baseline", "", "", ""]
        elif base:
            diff = "" if r["diff"] is None else f"{100 * r['diff']:+.1f}"
            ci = "" if r["diff"] is None else f"{100 * r['diff_low']:+.1f} to {100 * r['diff_high']:+.1f}"
            mark = " **\\***" if r["significant"] else ""
            test = r["test"] or ""
            if r["b"] is not None:
                test += f" (b={r['b']}, c={r['c']}, {r['n_paired']} q)"
            cells += [diff, ci, _p(r["p_holm"]) + mark, test]
        if paper:
            cells.append(_pct(r["paper_acc"]))
        body.append(cells)
    lines = [f"# {title}", "", *_table(head, body), ""]
    lines.append(
        "Test accuracy is over the full test split; n = runs aggregated (differing only by seed; ± is the sd, the "
        "interval a t-interval of the mean). A single run's interval is a Wilson interval over the test questions "
        "it answered."
    )
    if wups:
        lines.append(
            "WUPS@0.9 / WUPS@0.0: Wu-Palmer similarity over WordNet noun synsets (Malinowski & Fritz 2014), scores "
            "below the threshold times 0.1; COCO-QA's standard soft accuracy."
        )
    if base:
        lines += [
            "",
            f"Paired comparison with `{base}` on the same test questions: Δ = accuracy minus the baseline's; for "
            "single runs an exact McNemar test on the questions only one of the two got right (b: only the "
            "baseline, c: only this row) with an Agresti-Min 95% interval of Δ; for rows of several seeds a paired "
            f"t-test over the shared seeds. p is Holm-adjusted over the rows; **\\*** marks p < {ALPHA:g}.",
        ]
    if paper:
        lines += [
            "",
            "The paper's numbers were measured on only 80 test questions (10 shuffled batches of 8), so each "
            "is uncertain by about ±11 points at 95%; ours use every test question.",
        ]
    types = list(TYPE_NAMES.values())
    type_head = ["variant", *[f"acc {t}" for t in types]]
    type_body = [[f"`{r['variant']}`", *[_pct(r[f"{TEST_ACC}/{t}"]) for t in types]] for r in rows]
    for key, th in zip(WUPS_KEYS, WUPS_THRESHOLDS, strict=True):
        if wups:
            type_head += [f"{wups_label(th)} {t}" for t in types]
            for cells, r in zip(type_body, rows, strict=True):
                cells += [_pct(r[f"{key}/{t}"]) for t in types]
    lines += ["", "## Per question type (%)", "", *_table(type_head, type_body)]
    train_head = ["variant", "val acc %", "prior %", "epochs", "steps", "trainable params", "wall s"]
    train_body = [
        [
            f"`{r['variant']}`",
            _pct(r[VAL_ACC]),
            _pct(r[TEST_PRIOR_ACC]),
            f"{float(r['epochs']):g}" if r["epochs"] else "",
            f"{r['steps']:.0f}" if r["steps"] else "",
            f"{r['trainable_params']:,.0f}" if r["trainable_params"] else "",
            f"{r['wall_s']:.0f}" if r["wall_s"] else "",
        ]
        for r in rows
    ]
    lines += ["", "## Training", "", *_table(train_head, train_body)]
    if skipped:
        lines += ["", f"Not in the table (not finished or without test metrics): {', '.join(skipped)}."]
    lines += ["", "![comparison](comparison.png)", "", "![learning curves](learning_curves.png)", ""]
    path.write_text("\n".join(lines))


def write_csv(rows: list[dict], path: Path) -> None:
    fields = [k for k in rows[0] if not k.startswith("_")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def pareto_section(client, runs: list, parent_run_id: str | None, out: Path) -> list[str]:
    """For a multi-objective Optuna study (its front's runs tagged ``clipqa.pareto_front``): a table of the front,
    one row per run on it, with the study's objectives (from the parent's ``optuna/optimization_results.yaml``), and
    the sweeper's ``pareto_front.png`` copied beside the report."""
    import yaml

    front = [r for r in runs if r.data.tags.get("clipqa.pareto_front") == "true"]
    if not front:
        return []
    names, directions = ["val/acc"], ["maximize"]
    if parent_run_id:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results = client.download_artifacts(parent_run_id, "optuna/optimization_results.yaml", tmp)
                study = yaml.safe_load(Path(results).read_text())
                names, directions = list(study["metric_names"]), list(study["directions"])
                plot = client.download_artifacts(parent_run_id, "optuna/pareto_front.png", tmp)
                shutil.copy(plot, out / "pareto_front.png")
            except Exception:  # an older study, or a front without a plot (more than two objectives)
                pass
    front.sort(key=lambda r: r.data.metrics.get(names[0], float("nan")), reverse=directions[0] == "maximize")
    head = ["run", *[f"{n} ({d[:3]})" for n, d in zip(names, directions, strict=True)]]
    body = [[f"`{r.info.run_name}`", *[f"{r.data.metrics.get(n, float('nan')):.4g}" for n in names]] for r in front]
    lines = ["", f"## Pareto front ({len(front)} of {len(runs)} trials)", "", *_table(head, body)]
    if (out / "pareto_front.png").is_file():
        lines += ["", "![Pareto front](pareto_front.png)"]
    return lines


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
