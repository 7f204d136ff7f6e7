"""Deployment-scale figures: expected harmful outputs, P(at least one), worst-query forecast."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from tailmon.errors import InputError

from ._checks import check_count, check_fraction, check_probabilities, check_volume
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


def worst_query_forecast(p_values, volume: float, top_fraction: float = 0.25, min_points: int = 3) -> dict | None:
    """Largest per-query harm probability expected among `volume` queries (Jones et al. 2025).

    Scores psi_i = -log(-log P_i) of the m prompts; the r-th largest has empirical survival
    r/m (m counts every prompt, zeros included, since all are draws from D). A Gumbel-type
    tail makes log S linear in psi: fit log S = a + b psi by least squares on the top
    max(min_points, ceil(top_fraction m)) scores (at most the positive ones), and solve
    S(psi*) = 1/volume: psi* = (log(1/volume) - a)/b, P* = exp(-exp(-psi*)).
    P_i = 1 is treated as the largest double below 1 (psi about 36.7) so it stays finite.
    Returns {"p", "psi", "slope", "intercept", "n_points"}, or None when fewer than
    `min_points` P_i are positive or the fitted slope is not negative.
    """
    p = check_probabilities(p_values, "p_values")
    v = check_volume(volume)
    if v <= 0.0:
        raise InputError(f"volume must be > 0, got {volume!r}")
    top_fraction = check_fraction(top_fraction, "top_fraction", low_open=True)
    min_points = check_count(min_points, "min_points", minimum=2)
    m = p.size
    positive = np.sort(p[p > 0])[::-1]  # descending
    if positive.size < min_points:
        return None
    k = min(positive.size, max(min_points, math.ceil(top_fraction * m)))
    top = np.minimum(positive[:k], np.nextafter(1.0, 0.0))
    psi = -np.log(-np.log(top))
    log_s = np.log(np.arange(1, k + 1, dtype=np.float64) / m)
    if np.ptp(psi) == 0.0:
        return None  # all tied: no slope to fit
    slope, intercept = np.polyfit(psi, log_s, 1)
    if not slope < 0:
        return None
    psi_star = (math.log(1.0 / v) - intercept) / slope
    p_star = math.exp(-math.exp(-psi_star))
    return {
        "p": float(p_star),
        "psi": float(psi_star),
        "slope": float(slope),
        "intercept": float(intercept),
        "n_points": int(k),
    }


def extrapolate(estimates: Sequence[Estimate], agg: Aggregate, volume: float, window: str) -> dict:
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
        "worst_query": worst_query_forecast(p, v) if v > 0 else None,
    }
