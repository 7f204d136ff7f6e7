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


def p_any_per_window(p_values, volume: float) -> float:
    """P(at least one harmful output) among `volume` queries spread uniformly over the m prompts.

    1 - prod_i (1 - P_i)^(volume/m) = -expm1((volume/m) sum_i log1p(-P_i)), stable for tiny P_i
    and huge volumes alike.
    """
    p = check_probabilities(p_values, "p_values")
    v = check_volume(volume)
    if v == 0.0:
        return 0.0
    with np.errstate(divide="ignore"):
        log_none = float(np.sum(np.log1p(-p)))  # -inf when some P_i = 1
    return float(-math.expm1(v / p.size * log_none)) + 0.0  # + 0.0: never "-0" when all P_i = 0


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

    p_any_per_window's interval puts every prompt at its ci_low (resp. ci_high). Per-prompt
    IS estimates can exceed 1 when weights misbehave; they are clipped to [0, 1] here.
    """
    parse_window(window)
    v = check_volume(volume)
    ests = list(estimates)
    if not ests:
        raise InputError("estimates must not be empty")
    p = np.clip([e.p_hat for e in ests], 0.0, 1.0)
    lo = np.clip([e.ci_low for e in ests], 0.0, 1.0)
    hi = np.clip([e.ci_high for e in ests], 0.0, 1.0)
    expected = expected_per_window(agg, v)
    del expected["volume"]
    return {
        "window": window,
        "volume": v,
        "expected_per_window": expected,
        "p_any_per_window": {
            "p": p_any_per_window(p, v),
            "ci_low": p_any_per_window(lo, v),
            "ci_high": p_any_per_window(hi, v),
        },
        "worst_query": worst_query_forecast(p, v) if v > 0 else None,
    }
