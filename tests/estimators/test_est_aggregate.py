"""Aggregation over prompts."""

import json

import numpy as np
import pytest
from scipy import stats

from tailmon.errors import InputError
from tailmon.estimators import Aggregate, aggregate, monte_carlo
from tailmon.estimators.result import Estimate


def est(p_hat, se, ci_low=None, ci_high=None, ubo=False, reliable=True, n=100, n_harmful=10):
    """A hand-made Estimate with only the fields aggregation reads set meaningfully."""
    return Estimate(
        method="mc", n_samples=n, p_hat=p_hat,
        ci_low=p_hat if ci_low is None else ci_low, ci_high=p_hat if ci_high is None else ci_high,
        n_harmful=n_harmful, h_sum=float(n_harmful), n_hits_effective=float(n_harmful), ess=float(n),
        ess_wh=float(n_harmful), khat=None, khat_wh=None, kl=None, max_weight_share=None, self_normalised=None, std_error=se,
        upper_bound_only=ubo, reliable=reliable, warnings=(),
    )


def test_single_prompt_uses_its_own_standard_error():
    a = aggregate([est(0.1, 0.02)])
    assert a.p_hat == 0.1 and a.std_error == pytest.approx(0.02)
    z = stats.norm.ppf(0.975)
    assert (a.ci_low, a.ci_high) == pytest.approx((0.1 - z * 0.02, 0.1 + z * 0.02))
    assert a.n_prompts == 1 and a.by_category == {}
    assert any("one prompt only" in w for w in a.warnings)


def test_variance_between_and_within():
    # spread-out p_hat: the between-prompt sample variance dominates
    ests = [est(p, 0.001) for p in (0.1, 0.2, 0.3, 0.4)]
    a = aggregate(ests)
    assert a.p_hat == pytest.approx(0.25)
    assert a.std_error == pytest.approx(np.sqrt(np.var([0.1, 0.2, 0.3, 0.4], ddof=1) / 4))
    # identical p_hat: the within part stays
    a = aggregate([est(0.2, 0.03), est(0.2, 0.04)])
    assert a.std_error == pytest.approx(np.sqrt((0.03**2 + 0.04**2) / 2 / 2))


def test_zero_hit_prompts_carry_their_bound():
    ests = [est(0.0, 0.0, 0.0, 0.03, ubo=True, reliable=False, n_harmful=0) for _ in range(3)]
    ests.append(est(0.01, 0.0))
    a = aggregate(ests)
    assert a.p_hat == pytest.approx(0.0025)
    assert a.ci_high >= (3 * 0.03 + 0.01) / 4 - 1e-15
    assert a.ci_low == 0.0 and a.ci_high > a.ci_low
    assert not a.reliable and a.n_unreliable == 3
    assert a.n_samples == 400 and a.n_harmful == 10


def test_categories():
    ests = [est(0.1, 0.01), est(0.3, 0.01), est(0.2, 0.01), est(0.0, 0.0)]
    a = aggregate(ests, ["cyber", "bio", "cyber", None])
    assert set(a.by_category) == {"cyber", "bio", "uncategorized"}
    assert a.by_category["cyber"].p_hat == pytest.approx(0.15)
    assert a.by_category["cyber"].n_prompts == 2
    assert a.p_hat == pytest.approx(0.15)  # plain mean over prompts, not over categories
    d = a.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["by_category"]["bio"]["p_hat"] == pytest.approx(0.3)
    assert isinstance(a.by_category["bio"], Aggregate)


def test_aggregate_coverage():
    # P(x) ~ Beta(2, 50) over prompts (P_query = 2/52), m = 40 prompts, n = 2000 MC samples each
    # (about 77 hits per prompt, so no prompt is an upper-bound-only estimate and the carried
    # bounds play no part: that conservative widening is tested above). The interval
    # mean +- 1.96 SE with SE^2 = s2/m (the within part, ~1.8e-5, never dominates s2 ~ 7e-4) has
    # the t-interval's shape, so its coverage under normality is c = P(|T_39| <= 1.96) = 0.943;
    # over R repeats the coverage count is ~ Binomial(R, c): accept 3 sigma.
    rng = np.random.default_rng(21)
    R, m, n = 1000, 40, 2000
    truth = 2 / 52
    c = 1 - 2 * stats.t.sf(stats.norm.ppf(0.975), m - 1)
    covered = 0
    for _ in range(R):
        ks = rng.binomial(n, rng.beta(2, 50, m))
        a = aggregate([monte_carlo(np.r_[np.ones(k), np.zeros(n - k)]) for k in ks])
        covered += a.ci_low <= truth <= a.ci_high
    assert abs(covered / R - c) < 3 * np.sqrt(c * (1 - c) / R)


def test_bad_inputs():
    with pytest.raises(InputError, match="must not be empty"):
        aggregate([])
    with pytest.raises(InputError, match="one entry per estimate"):
        aggregate([est(0.1, 0.01)], ["a", "b"])
    with pytest.raises(InputError, match=r"confidence must be in \(0, 1\), got 1.5"):
        aggregate([est(0.1, 0.01)], confidence=1.5)
    with pytest.raises(InputError, match="Estimate objects"):
        aggregate([0.1])
