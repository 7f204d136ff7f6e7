"""Binomial confidence intervals (Wilson, Clopper-Pearson), the clipped normal interval, the
stratified bootstrap-t interval (the main interval of importance sampling) and a bound on the mean
of any independent variables in [0, 1] (the conservative bound).

All intervals lie within [0, 1] and none has zero width at k = 0: a Monte Carlo run that saw
no harmful output still reports an honest upper bound (Wilson's z^2 / (n + z^2), about 3.8/n at
95%). Every interval is two-sided, so each end is a one-sided bound at (1 + confidence) / 2.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special, stats

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


def bounded_mean_upper(x, confidence: float = 0.95) -> float:
    """Upper confidence bound on the mean of independent variables in [0, 1], valid whatever
    their distributions: the upper end of a two-sided interval at `confidence`, i.e. a one-sided
    bound at level (1 + confidence) / 2.

    The bound is Hoeffding's (1963, Theorem 1) Chernoff bound inverted: U is the largest m >= mean(x)
    with n KL(mean(x) || m) <= log(1 / delta), delta = (1 - confidence) / 2, KL the Bernoulli
    Kullback-Leibler divergence. Validity for independent, NOT identically distributed X_i in
    [0, 1] with mean mu = (1/n) sum E[X_i] (the strata of an importance-sampling mixture have
    different means): for lam >= 0, convexity gives E exp(-lam X_i) <= 1 - m_i + m_i e^(-lam),
    and the product over i is at most (1 - mu + mu e^(-lam))^n by the AM-GM inequality, so the
    Chernoff argument gives P(mean(x) <= s) <= exp(-n KL(s || mu)) for every s < mu, exactly as for
    n Bernoulli(mu) draws. The event U < mu is the event mean(x) < s*(mu) with
    n KL(s*(mu) || mu) = log(1 / delta), of probability at most delta. In betting terms it is the
    test of the mean mu with a constant bet fixed by mu and delta before the data, which is what
    stays valid when the variables' means differ (a bet that adapts to the data seen so far, as in
    the hedged capital process, assumes a common conditional mean).
    At mean(x) = 0 the bound is 1 - delta^(1/n), the exact Clopper-Pearson bound for zero successes:
    no bound valid for every distribution on [0, 1] can be smaller, since n draws of a variable that
    is 1 with probability 1 - delta^(1/n) and 0 otherwise are all 0 with probability delta.
    Sums of [0, 1] variables are dominated by binomial ones in the convex order, which bounds
    expectations of convex functions, not tail probabilities, so that argument does not make a
    Clopper-Pearson bound on a non-integer sum valid (it gives this Chernoff bound); this one is
    proven. Above the floor it is up to about 20% wider than that Clopper-Pearson figure.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError("x must be a non-empty 1-D array of numbers in [0, 1]")
    if not np.all(np.isfinite(arr)) or (arr < 0).any() or (arr > 1.0 + 1e-9).any():
        raise InputError("x must hold numbers in [0, 1]")
    return chernoff_upper(float(np.mean(np.minimum(arr, 1.0))), arr.size, confidence)


def chernoff_upper(mean: float, n: int, confidence: float = 0.95) -> float:
    """`bounded_mean_upper` from the sample mean of n independent variables in [0, 1]: the bound
    depends on the data only through their mean and count, so samples of several prompts can be
    bounded together from each prompt's own mean and count (`estimators.pooling`)."""
    n = int(n)
    if n < 1:
        raise InputError(f"n must be >= 1, got {n!r}")
    mean = float(mean)
    if not (math.isfinite(mean) and -1e-12 <= mean <= 1.0 + 1e-9):
        raise InputError(f"mean must be in [0, 1], got {mean!r}")
    delta = (1.0 - check_confidence(confidence)) / 2.0
    xbar = min(max(mean, 0.0), 1.0)
    if xbar >= 1.0:
        return 1.0
    thr = math.log(1.0 / delta) / n
    if xbar <= 0.0:
        return float(-math.expm1(-thr))  # -n log(1 - m) = log(1/delta)

    def excess(m: float) -> float:
        kl = xbar * math.log(xbar / m) + (1.0 - xbar) * (math.log1p(-xbar) - math.log1p(-m))
        return kl - thr

    top = 1.0 - 1e-15
    if excess(top) <= 0.0:
        return 1.0
    return float(optimize.brentq(excess, xbar, top, xtol=1e-300, rtol=1e-13, maxiter=500))


def bootstrap_t_interval(x, strata=None, confidence: float = 0.95, *, n_boot: int = 1999,
                         seed: int = 0) -> tuple[float, float, float]:
    """Stratified bootstrap-t interval for the mean of `x` (within-stratum resampling, the
    strata being the mixture components drawn in fixed counts).

    T = (mean - mu) / SE, SE the stratified standard error, is resampled within strata as
    T* = (mean* - mean) / SE*; the ends are mean - q(1 - a) SE and mean - q(a) SE with q the
    quantiles of T* and a = (1 - confidence) / 2 in each tail. Unlike mean +- z SE it follows the
    skewness of mean(w h): a sample that missed large weights has a small SE too, T has a long
    left tail, and the upper end moves up accordingly. Returns (low, high, se) unclipped; high is
    +inf when more than a fraction a of the resamples have SE* = 0 below the mean (too few
    distinct values to studentise). Deterministic for a given seed.
    """
    v = np.asarray(x, dtype=np.float64)
    alpha = (1.0 - check_confidence(confidence)) / 2.0
    n = v.size
    groups = [v] if strata is None else [v[strata == j] for j in np.unique(strata)]
    rng = np.random.default_rng(seed)
    mean = float(v.mean())
    se = _stratified_se(groups, n)
    total = np.zeros(n_boot)
    var = np.zeros(n_boot)
    for g in groups:
        nj = g.size
        if nj < 2 or not (g > g[0]).any() and not (g < g[0]).any():
            total += g.sum()  # a constant stratum resamples to itself
            continue
        # resample in chunks to bound memory at about 2 million values
        step = max(1, 2_000_000 // nj)
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            r = g[rng.integers(0, nj, size=(stop - start, nj))]
            s = r.sum(axis=1)
            total[start:stop] += s
            var[start:stop] += nj * np.maximum((np.sum(r * r, axis=1) - s * s / nj) / (nj - 1), 0.0)
    means = total / n
    ses = np.sqrt(var) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(ses > 0, (means - mean) / ses, np.sign(means - mean) * np.inf)
    t = np.nan_to_num(t, nan=0.0, posinf=np.inf, neginf=-np.inf)
    t.sort()
    # the a(B+1)-th smallest and largest of B values: the usual bootstrap-t quantile convention
    i = max(int(math.floor(alpha * (n_boot + 1))) - 1, 0)
    q_low, q_high = float(t[i]), float(t[n_boot - 1 - i])
    high = mean - q_low * se if math.isfinite(q_low) else math.inf
    low = mean - q_high * se if math.isfinite(q_high) else -math.inf
    if se == 0.0:
        high = mean if math.isfinite(q_low) else math.inf
        low = mean if math.isfinite(q_high) else -math.inf
    return float(low), float(high), float(se)


def _stratified_se(groups, n: int) -> float:
    total = sum(g.size * float(np.var(g, ddof=1)) for g in groups if g.size >= 2)
    return math.sqrt(total) / n
