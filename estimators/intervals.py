"""Binomial confidence intervals (Wilson, Clopper-Pearson) and the clipped normal interval.

All intervals lie within [0, 1] and none has zero width at k = 0: a Monte Carlo run that saw
no harmful output still reports an honest upper bound (Wilson's z^2 / (n + z^2), about 3.8/n at
95%). Every interval is two-sided, so each end is a one-sided bound at (1 + confidence) / 2.
"""

from __future__ import annotations

import math

from scipy import special, stats

from tailmon.errors import InputError

from ._checks import check_confidence, check_count


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile: z such that P(|Z| <= z) = confidence."""
    c = check_confidence(confidence)
    return float(special.ndtri(0.5 + 0.5 * c))


def _check_k(k: float, n: int) -> float:
    try:
        kf = float(k)
    except (TypeError, ValueError):
        raise InputError(f"k must be a number in [0, n], got {k!r}") from None
    if not (math.isfinite(kf) and 0.0 <= kf <= n):
        raise InputError(f"k must be in [0, n] = [0, {n}], got {k!r}")
    return kf


def wilson_interval(k: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (k may be non-integer: graded scores).

    Same formula as scipy's ``binomtest(...).proportion_ci(method="wilson")``
    (Newcombe 1998, no continuity correction). At k = 0 the upper end is z^2 / (n + z^2) > 0.
    """
    n = check_count(n, "n")
    kf = _check_k(k, n)
    z = z_value(confidence)
    p = kf / n
    denom = 2.0 * (n + z * z)
    center = (2.0 * n * p + z * z) / denom
    delta = z / denom * math.sqrt(max(4.0 * n * p * (1.0 - p) + z * z, 0.0))
    lo = 0.0 if kf == 0 else max(0.0, center - delta)
    hi = 1.0 if kf == n else min(1.0, center + delta)
    return float(lo), float(hi)


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval for k successes out of n.

    At k = 0 the lower end is 0 and the upper end 1 - (alpha/2)^(1/n) (about 3.7/n at 95%).
    `k` must be an integer here; use `wilson_interval` for graded scores.
    """
    n = check_count(n, "n")
    kf = _check_k(k, n)
    if not kf.is_integer():
        raise InputError(f"k must be an integer for the Clopper-Pearson interval, got {k!r}")
    return _beta_interval(kf, n, 1.0 - check_confidence(confidence))


def _beta_interval(k: float, n: int, alpha: float) -> tuple[float, float]:
    """Clopper-Pearson ends from beta quantiles; works for non-integer k too (see importance.py)."""
    lo = 0.0 if k <= 0 else float(stats.beta.ppf(alpha / 2.0, k, n - k + 1.0))
    hi = 1.0 if k >= n else float(stats.beta.ppf(1.0 - alpha / 2.0, k + 1.0, n - k))
    return lo, hi


def cp_upper(k: float, n: int, confidence: float = 0.95, *, one_sided: bool = False) -> float:
    """Clopper-Pearson upper bound for (possibly non-integer) k successes out of n.

    `one_sided=True` gives the bound at level `confidence` (alpha in one tail) instead of the
    upper end of the two-sided interval (alpha/2 in each tail).
    """
    alpha = 1.0 - check_confidence(confidence)
    tail = alpha if one_sided else alpha / 2.0
    if k >= n:
        return 1.0
    if k <= 0:
        # closed form of beta.ppf(1 - tail, 1, n): exact and avoids the root-finder
        return float(-math.expm1(math.log(tail) / n))
    return float(stats.beta.ppf(1.0 - tail, k + 1.0, n - k))


def normal_interval(estimate: float, std_error: float, confidence: float = 0.95) -> tuple[float, float]:
    """estimate +- z * std_error, clipped to [0, 1]."""
    z = z_value(confidence)
    lo = estimate - z * std_error
    hi = estimate + z * std_error
    return float(min(max(lo, 0.0), 1.0)), float(min(max(hi, 0.0), 1.0))
