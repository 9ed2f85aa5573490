"""The paired comparison of every row with a baseline row on the same test questions: per-question correctness
from the runs' ``test_predictions.tsv``, an exact McNemar test for single runs, a paired t-test over shared seeds,
Holm's correction over the rows."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

from clipqa.errors import ClipqaError
from clipqa.metrics import TEST_ACC
from clipqa.report.runs import seed_of
from clipqa.report.statistics import ALPHA, T975, holm, mcnemar_exact, paired_difference, t_two_sided_p

PREDICTIONS = "test_predictions.tsv"  # the per-question artifact every run logs (clipqa.training.run)


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
    by_seed = {seed_of(r): r for r in base["_members"]}
    return [(r, by_seed[seed_of(r)]) for r in row["_members"] if seed_of(r) in by_seed]


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
