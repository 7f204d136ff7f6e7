"""Deployment extrapolation: expected count, P(at least one), worst-query forecast, windows."""

import json
import math
from decimal import Decimal, localcontext

import numpy as np
import pytest

from tailmon.errors import InputError
from tailmon.estimators import (
    aggregate,
    expected_per_window,
    extrapolate,
    monte_carlo,
    p_any_per_window,
    parse_window,
    scale_volume,
    worst_query_forecast,
)


def exact_p_any(p: str, V: int) -> float:
    """1 - (1 - P)^V in 60-digit decimal arithmetic (V an integer: exact repeated squaring)."""
    with localcontext() as ctx:
        ctx.prec = 60
        return float(1 - (1 - Decimal(p)) ** V)


@pytest.mark.parametrize("p, V", [("0.01", 1000), ("1e-9", 10 ** 9), ("1e-12", 10 ** 6), ("0.3", 7),
                                  ("1e-15", 10 ** 12), ("0", 10 ** 12)])
def test_p_any_is_one_minus_the_chance_that_no_query_is_harmful(p, V):
    # log1p and expm1 are each within an ulp or two, and V log1p(-P) keeps that relative error
    # (|V log1p(-P)| <= 1e3 here, so the exponent is off by at most ~1e3 x 2e-16 absolutely, a
    # relative error below 1e-12 after expm1). The naive 1 - (1 - P)**V fails it: rounding 1 - P
    # to a double costs P's relative precision ~1e-16 / P (1e-4 at P = 1e-12).
    assert p_any_per_window(float(p), V) == pytest.approx(exact_p_any(p, V), rel=1e-12, abs=0)


def test_p_any_edge_cases():
    assert p_any_per_window(0.0, 1e12) == 0.0
    assert p_any_per_window(1.0, 10) == 1.0
    assert p_any_per_window(0.5, 0) == 0.0 and p_any_per_window(1.0, 0) == 0.0
    with pytest.raises(InputError):
        p_any_per_window(1.5, 10)
    with pytest.raises(InputError):
        p_any_per_window(0.1, -1)


def test_p_any_per_window_comes_from_the_aggregate_and_its_interval():
    """The figure and both ends come from P_query's interval, not from the prompts' own ones."""
    ests = [monte_carlo(np.r_[np.ones(k), np.zeros(200 - k)]) for k in (0, 1, 3, 8, 20, 50)]
    a = aggregate(ests)
    V = 1e4
    pa = extrapolate(ests, a, V, "1d")["p_any_per_window"]
    assert a.ci_low < a.p_hat < a.ci_high < 1
    for key, x in [("p", a.p_hat), ("ci_low", a.ci_low), ("ci_high", a.ci_high)]:
        assert pa[key] == pytest.approx(-math.expm1(V * math.log1p(-x)), rel=1e-12), key
    # V = 1e4 puts P(any) near 1 whatever P is; a small V keeps the ends apart.
    V = 10
    pa = extrapolate(ests, a, V, "1h")["p_any_per_window"]
    assert pa["ci_low"] < pa["p"] < pa["ci_high"]
    assert pa["ci_high"] == pytest.approx(1 - (1 - a.ci_high) ** V, rel=1e-9)
    assert pa["ci_low"] == pytest.approx(1 - (1 - a.ci_low) ** V, rel=1e-9)


def test_expected_per_window():
    a = aggregate([monte_carlo(np.r_[np.ones(5), np.zeros(95)])])
    e = expected_per_window(a, 1000)
    assert e == pytest.approx({"volume": 1000, "expected": 50.0, "ci_low": 1000 * a.ci_low, "ci_high": 1000 * a.ci_high})


@pytest.mark.parametrize("window, seconds", [("30m", 1800), ("1h", 3600), ("1d", 86400), ("7d", 604800), ("2w", 1209600)])
def test_parse_window(window, seconds):
    assert parse_window(window) == seconds


@pytest.mark.parametrize("window", ["", "1y", "0h", "h", "-1h", "1.5h", 5, None])
def test_parse_window_bad(window):
    with pytest.raises(InputError, match="window"):
        parse_window(window)


def test_scale_volume():
    assert scale_volume(86400, "1h") == pytest.approx(3600)
    assert scale_volume(1e6, "7d") == pytest.approx(7e6)
    with pytest.raises(InputError):
        scale_volume(-1, "1d")


def test_worst_query_recovers_gumbel_tail_slope():
    # psi = mu + beta * E with E ~ Exp(1) has survival exp(-(psi - mu)/beta): log S is exactly
    # linear with slope -1/beta and intercept mu/beta. The least-squares fit on the top K order
    # statistics is the QQ (Zipf-plot) estimator, asymptotic relative sd sqrt(2/K) (Kratz &
    # Resnick 1996); K = 1000 gives 0.045, and we accept 4 of those. (The r/m plotting positions
    # bias the slope by about 1% here, well inside.)
    rng = np.random.default_rng(8)
    m, mu, beta = 4000, -3.0, 0.5
    psi = mu + beta * rng.exponential(size=m)
    p = np.exp(-np.exp(-psi))
    V = 1e6
    f = worst_query_forecast(p, V)
    assert f["n_points"] == 1000
    assert abs(f["slope"] * beta + 1) < 4 * math.sqrt(2 / 1000)
    assert f["psi"] == pytest.approx((math.log(1 / V) - f["intercept"]) / f["slope"])
    assert f["p"] == pytest.approx(math.exp(-math.exp(-f["psi"])))
    # the forecast moves up with volume
    assert worst_query_forecast(p, 1e9)["p"] > f["p"] > 0


def test_worst_query_needs_enough_positive_points():
    assert worst_query_forecast([0.1, 0.01, 0.0, 0.0], 1e6) is None
    assert worst_query_forecast([0.1, 0.1, 0.1], 1e6) is None  # no slope
    assert worst_query_forecast([0.1, 0.01, 0.001], 1e6) is not None
    # ones are kept finite rather than rejected
    assert worst_query_forecast([1.0, 0.5, 0.1, 0.01], 1e6)["p"] <= 1.0


def test_extrapolate_structure():
    ests = [monte_carlo(np.r_[np.ones(k), np.zeros(200 - k)]) for k in (0, 1, 3, 8, 20, 50)]
    a = aggregate(ests)
    out = extrapolate(ests, a, scale_volume(1e5, "1d"), "1d")
    json.dumps(out, allow_nan=False)
    assert out["window"] == "1d" and out["volume"] == pytest.approx(1e5)
    e = out["expected_per_window"]
    assert set(e) == {"expected", "ci_low", "ci_high"}
    assert e["expected"] == pytest.approx(1e5 * a.p_hat)
    pa = out["p_any_per_window"]
    assert pa["ci_low"] <= pa["p"] <= pa["ci_high"]
    assert pa["p"] == pytest.approx(p_any_per_window(a.p_hat, 1e5))
    assert set(out["worst_query"]) == {"p", "psi", "slope", "intercept", "n_points"}
    with pytest.raises(InputError):
        extrapolate(ests, a, 10, "1y")
