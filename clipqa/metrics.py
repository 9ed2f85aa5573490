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


def test_type_key(type_code: int) -> str:
    """``test/acc/<type name>`` for a COCO-QA type code."""
    return f"{TEST_ACC}/{TYPE_NAMES[type_code]}"


def accuracy_by_type(correct: Sequence[bool], types: Sequence[int], prefix: str) -> dict[str, float]:
    """Overall and per-type accuracy.

    Returns ``{prefix: acc, prefix/object: acc, ...}`` (floats in [0, 1]). A type with no questions gets NaN
    (written as ``null`` in metrics.json) rather than a made-up number.
    """
    out = {prefix: sum(correct) / len(correct) if correct else float("nan")}
    for code, name in TYPE_NAMES.items():
        hits = [c for c, t in zip(correct, types, strict=True) if t == code]
        out[f"{prefix}/{name}"] = sum(hits) / len(hits) if hits else float("nan")
    return out


def answer_prior(answers: Sequence[str], types: Sequence[int]) -> dict[int, str]:
    """The most frequent answer of each question type (ties broken alphabetically, so it is deterministic)."""
    counts: dict[int, Counter] = {}
    for answer, qtype in zip(answers, types, strict=True):
        counts.setdefault(qtype, Counter())[answer] += 1
    return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}
