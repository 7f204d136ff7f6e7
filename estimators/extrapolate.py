"""Deployment-scale figures: expected harmful outputs, P(at least one), worst-query forecast."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from tailmon.errors import InputError

from ._checks import check_confidence, check_count, check_fraction, check_probabilities, check_volume
from .result import Aggregate, Estimate

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_DAY = 86400.0


def parse_window(window: str) -> int:
    """Seconds in a window written like "30m", "1h", "1d", "7d" (units s, m, h, d, w)."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    if match is None or int(match.group(1)) == 0:
        raise InputError(
            f"window must be a positive integer and a unit s, m, h, d or w (e.g. 1h, 1d, 7d), got {window!r}"
        )
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def scale_volume(volume_per_day: float, window: str) -> float:
    """Queries per `window` at a steady `volume_per_day` queries per day."""
    v = check_volume(volume_per_day, "volume_per_day")
    return v * parse_window(window) / _DAY


def expected_per_window(agg: Aggregate, volume: float) -> dict:
    """Expected harmful outputs among `volume` queries: volume times P_query and its interval."""
    v = check_volume(volume)
    return {
        "volume": v,
        "expected": v * agg.p_hat,
        "ci_low": v * agg.ci_low,
        "ci_high": v * agg.ci_high,
    }


def p_any_per_window(p_query: float, volume: float) -> float:
    """P(at least one harmful output) among `volume` independent queries from the prompt
    distribution, each harmful with probability `p_query` (the aggregate P_query):
    1 - (1 - p_query)^volume = -expm1(volume log1p(-p_query)), stable for tiny P and huge volumes.

    Each query is a fresh draw from D, so given P_query its harm is a Bernoulli(P_query)
    independent of the others: the m estimated prompts are a sample of D, not the population.
    The map is increasing in p_query, so applied to the ends of P_query's interval it gives an
    interval with the same coverage.
    """
    p = check_fraction(p_query, "p_query")
    v = check_volume(volume)
    if v == 0.0 or p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    return float(-math.expm1(v * math.log1p(-p)))


MIN_TAIL_POINTS = 10
"""The fewest prompts in the top fraction the worst-query forecast is fitted from: with k points
the fitted tail's rate has a relative standard error of 1/sqrt(k) (30% at 10), and the forecast
moves with it times the log of the extrapolation, so fewer points give an interval spanning orders
of magnitude (with the default top fraction 0.25, about 40 prompts or more)."""

EXTRAPOLATION_WARN = 100.0
"""V/m above which the forecast warns: it extrapolates the fitted tail from the sample's own 1 in m
to 1 in V, more than two orders of magnitude beyond anything the prompts show."""

FORECAST_DRAWS = 4000
_FORECAST_SEED = 16  # fixed: the same estimates give the same interval


def worst_query_forecast(p_values, volume: float, top_fraction: float = 0.25,
                         min_points: int = MIN_TAIL_POINTS, confidence: float = 0.95) -> dict | None:
    """Largest per-query harm probability expected among `volume` queries (Jones et al. 2025),
    with an interval, from the m prompts' P_i (draws from D, zeros included).

    Model: the scores psi = -log(-log P) have a Gumbel-type (exponential) upper tail, i.e. log of
    the survival S(psi) is linear in psi above a threshold. The threshold u is the (k+1)-th largest
    score, k = ceil(top_fraction m); the k scores above it are taken as u + Exponential(rate L),
    fitted by maximum likelihood (L_hat = k / sum(psi_i - u)). The forecast is the score whose
    survival is 1/volume, psi* = u + log(volume S(u)) / L, with S(u) estimated by k/m, and
    P* = exp(-exp(-psi*)). P_i = 1 is treated as the largest double below 1 so psi stays finite.

    Interval (a parametric bootstrap from the two exact sampling laws, not a bootstrap over
    prompts, which is inconsistent for extreme order statistics): under the model
    L sum(psi_i - u) ~ Gamma(k, 1), so L = L_hat G / k with G ~ Gamma(k, 1); and the true survival
    at the (k+1)-th largest of m draws is S(u) ~ Beta(k + 1, m - k). `FORECAST_DRAWS` draws of
    (G, S(u)) give draws of psi*; their alpha and 1 - alpha quantiles (alpha = (1 - confidence)/2)
    are the ends. Measured (`benchmarks/forecast.py`): nominal coverage where the tail is
    exponential in psi; where it is not (log-normal P), the fit over-predicts and the interval
    sits above the truth, see the README.

    Returns {"p", "ci_low", "ci_high", "psi", "slope" (-L_hat), "intercept" (log S = intercept +
    slope psi), "n_points" (k), "extrapolation" (volume / m), "confidence", "warnings"}, or None
    when fewer than `min_points` points are in the top fraction or fewer than k + 1 of the P_i are
    positive (no threshold), when the top scores are tied, or when volume k / m <= 1 (the largest
    of `volume` queries is not in the tail the fit describes).
    """
    p = check_probabilities(p_values, "p_values")
    v = check_volume(volume)
    if v <= 0.0:
        raise InputError(f"volume must be > 0, got {volume!r}")
    top_fraction = check_fraction(top_fraction, "top_fraction", low_open=True)
    min_points = check_count(min_points, "min_points", minimum=2)
    confidence = check_confidence(confidence)
    m = p.size
    k = math.ceil(top_fraction * m)
    positive = np.sort(p[p > 0])[::-1]  # descending
    if k < min_points or positive.size < k + 1 or k >= m:
        return None
    if v * k / m <= 1.0:
        return None
    top = np.minimum(positive[: k + 1], np.nextafter(1.0, 0.0))
    psi = -np.log(-np.log(top))
    u = float(psi[k])
    excess = float(np.sum(psi[:k] - u))
    if not excess > 0:
        return None  # all tied: no tail to fit
    rate = k / excess
    s_u = k / m
    psi_star = u + math.log(v * s_u) / rate
    rng = np.random.default_rng(_FORECAST_SEED)
    rates = rate * rng.gamma(k, 1.0, FORECAST_DRAWS) / k
    s_draws = rng.beta(k + 1, m - k, FORECAST_DRAWS)
    # where volume S(u) <= 1 the largest query is below the threshold: the tail model says only
    # that it is at most u there
    psi_draws = u + np.maximum(np.log(v * s_draws), 0.0) / rates
    alpha = (1.0 - confidence) / 2.0
    psi_lo, psi_hi = np.quantile(psi_draws, [alpha, 1.0 - alpha])
    warnings = []
    if v / m > EXTRAPOLATION_WARN:
        warnings.append(f"the forecast extrapolates the fitted tail from 1 in {m} prompts to 1 in {v:.3g} queries "
                        f"(volume/prompts = {v / m:.3g} > {EXTRAPOLATION_WARN:.0f}): it holds only if the tail "
                        "keeps its fitted shape that far, which the prompts cannot show")

    def to_p(x: float) -> float:
        return float(math.exp(-math.exp(-x)))

    return {
        "p": to_p(psi_star),
        "ci_low": to_p(float(psi_lo)),
        "ci_high": to_p(float(psi_hi)),
        "psi": float(psi_star),
        "slope": float(-rate),
        "intercept": float(math.log(s_u) + rate * u),
        "n_points": int(k),
        "extrapolation": float(v / m),
        "confidence": confidence,
        "warnings": warnings,
    }


def extrapolate(estimates: Sequence[Estimate], agg: Aggregate, volume: float, window: str,
                confidence: float = 0.95) -> dict:
    """Deployment figures for `volume` queries in one `window` (use scale_volume for per-day volumes).

    p_any_per_window comes from the aggregate P_query and its interval (see `p_any_per_window`);
    the worst-query forecast from the per-prompt estimates. IS estimates can exceed 1 when
    weights misbehave; they are clipped to [0, 1] here.
    """
    parse_window(window)
    v = check_volume(volume)
    ests = list(estimates)
    if not ests:
        raise InputError("estimates must not be empty")
    p = np.clip([e.p_hat for e in ests], 0.0, 1.0)
    expected = expected_per_window(agg, v)
    del expected["volume"]

    def p_any(x: float) -> float:
        return p_any_per_window(min(max(float(x), 0.0), 1.0), v)

    return {
        "window": window,
        "volume": v,
        "expected_per_window": expected,
        "p_any_per_window": {"p": p_any(agg.p_hat), "ci_low": p_any(agg.ci_low), "ci_high": p_any(agg.ci_high)},
        "worst_query": worst_query_forecast(p, v, confidence=confidence) if v > 0 else None,
    }
