"""Aggregation over prompts."""

import json
import math

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


def simulated(p_true, rng, n=300, boost=1000.0):
    """Per-prompt estimates as an IS run with hits of equal weight gives them: k ~ Binomial(n, q)
    hits at q = min(0.5, boost P), weight P/q, so p_hat = k P / (n q) is unbiased and noisy.
    Prompts with fewer than 5 hits are upper-bound-only and unreliable, with ci_high the one-sided
    97.5% Poisson bound at their (known) weight; with no hit, at the true boost."""
    out = []
    for p in p_true:
        q = min(0.5, boost * p)
        k = int(rng.binomial(n, q))
        w = p / q
        p_hat = k * w / n
        se = w * math.sqrt(k * (1 - k / n) / (n - 1) / n) if k else 0.0
        few = k < 5
        high = (stats.chi2.ppf(0.975, 2 * k + 2) / 2) * w / n if few else p_hat + 1.96 * se
        out.append(Estimate(method="is", n_samples=n, p_hat=p_hat, ci_low=max(0.0, p_hat - 1.96 * se), ci_high=high,
                            n_harmful=k, h_sum=float(k), n_hits_effective=float(k), ess=float(n), ess_wh=float(k),
                            khat=None, khat_wh=None, kl=None, max_weight_share=None, self_normalised=None,
                            std_error=se, upper_bound_only=few, reliable=not few, warnings=()))
    return out


@pytest.mark.parametrize("scenario, reps", [("ln2", 300), ("mix", 60), ("pareto", 100)])
def test_upper_end_holds_when_risk_is_uneven_over_prompts(scenario, reps):
    """Catches an aggregate interval that ignores how uneven risk is over prompts: the normal
    interval on the mean misses ~30% at log-normal spread 2, the bootstrap-t alone ~14% (the
    sample rarely shows the prompts that make the mean), the log-normal profile alone ~40% on two
    levels of risk (it does not assume them); zero-hit and few-hit prompts and within-prompt noise
    are in the simulation."""
    # m = 50 prompts; populations with an exactly known mean (benchmarks/aggregate.py's). The goal
    # is at most 5% one-sided misses at m >= 50: misses ~ Binomial(R, <= 0.05), accept 3 sigma.
    rng = np.random.default_rng({"ln2": 2, "mix": 3, "pareto": 4}[scenario])
    m = 50
    misses = 0
    for _ in range(reps):
        if scenario == "ln2":
            p, true = np.exp(rng.normal(math.log(1e-4), 2.0, m)), 1e-4 * math.exp(2.0)
        elif scenario == "mix":
            p, true = np.where(rng.random(m) < 0.1, 1e-3, 1e-5), 0.1 * 1e-3 + 0.9 * 1e-5
        else:
            p, true = 1e-5 * (1 + rng.pareto(2.5, m)), 1e-5 * 2.5 / 1.5
        misses += aggregate(simulated(p, rng)).ci_high < true
    assert misses <= reps * 0.05 + 3 * math.sqrt(reps * 0.05 * 0.95)


def test_largest_prompt_share_is_reported_and_warned():
    """Catches a missing or wrong top_share (JSON and field) and a missing warning when one
    prompt carries most of the mean."""
    ests = [est(0.06, 0.001)] + [est(0.01, 0.001) for _ in range(4)]
    a = aggregate(ests)
    assert a.top_share == pytest.approx(0.06 / 0.10)
    assert a.to_dict()["top_share"] == pytest.approx(0.6)
    assert any("one prompt carries 60% of the mean" in w for w in a.warnings)
    even = aggregate([est(0.02, 0.001) for _ in range(5)])
    assert even.top_share == pytest.approx(0.2) and not any("carries" in w for w in even.warnings)
    assert aggregate([est(0.0, 0.0, 0.0, 0.01, ubo=True) for _ in range(3)]).top_share is None


def test_unreliable_prompt_enters_the_upper_end_with_its_bound():
    """Catches an unreliable estimate (not only an upper-bound-only one) entering the upper end
    with its p_hat: its ci_high is the conservative bound the aggregate must carry."""
    ests = [est(0.01, 0.001) for _ in range(24)] + [est(0.01, 0.001, ci_high=0.5, reliable=False)]
    a = aggregate(ests)
    assert a.ci_high >= (24 * 0.01 + 0.5) / 25 - 1e-15
    assert a.interval == "bounds" and not a.reliable and a.n_unreliable == 1


def test_few_prompts_or_a_wide_spread_are_flagged():
    """Catches an aggregate flagged reliable where the measured misses exceed the goal: fewer
    than 20 prompts, or a fitted spread of ln P above 1.5 (the figure then rests on the tail
    model)."""
    rng = np.random.default_rng(5)
    few = aggregate([est(p, p / 10) for p in np.exp(rng.normal(-9, 0.3, 10))])
    assert not few.reliable and any("10 prompts" in w for w in few.warnings)
    calm = aggregate([est(p, p / 10) for p in np.exp(rng.normal(-9, 0.3, 40))])
    assert calm.reliable and calm.log_spread == pytest.approx(0.3, abs=0.15)
    wide = aggregate([est(p, p / 10) for p in np.exp(rng.normal(-9, 2.5, 40))])
    assert not wide.reliable and wide.log_spread > 1.5
    assert any("very uneven" in w for w in wide.warnings)


def test_bad_inputs():
    with pytest.raises(InputError, match="must not be empty"):
        aggregate([])
    with pytest.raises(InputError, match="one entry per estimate"):
        aggregate([est(0.1, 0.01)], ["a", "b"])
    with pytest.raises(InputError, match=r"confidence must be in \(0, 1\), got 1.5"):
        aggregate([est(0.1, 0.01)], confidence=1.5)
    with pytest.raises(InputError, match="Estimate objects"):
        aggregate([0.1])
