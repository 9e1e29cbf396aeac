"""Paired comparisons over seeds: mean difference, its 95 % interval, the paired t-test p-value.

Student's t distribution through the regularised incomplete beta function, evaluated with the
continued fraction of Numerical Recipes (`betacf`, modified Lentz), so that no SciPy is needed for one
distribution: P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2). The quantile inverts it by bisection.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t: the t with P(T <= t) = q."""
    target = 2.0 * (1.0 - q)  # two-sided tail mass at that t
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > target else (lo, mid)
    return (lo + hi) / 2.0


@dataclass
class Paired:
    n: int  # pairs (shared seeds)
    mean: float  # mean of (row - baseline)
    low: Optional[float]  # 95 % interval of the mean; None with one pair
    high: Optional[float]
    p: Optional[float]  # paired t-test, two-sided; None with one pair or no spread


def paired(row: list[float], baseline: list[float]) -> Paired:
    """Mean paired difference row - baseline, its 95 % t interval and the paired t-test p-value."""
    diffs = [r - b for r, b in zip(row, baseline)]
    n, mean = len(diffs), statistics.mean(diffs)
    if n < 2:
        return Paired(n, mean, None, None, None)
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    p = t_two_sided_p(mean / se, n - 1) if se > 0 else None
    return Paired(n, mean, mean - half, mean + half, p)
