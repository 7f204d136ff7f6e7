"""Plain Monte Carlo estimates."""

import json

import numpy as np
import pytest
from scipy import stats

from tailmon.errors import InputError
from tailmon.estimators import Estimate, monte_carlo


def test_counts_and_interval():
    h = np.r_[np.ones(7), np.zeros(93)]
    est = monte_carlo(h)
    assert isinstance(est, Estimate)
    assert est.method == "mc" and est.n_samples == 100 and est.n_harmful == 7
    assert est.p_hat == pytest.approx(0.07) and est.h_sum == 7
    ci = stats.binomtest(7, 100).proportion_ci(method="wilson")
    assert (est.ci_low, est.ci_high) == pytest.approx((ci.low, ci.high))
    assert est.ess == 100 and est.ess_wh == pytest.approx(7)
    assert est.khat is None and est.kl is None and est.max_weight_share is None
    assert est.std_error == pytest.approx(np.sqrt(0.07 * 0.93 / 100))
    assert est.reliable and not est.upper_bound_only and est.warnings == ()


def test_zero_hits_is_an_upper_bound_not_a_zero():
    est = monte_carlo(np.zeros(100), interval="clopper-pearson")
    assert est.p_hat == 0 and est.ci_low == 0
    assert est.ci_high == pytest.approx(1 - 0.025 ** (1 / 100))
    assert est.upper_bound_only and not est.reliable
    assert est.warnings == ("only 0 of 100 samples were harmful: ci_high is an upper bound",)


def test_few_hits_unreliable_five_reliable():
    assert not monte_carlo(np.r_[np.ones(4), np.zeros(96)]).reliable
    assert monte_carlo(np.r_[np.ones(5), np.zeros(95)]).reliable


def test_graded_scores():
    h = np.r_[np.full(10, 0.5), np.zeros(90)]
    est = monte_carlo(h)
    assert est.p_hat == pytest.approx(0.05) and est.n_harmful == 10 and est.h_sum == 5
    with pytest.raises(InputError, match="0/1"):
        monte_carlo(h, interval="clopper-pearson")


def test_wilson_coverage():
    # The exact coverage c of the Wilson interval at (n, P) is a finite sum over k; it sits near
    # the nominal 95%. Over R simulated repeats the number of covering intervals is
    # ~ Binomial(R, c): accept the simulated rate within 3 binomial sigmas of c.
    rng = np.random.default_rng(1)
    R, n, P = 2000, 400, 0.02
    ks = np.arange(n + 1)
    covers = np.array([monte_carlo(np.r_[np.ones(k), np.zeros(n - k)]) for k in ks])
    covers = np.array([e.ci_low <= P <= e.ci_high for e in covers])
    c = float(np.sum(stats.binom.pmf(ks, n, P)[covers]))
    assert abs(c - 0.95) < 0.01
    k = rng.binomial(n, P, size=R)
    rate = covers[k].mean()
    assert abs(rate - c) < 3 * np.sqrt(c * (1 - c) / R)


def test_to_dict_is_json_ready():
    d = monte_carlo(np.r_[1, np.zeros(9)]).to_dict()
    json.dumps(d, allow_nan=False)
    assert d["warnings"] == ["only 1 of 10 samples were harmful: ci_high is an upper bound"]
    assert d["khat"] is None and d["method"] == "mc"


@pytest.mark.parametrize(
    "h, kwargs, match",
    [
        ([], {}, "must not be empty"),
        ([0.5, 1.2], {}, r"h must hold scores in \[0, 1\]"),
        ([0.5, -0.1], {}, r"h must hold scores in \[0, 1\]"),
        ([0.5, float("nan")], {}, r"h must hold scores"),
        ([[0, 1]], {}, "1-D"),
        ([0, 1], {"confidence": 1.5}, r"confidence must be in \(0, 1\), got 1.5"),
        ([0, 1], {"interval": "normal"}, "interval must be one of"),
    ],
)
def test_bad_inputs(h, kwargs, match):
    with pytest.raises(InputError, match=match):
        monte_carlo(h, **kwargs)


def test_conservative_bound_of_monte_carlo():
    """`ci_high_conservative` of MC is the Chernoff bound on mean(h), valid for any scores in
    [0, 1]: at k = 0 the Clopper-Pearson bound 1 - 0.025^(1/n); for graded scores at least the
    mean. Catches the field left at its default 1 or set to the Wilson end."""
    n = 300
    e = monte_carlo(np.zeros(n))
    assert e.ci_high_conservative == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-12)
    g = np.full(n, 0.01)
    e = monte_carlo(g)
    assert 0.01 < e.ci_high_conservative < 0.05 and e.ci_high_conservative != e.ci_high
