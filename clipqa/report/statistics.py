"""The statistics of the comparison report, each checked against a hand computation in the tests: Wilson
intervals, the exact McNemar test, the Agresti-Min interval of a paired difference, Student's t p-values and Holm's
correction."""

from __future__ import annotations

import math

# t_{0.975, df} for 95% intervals of a mean over few seeds
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
ALPHA = 0.05  # significance level of the Holm-corrected comparisons


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
