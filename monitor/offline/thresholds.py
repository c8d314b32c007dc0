"""Thresholds at a target false-positive rate, and how sure we can be of the rate they achieve.

`monitor calibrate`, `monitor probe train` and `monitor eval` all pick thresholds here, so a
threshold means the same thing wherever it was set.
"""

from __future__ import annotations

import math

import numpy as np


def threshold_at_fpr(negative_scores: np.ndarray, target_fpr: float) -> tuple[float, float]:
    """The lowest threshold whose FPR on these negatives is at most `target_fpr`.

    A score fires when `score >= threshold`. Returns (threshold, achieved FPR).
    """
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    n = len(s)
    if n == 0:
        raise ValueError("no negative samples to calibrate on")
    allowed = math.floor(target_fpr * n)  # negatives allowed at or above the threshold
    if allowed >= n:
        return float(s[-1]), 1.0
    # Just above the (allowed+1)-th highest negative: at most `allowed` negatives reach it.
    thr = float(np.nextafter(s[allowed], np.inf))
    return thr, float((s >= thr).sum() / n)


def min_samples(target_fpr: float) -> int:
    return math.ceil(3.0 / target_fpr)


def _binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0 if k < n else 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
            for i in range(k + 1)]
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(x - m) for x in logs))


def fpr_upper_bound(false_positives: int, n: int, confidence: float = 0.95) -> float:
    """Clopper-Pearson one-sided upper bound: the p at which seeing <= k positives has prob 1 - confidence."""
    if false_positives >= n:
        return 1.0
    lo, hi = false_positives / n, 1.0
    for _ in range(60):  # bisection to ~1e-18
        mid = (lo + hi) / 2
        if _binom_cdf(false_positives, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi
