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
    # (a moderate spread over 6 prompts: with counts from 0 to 50 the log-normal profile's upper
    # end is 1, and the ends could not be told apart)
    ests = [monte_carlo(np.r_[np.ones(k), np.zeros(200 - k)]) for k in (8, 10, 14, 20, 26, 30)]
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


def test_worst_query_recovers_the_tail_rate():
    """Catches a wrong tail fit (rate, threshold or the survival at the threshold) or a forecast
    not solved at survival 1/V."""
    # psi = mu + beta E, E ~ Exp(1): above any threshold the excesses are Exp(rate 1/beta), and
    # the maximum-likelihood rate from K excesses has relative sd 1/sqrt(K) (Gamma(K) sum):
    # K = 1000 gives 0.032, and we accept 4 of those.
    rng = np.random.default_rng(8)
    m, mu, beta = 4000, -3.0, 0.5
    psi = mu + beta * rng.exponential(size=m)
    p = np.exp(-np.exp(-psi))
    V = 1e6
    f = worst_query_forecast(p, V)
    assert f["n_points"] == 1000
    assert abs(f["slope"] * beta + 1) < 4 / math.sqrt(1000)
    assert f["psi"] == pytest.approx((math.log(1 / V) - f["intercept"]) / f["slope"])
    assert f["p"] == pytest.approx(math.exp(-math.exp(-f["psi"])))
    assert f["ci_low"] < f["p"] < f["ci_high"]
    # the truth mu + beta log V is within the interval here (a 95% interval; this seed's draw)
    true = math.exp(-math.exp(-(mu + beta * math.log(V))))
    assert f["ci_low"] <= true <= f["ci_high"]
    # the forecast moves up with volume
    assert worst_query_forecast(p, 1e9)["p"] > f["p"] > 0


def test_worst_query_interval_covers_where_the_tail_model_holds():
    """Catches an interval that ignores the fitted rate's uncertainty (or the threshold's), or
    one much wider than it needs to be, on a population whose tail is exactly the model's."""
    # psi = -3 + Exp(rate 5), m = 40 prompts (10 in the top quarter), V = 1e6: the ends are
    # two one-sided 97.5% bounds, so each misses ~ Binomial(R, 0.025) (measured 1.8% / 1.7% over
    # 2000 in benchmarks/results/forecast.json). Accept 3 sigma above; for the two misses
    # together, at least 3 sigma below 5%: a too-wide interval (e.g. 99.9%) fails there.
    rng = np.random.default_rng(16)
    R, m, V = 400, 40, 1e6
    true = math.exp(-math.exp(-(-3.0 + math.log(V) / 5.0)))
    high = low = 0
    for _ in range(R):
        f = worst_query_forecast(np.exp(-np.exp(-(-3.0 + rng.exponential(0.2, m)))), V)
        high += f["ci_high"] < true
        low += f["ci_low"] > true
    sigma = math.sqrt(R * 0.025 * 0.975)
    assert high <= R * 0.025 + 3 * sigma and low <= R * 0.025 + 3 * sigma
    assert high + low >= R * 0.05 - 3 * math.sqrt(R * 0.05 * 0.95)


def test_worst_query_needs_ten_points_in_the_top_fraction():
    """Catches a forecast fitted from a handful of points (the demo's 6 prompts gave 3)."""
    rng = np.random.default_rng(3)
    p = np.exp(-np.exp(-(-3.0 + rng.exponential(0.2, 40))))
    assert worst_query_forecast(p, 1e6)["n_points"] == 10  # ceil(0.25 * 40)
    assert worst_query_forecast(p[:36], 1e6) is None  # 9 points
    assert worst_query_forecast(p, 1e6, top_fraction=0.2) is None  # 8 points
    # zeros are prompts too, but the top points and the threshold must be positive
    assert worst_query_forecast(np.r_[p[:10], np.zeros(30)], 1e6) is None
    assert worst_query_forecast(np.r_[p[:11], np.zeros(29)], 1e6) is not None
    assert worst_query_forecast(np.full(40, 0.1), 1e6) is None  # tied: no tail
    # ones are kept finite rather than rejected
    assert worst_query_forecast(np.r_[1.0, p[1:]], 1e6)["p"] <= 1.0


def test_worst_query_warns_on_a_long_extrapolation():
    """Catches the forecast reaching 1 in V from 1 in m prompts without saying so."""
    rng = np.random.default_rng(4)
    p = np.exp(-np.exp(-(-3.0 + rng.exponential(0.2, 40))))
    far = worst_query_forecast(p, 1e6)
    assert far["extrapolation"] == pytest.approx(1e6 / 40)
    assert any("extrapolates" in w for w in far["warnings"])
    assert worst_query_forecast(p, 4000)["warnings"] == []  # V/m = 100: not above the limit


def test_extrapolate_structure():
    ests = [monte_carlo(np.r_[np.ones(k), np.zeros(200 - k)]) for k in (0, 1, 3, 8, 20, 50)]
    a = aggregate(ests)
    out = extrapolate(ests, a, scale_volume(1e5, "1d"), "1d")
    assert out["worst_query"] is None  # 6 prompts: 2 in the top quarter, too few for a tail fit
    ests = [monte_carlo(np.r_[np.ones(k), np.zeros(200 - k)]) for k in range(1, 41)]
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
    assert set(out["worst_query"]) == {"p", "ci_low", "ci_high", "psi", "slope", "intercept", "n_points",
                                       "extrapolation", "confidence", "warnings"}
    with pytest.raises(InputError):
        extrapolate(ests, a, 10, "1y")
