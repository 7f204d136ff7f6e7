"""Importance-weight diagnostics: effective sample size and the PSIS Pareto k-hat.

k-hat follows Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto smoothed importance sampling"
(2015/2024): fit a generalized Pareto distribution (GPD) to the largest weights; its shape k
says how heavy the weights' tail is. k < 1/2: finite variance; k < 0.7 (or the sample-size
threshold 1 - 1/log10(n)): the estimate is dependable in practice; k >= 1: not even the mean
is finite. The GPD is fitted with the Zhang & Stephens (2009) empirical-Bayes estimator plus
the weakly informative prior PSIS uses (shrink k towards 0.5 as if by 10 pseudo-observations),
as in the reference implementations (R `loo`, ArviZ).
"""

from __future__ import annotations

import math

import numpy as np

from tailmon.errors import InputError

from ._checks import as_1d

# Weights whose logs differ by at most this many nats are ties. The same response drawn by two
# components gets its weight from two float32 computations (the drawing component's sampled
# log-prob, the other's teacher-forced score), which differ by up to 1.2e-4 nats on the embedded
# model (measured, see tailmon.estimation.pipeline.RESCORE_TOLERANCE); 1e-3 is 8 times that. Left
# exact, a plateau of one frequent response sitting on the tail's threshold enters the fit as
# exceedances of 1e-7 relative to it, which the GPD reads as a shape of 6 to 7 (measured on the
# demo's bounded weights, w <= 10). A genuine tail's exceedances are on the scale of the weights.
TIE_LOG_TOL = 1e-3

# Returned when the largest weights are all tied (constant weights included): a tail with no
# spread at all is bounded, the lightest possible kind. Its GPD shape is -inf in theory; we
# report the finite, JSON-safe -1.0 (the shape of a uniform, i.e. bounded, GPD), which passes
# every reliability threshold just as -inf would.
KHAT_TIED_TAIL = -1.0


def effective_sample_size(weights) -> float:
    """Kish effective sample size (sum w)^2 / sum w^2; 0 when every weight is 0."""
    w = _check_weights(weights)
    return _ess(w)


def _ess(w: np.ndarray) -> float:
    m = float(np.max(w)) if w.size else 0.0
    if m <= 0.0 or not math.isfinite(m):
        return 0.0
    ws = w / m  # scale-free; avoids overflow of w^2
    return float(ws.sum() ** 2 / np.sum(ws * ws))


def _check_weights(weights) -> np.ndarray:
    w = as_1d(weights, "weights")
    if np.isnan(w).any() or (w < 0).any() or np.isinf(w).any():
        raise InputError("weights must be finite and >= 0")
    return w


def khat_threshold(n: int) -> float:
    """The reliability threshold on k-hat for n draws: min(0.7, 1 - 1/log10(n)) (DESIGN section 8)."""
    if n <= 1:
        return -math.inf
    return min(0.7, 1.0 - 1.0 / math.log10(n))


def tail_length(n: int) -> int:
    """M = ceil(min(0.2 n, 3 sqrt(n))): how many of the largest weights PSIS fits."""
    return int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))


def pareto_khat(weights) -> float | None:
    """PSIS k-hat of importance weights (scale-free: only ratios of weights matter).

    The tail is the weights strictly above the (M+1)-th largest, M = ceil(min(0.2 n, 3 sqrt(n))),
    weights within TIE_LOG_TOL nats of each other counting as equal (float rounding).
    Returns:
      * None when n < 10 (too few draws to say anything), or when ties leave 1 to 4 weights
        strictly above the threshold (too few to fit, and a handful of weights standing out
        above a plateau is not evidence of a light tail);
      * KHAT_TIED_TAIL (-1.0) when no weight lies strictly above the threshold (constant weights
        included) or the 5 or more above it are all equal: a tail without spread is bounded;
      * otherwise the fitted shape.
    """
    w = _check_weights(weights)
    return _khat(w)


# The k-hat of w*h is fitted only from at least this many hits, i.e. from a PSIS tail of
# M = ceil(min(0.2 n, 3 sqrt n)) = 10 points. The GPD fit itself runs from 5 points (n = 21, as R
# `loo` refuses a shorter tail), but the hits' k-hat is a reliability check, and from 5-9 points it
# is noise: on hits whose log-weights are normal with sd 0.5 (a light tail: the true shape is
# below 0) it exceeded the n = 300 threshold in 8.5% of runs with about 20 hits
# (benchmarks/intervals.py's world), flagging one run in twelve for nothing. Below 50 hits the
# ESS of w*h, the hit count and the spread allowance (importance.py) deal with the hits.
MIN_HITS_KHAT = 50


def khat_of_hits(wh) -> float | None:
    """PSIS k-hat of the products w*h over the samples with w*h > 0 (the hits).

    The weights' k-hat is fitted on all draws, so with a defensive share it describes the
    non-hits and stays near 0 whatever the hits' weights do; the estimate mean(w h) is carried
    by the hits alone, and this checks their tail. The non-hits are left out: they are all 0,
    not a tail. None when fewer than MIN_HITS_KHAT hits (too few for the tail fit); otherwise
    as `pareto_khat` on the hits.
    """
    x = _check_weights(wh)
    return _khat_of_hits(x)


def _khat_of_hits(wh: np.ndarray) -> float | None:
    hits = wh[wh > 0]
    if hits.size < MIN_HITS_KHAT:
        return None
    return _khat(hits)


def _khat(w: np.ndarray) -> float | None:
    n = w.size
    if n < 10:
        return None
    m = float(np.max(w))
    if m <= 0.0:
        return KHAT_TIED_TAIL  # all weights zero: constant
    ws = np.sort(w / m)  # ascending, largest = 1
    M = tail_length(n)
    threshold = ws[n - M - 1]  # the (M+1)-th largest
    tie = math.exp(TIE_LOG_TOL)
    tail = ws[n - M:]
    tail = tail[tail > threshold * tie]  # ties with the threshold, up to rounding, are no tail
    if tail.size == 0:
        return KHAT_TIED_TAIL
    if tail.size < 5:
        return None
    exceed = tail - threshold
    if tail[-1] <= tail[0] * tie:  # five or more tied weights above the threshold: an atom
        return KHAT_TIED_TAIL
    return _gpd_shape(exceed)


def _gpd_shape(x: np.ndarray) -> float:
    """Zhang & Stephens (2009) posterior-mean GPD shape for sorted exceedances x > 0, with the
    PSIS weakly informative prior k <- (M k + 10 * 0.5) / (M + 10).

    Parametrisation: GPD(sigma, k) with survival (1 + k x / sigma)^(-1/k), so k > 0 is a heavy
    tail. Zhang & Stephens profile over theta = -k / sigma on a quasi-grid of 30 + sqrt(M) points,
    weighting each by its profile likelihood. Same algorithm as loo::gpdfit and ArviZ's _gpdfit.
    """
    n = x.size
    prior_bs = 3.0
    prior_k = 10.0
    m_est = 30 + int(math.sqrt(n))
    j = np.arange(1, m_est + 1, dtype=np.float64)
    # theta grid: centred on 1/x_max, spread scaled by the first quartile of x (all < 1/x_max so
    # that 1 - theta * x > 0 for every x)
    x_quart = x[int(n / 4.0 + 0.5) - 1]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m_est / (j - 0.5))) / (prior_bs * x_quart)
    # profile MLE of k for each theta (here k is the "heavy > 0" sign convention)
    k_grid = np.log1p(-theta[:, None] * x[None, :]).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lik = n * (np.log(-theta / k_grid) - k_grid - 1.0)
    log_lik = np.where(np.isfinite(log_lik), log_lik, -np.inf)
    # normalised posterior weights of the grid points, computed stably
    log_lik -= np.max(log_lik)
    post = np.exp(log_lik)
    post[post < 10 * np.finfo(float).eps * post.sum()] = 0.0
    post /= post.sum()
    theta_hat = float(np.sum(theta * post))
    k = float(np.log1p(-theta_hat * x).mean())
    return (n * k + prior_k * 0.5) / (n + prior_k)
