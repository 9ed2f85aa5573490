"""Metric names (defined once: metrics.json, the tracker and the sweep objective use these) and accuracy helpers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

# COCO-QA type codes (types.txt) -> names used in metric keys.
TYPE_NAMES: dict[int, str] = {0: "object", 1: "number", 2: "color", 3: "location"}

TEST_ACC = "test/acc"
VAL_ACC = "val/acc"
VAL_LOSS = "val/loss"
TEST_PRIOR_ACC = "test/prior_acc"
TRAIN_LOSS = "train/loss"
OBJECTIVE = VAL_ACC  # what train.py returns to a sweeper

# COCO-QA's soft accuracy (Malinowski & Fritz 2014; Ren et al. 2015 report WUPS@0.9 and WUPS@0.0):
# clipqa.evaluation.wups.
WUPS_THRESHOLDS = (0.9, 0.0)
N_TEST_EVALUATED = "data/n_test_evaluated"  # test questions actually answered (intervals use this count)


def wups_key(threshold: float, split: str = "test") -> str:
    """``test/wups_0.9`` (MLflow metric names cannot hold ``@``; the report prints WUPS@0.9); per type
    ``test/wups_0.9/<type name>``."""
    return f"{split}/wups_{threshold:.1f}"


def wups_label(threshold: float) -> str:
    """How the report names the metric: ``WUPS@0.9``."""
    return f"WUPS@{threshold:.1f}"


def test_type_key(type_code: int) -> str:
    """``test/acc/<type name>`` for a COCO-QA type code."""
    return f"{TEST_ACC}/{TYPE_NAMES[type_code]}"


def mean_by_type(values: Sequence[float], types: Sequence[int], prefix: str) -> dict[str, float]:
    """Overall and per-type mean of a per-question score (1/0 for accuracy, a WUPS score in [0, 1]).

    Returns ``{prefix: mean, prefix/object: mean, ...}``. A type with no questions gets NaN (written as ``null`` in
    metrics.json) rather than a made-up number.
    """
    out = {prefix: sum(values) / len(values) if values else float("nan")}
    for code, name in TYPE_NAMES.items():
        hits = [c for c, t in zip(values, types, strict=True) if t == code]
        out[f"{prefix}/{name}"] = sum(hits) / len(hits) if hits else float("nan")
    return out


def accuracy_by_type(correct: Sequence[bool], types: Sequence[int], prefix: str) -> dict[str, float]:
    """Overall and per-type accuracy: ``{prefix: acc, prefix/object: acc, ...}`` (floats in [0, 1])."""
    return mean_by_type([float(c) for c in correct], types, prefix)


def answer_prior(answers: Sequence[str], types: Sequence[int]) -> dict[int, str]:
    """The most frequent answer of each question type (ties broken alphabetically, so it is deterministic)."""
    counts: dict[int, Counter] = {}
    for answer, qtype in zip(answers, types, strict=True):
        counts.setdefault(qtype, Counter())[answer] += 1
    return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}
