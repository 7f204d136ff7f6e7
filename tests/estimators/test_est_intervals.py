"""Wilson and Clopper-Pearson intervals against scipy's binomtest, and their edge cases."""

import math

import numpy as np
import pytest
from scipy import stats

from tailmon.errors import InputError
from tailmon.estimators import clopper_pearson_interval, wilson_interval

GRID = [(k, n) for n in (1, 2, 5, 10, 37, 100, 1000, 10000) for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n}) if 0 <= k <= n]


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
@pytest.mark.parametrize("k,n", GRID)
def test_against_scipy_binomtest(k, n, confidence):
    res = stats.binomtest(k, n)
    w = res.proportion_ci(confidence_level=confidence, method="wilson")
    cp = res.proportion_ci(confidence_level=confidence, method="exact")
    # same closed form / same beta quantiles: agreement to rounding error
    assert wilson_interval(k, n, confidence) == pytest.approx((w.low, w.high), abs=1e-12)
    assert clopper_pearson_interval(k, n, confidence) == pytest.approx((cp.low, cp.high), abs=1e-9)


@pytest.mark.parametrize("n", [1, 10, 100, 1000, 100000])
def test_zero_successes_have_a_positive_upper_bound(n):
    lo, hi = clopper_pearson_interval(0, n)
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)
    if n >= 100:
        assert hi == pytest.approx(3.689 / n, rel=0.02)  # -log(0.025) = 3.689: the "3.7/n" rule
    lo, hi = wilson_interval(0, n)
    z = stats.norm.ppf(0.975)
    assert lo == 0.0 and hi == pytest.approx(z * z / (n + z * z))
    assert hi > 0


def test_wilson_takes_graded_counts_and_is_monotone():
    his = [wilson_interval(k, 50)[1] for k in np.linspace(0, 50, 101)]
    assert all(b >= a for a, b in zip(his, his[1:]))
    lo, hi = wilson_interval(2.5, 50)
    assert 0 < lo < 2.5 / 50 < hi < 1


def test_intervals_stay_in_unit_interval_and_nonzero_width():
    for k, n in GRID:
        for f in (wilson_interval, clopper_pearson_interval):
            lo, hi = f(k, n)
            assert 0.0 <= lo < hi <= 1.0


@pytest.mark.parametrize(
    "args, match",
    [
        ((1, 10, 1.5), "confidence must be in \\(0, 1\\), got 1.5"),
        ((1, 10, 0.0), "confidence"),
        ((1, 10, float("nan")), "confidence"),
        ((11, 10), "k must be in"),
        ((-1, 10), "k must be in"),
        ((0, 0), "n must be"),
        ((1, 2.5), "n must be"),
    ],
)
def test_bad_inputs(args, match):
    for f in (wilson_interval, clopper_pearson_interval):
        with pytest.raises(InputError, match=match):
            f(*args)


def test_clopper_pearson_needs_integer_k():
    with pytest.raises(InputError, match="integer"):
        clopper_pearson_interval(1.5, 10)
    assert not math.isnan(wilson_interval(1.5, 10)[0])
