"""Importance sampling on synthetic problems with known answers.

Tolerances are derived, not tuned: a mean over R independent repeats is compared with the
truth at 4 standard errors of that mean (two-sided false-alarm rate 6e-5 under normality);
a coverage rate over R repeats is ~ Binomial(R, c) and compared at 3 binomial sigmas.
"""

import json
import zlib

import numpy as np
import pytest
from scipy import stats

from tailmon.errors import InputError, InternalError
from tailmon.estimators.intervals import bootstrap_t_interval
from tailmon.estimators import balance_log_weights, importance_sampling, khat_threshold, monte_carlo, pareto_khat


def gaussian_tail_run(rng, P, n, a0, proposal_shift=None):
    """Target N(0,1), event x > t with P(x > t) = P; stratified draws from the mixture
    a0 * N(0,1) + (1 - a0) * N(shift, 1) (shift defaults to t: the proposal centred on the event)."""
    t = stats.norm.isf(P)
    shift = t if proposal_shift is None else proposal_shift
    n0 = round(a0 * n)
    x = np.r_[rng.normal(0.0, 1.0, n0), rng.normal(shift, 1.0, n - n0)]
    component = np.r_[np.zeros(n0, int), np.ones(n - n0, int)]
    log_p = stats.norm.logpdf(x)
    log_q = np.c_[log_p, stats.norm.logpdf(x - shift)]
    log_w = balance_log_weights(log_p, log_q, [a0, 1 - a0])
    h = (x > t).astype(float)
    return log_w, h, component


@pytest.mark.parametrize("P", [1e-2, 1e-4, 1e-6])
def test_unbiased_and_covers_on_gaussian_tail(P):
    rng = np.random.default_rng(12345)
    R, n, a0 = 400, 500, 0.1
    ests = []
    for _ in range(R):
        log_w, h, comp = gaussian_tail_run(rng, P, n, a0)
        ests.append(importance_sampling(log_w, h, comp, defensive=a0))
    p_hat = np.array([e.p_hat for e in ests])
    # unbiased: mean of R estimates within 4 SE of the mean
    assert abs(p_hat.mean() - P) < 4 * p_hat.std(ddof=1) / np.sqrt(R)
    # with the proposal on the event (~225 hits, weights <= 1/a0) the estimates pass the rule; the
    # hits' log-weights spread widely (sd 0.6 t at threshold t) below a maximum the sample keeps
    # reaching, and the skew check waives the spread when the k-hat of w*h shows that bounded tail
    # (<= 0); its fit is noisy, and at P = 1e-6 3 of these 400 fits land just above 0 (up to
    # 0.10): those estimates are flagged and report the conservative bound. Allow 2%.
    assert all(not e.upper_bound_only for e in ests)
    assert np.mean([e.reliable for e in ests]) >= 0.98
    # the reported std_error tracks the actual spread: mean SE^2 vs the sample variance of
    # p_hat, whose relative sd is about sqrt(2/(R-1)) = 0.071 (normal approx): accept 4 of those
    ratio = np.mean([e.std_error**2 for e in ests]) / p_hat.var(ddof=1)
    assert abs(ratio - 1) < 4 * np.sqrt(2 / (R - 1))
    # coverage ~ Binomial(R, 0.95): 3 sigma = 0.033 at R = 400
    coverage = np.mean([e.ci_low <= P <= e.ci_high for e in ests])
    assert abs(coverage - 0.95) < 3 * np.sqrt(0.95 * 0.05 / R)


def test_monte_carlo_at_the_same_budget_sees_nothing():
    # n = 500 draws from the target at P = 1e-6: a run has any hit with probability
    # 1 - (1 - 1e-6)^500 = 5e-4, so over R = 400 runs the number with hits is ~ Poisson(0.2);
    # P(>= 5) = 3e-6. IS at the same budget gives a relative error of a few percent.
    rng = np.random.default_rng(7)
    P, n, R = 1e-6, 500, 400
    t = stats.norm.isf(P)
    hits = 0
    for _ in range(R):
        est = monte_carlo((rng.normal(size=n) > t).astype(float))
        hits += est.n_harmful > 0
        if est.n_harmful == 0:
            assert est.upper_bound_only and est.ci_high > 1e-3  # ~3.7/n, nowhere near 1e-6
    assert hits < 5
    log_w, h, comp = gaussian_tail_run(rng, P, n, 0.1)
    est = importance_sampling(log_w, h, comp, defensive=0.1)
    assert est.reliable and est.ci_low <= P <= est.ci_high and est.ci_high < 2e-6


def test_discrete_mixture_exact_by_enumeration():
    rng = np.random.default_rng(3)
    K = 12
    p = rng.dirichlet(np.ones(K))
    p[0] = 0.0  # an outcome the target never produces: weight 0
    p[-3:] = [1e-4, 3e-5, 1e-5]  # rare harmful outcomes
    p[1:-3] *= (1 - p[-3:].sum()) / p[1:-3].sum()
    h = np.zeros(K)
    h[-3:] = 1.0
    h[-4] = 0.3  # a graded score on a common outcome
    q1 = np.full(K, 0.02)
    q1[-3:] = 0.3
    q1 /= q1.sum()
    q2 = np.full(K, 1.0 / K)
    comps = np.stack([p, q1, q2])  # component 0 is the target itself
    shares = np.array([0.2, 0.5, 0.3])
    truth = float(p @ h)

    with np.errstate(divide="ignore"):
        log_comps = np.log(comps)
    y = np.arange(K)
    log_w = balance_log_weights(log_comps[0, y], log_comps[:, y].T, shares)
    mix = shares @ comps
    # exact: E_mix[w h] = sum_y mix(y) p(y)/mix(y) h(y) = P
    assert float(np.sum(mix * np.exp(log_w) * h)) == pytest.approx(truth, rel=1e-12)
    assert np.exp(log_w[0]) == 0.0 and np.all(np.exp(log_w) <= 1 / shares[0] * (1 + 1e-12))

    # stratified sampling: n_j = a_j n draws from component j
    n, R = 300, 400
    counts = np.round(shares * n).astype(int)
    component = np.repeat(np.arange(3), counts)
    # exact variance of the stratified estimator: (1/n^2) sum_j n_j Var_{q_j}(w h)
    wh = np.exp(log_w) * h
    var_j = [comps[j] @ wh**2 - (comps[j] @ wh) ** 2 for j in range(3)]
    exact_var = float(np.dot(counts, var_j)) / n**2
    p_hat, se2 = [], []
    for _ in range(R):
        ys = np.concatenate([rng.choice(K, size=c, p=comps[j]) for j, c in enumerate(counts)])
        est = importance_sampling(log_w[ys], h[ys], component, defensive=shares[0])
        p_hat.append(est.p_hat)
        se2.append(est.std_error**2)
    p_hat, se2 = np.array(p_hat), np.array(se2)
    assert abs(p_hat.mean() - truth) < 4 * np.sqrt(exact_var / R)
    # the reported SE^2 is unbiased for the exact stratified variance (mean of within-stratum
    # sample variances): its mean over R repeats within 4 of its own standard errors
    assert abs(se2.mean() - exact_var) < 4 * se2.std(ddof=1) / np.sqrt(R)


def test_defensive_share_bounds_every_weight():
    # property: for any log-probabilities with the target as component 0 of share a0 > 0,
    # p / (a0 p + sum_j a_j q_j) <= 1/a0
    rng = np.random.default_rng(11)
    for _ in range(200):
        n, K = rng.integers(1, 50), rng.integers(1, 5)
        log_p = rng.normal(0, 30, n)
        log_q = np.c_[log_p, rng.normal(0, 30, (n, K))]
        log_q[rng.random((n, K + 1)) < 0.2] = -np.inf
        log_q[:, 0] = log_p
        shares = rng.dirichlet(np.ones(K + 1))
        shares[0] = max(shares[0], 1e-3)
        shares /= shares.sum()
        log_w = balance_log_weights(log_p, log_q, shares)
        assert np.all(log_w <= -np.log(shares[0]) + 1e-12)


@pytest.mark.parametrize("n, a0", [(500, 0.2), (1000, 0.1), (200, 0.5)])
def test_zero_hit_bound_from_defensive_share(n, a0):
    log_w = np.log(np.random.default_rng(0).uniform(0.1, 1 / a0, n))
    est = importance_sampling(log_w, np.zeros(n), defensive=a0)
    assert est.p_hat == 0 and est.ci_low == 0
    # the conservative bound (Chernoff on the n values a0 w h in [0, 1], all 0) over a0: the upper
    # end of the two-sided 95% interval, i.e. a one-sided 97.5% bound like every ci_high
    assert est.ci_high == pytest.approx((1 - 0.025 ** (1 / n)) / a0, rel=1e-12)
    assert est.ci_high == pytest.approx(3.689 / (a0 * n), rel=0.02)  # -log(0.025) = 3.689
    assert est.ci_high == est.ci_high_conservative
    assert est.upper_bound_only and est.reliable
    assert "no harmful sample: ci_high is the conservative bound from the defensive share" in est.warnings


def test_zero_hit_without_defensive_share_has_no_bound():
    est = importance_sampling(np.zeros(100), np.zeros(100), defensive=0.0)
    assert (est.ci_low, est.ci_high) == (0.0, 1.0)
    assert est.upper_bound_only and not est.reliable and est.warnings


@pytest.mark.parametrize("P", [0.01, 0.03, 0.04])
def test_zero_hit_bound_coverage(P):
    # A useless proposal N(-2, 1) (hits with probability ~1e-5) and a0 = 0.5, n = 200: only the
    # n0 = 100 target draws see the event. The bound U = 1 - 0.025^(1/100) = 0.0362 (one-sided
    # 97.5%, the level of every ci_high) fails only when the run has no hit AND U < P, which has
    # probability (1 - P)^100 <= 0.025 when P > U (0.0169 at P = 0.04) and 0 when P < U. Over R
    # runs the failure count is ~ Binomial(R, <= 0.025): accept a rate within 0.025 + 3 sigma.
    # P = 0.03 lies between the one-sided 95% bound 0.0295 and U: a 95% bound fails every
    # zero-hit run there, which the `failures == 0` check catches.
    rng = np.random.default_rng(2024)
    R, n, a0 = 1000, 200, 0.5
    failures = zero_hit_runs = 0
    for _ in range(R):
        log_w, h, comp = gaussian_tail_run(rng, P, n, a0, proposal_shift=-2.0)
        est = importance_sampling(log_w, h, comp, defensive=a0)
        if est.n_harmful == 0:
            zero_hit_runs += 1
            failures += est.ci_high < P
    assert zero_hit_runs > 0  # the bound was exercised
    assert failures / R <= 0.025 + 3 * np.sqrt(0.025 * 0.975 / R)
    if P < 1 - 0.025 ** (1 / 100):
        assert failures == 0


def test_few_hits_upper_bound_from_defensive_share():
    n, a0 = 400, 0.25
    rng = np.random.default_rng(5)
    log_w = np.log(rng.uniform(0.5, 1 / a0, n))
    h = np.zeros(n)
    h[:3] = 1.0
    est = importance_sampling(log_w, h, defensive=a0)
    w = np.exp(log_w)
    successes = np.sum(a0 * w * h)
    cp = stats.beta.ppf(0.975, successes + 1, n - successes)
    assert est.upper_bound_only and not est.reliable
    assert est.ci_high >= min(1.0, cp / a0) - 1e-12
    assert any("only 3 of 400 samples were harmful" in s for s in est.warnings)


def test_diagnostics_fields():
    rng = np.random.default_rng(9)
    log_w = rng.normal(-0.5, 1.0, 300)
    log_w[:3] = -np.inf  # impossible under the target
    h = (rng.random(300) < 0.3).astype(float)
    est = importance_sampling(log_w, h)
    w = np.exp(log_w)
    assert est.method == "is" and est.n_samples == 300
    assert est.p_hat == pytest.approx(np.mean(w * h))
    assert est.std_error == pytest.approx(np.std(w * h, ddof=1) / np.sqrt(300))
    assert est.ess == pytest.approx(w.sum() ** 2 / np.sum(w**2))
    assert est.ess_wh == pytest.approx(np.sum(w * h) ** 2 / np.sum((w * h) ** 2))
    assert est.kl == pytest.approx(-np.mean(log_w[3:]))
    assert est.max_weight_share == pytest.approx(w.max() / w.sum())
    assert est.self_normalised == pytest.approx(np.sum(w * h) / w.sum())
    assert est.h_sum == h.sum() and est.n_harmful == int(h.sum())
    assert any("3 of 300 samples are impossible" in s for s in est.warnings)
    json.dumps(est.to_dict(), allow_nan=False)


def test_reliability_rule_warnings():
    rng = np.random.default_rng(4)
    # heavy-tailed weights (Pareto, k = 1) fail the k-hat condition
    w = (rng.pareto(1.0, 5000) + 1) * 1e-3
    h = (rng.random(5000) < 0.5).astype(float)
    est = importance_sampling(np.log(w), h)
    assert not est.reliable and any("the weights are heavy-tailed" in s for s in est.warnings)
    # five hits of which one carries nearly all the weight: ESS of w h fails
    log_w = np.zeros(100)
    log_w[0] = np.log(1e4)
    h = np.zeros(100)
    h[:5] = 1
    est = importance_sampling(log_w, h)
    assert not est.reliable and not est.upper_bound_only
    assert any(s.startswith("ESS of w*h 1.00 < 10") for s in est.warnings)
    # too few draws to fit k-hat
    est = importance_sampling(np.zeros(8), np.ones(8))
    assert est.khat is None and not est.reliable
    assert any("k-hat could not be fitted" in s for s in est.warnings)


def test_unstratified_variance_when_component_missing():
    log_w, h, comp = gaussian_tail_run(np.random.default_rng(1), 1e-3, 400, 0.1)
    a = importance_sampling(log_w, h, comp, defensive=0.1)
    b = importance_sampling(log_w, h, None, defensive=0.1)
    assert a.p_hat == b.p_hat
    wh = np.exp(log_w) * h
    assert b.std_error == pytest.approx(np.std(wh, ddof=1) / np.sqrt(400))
    expected = np.sqrt(sum(np.sum(comp == j) * np.var(wh[comp == j], ddof=1) for j in (0, 1))) / 400
    assert a.std_error == pytest.approx(expected)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([0.0, 0.0], [0.0]), {}, "same length"),
        (([], []), {}, "must not be empty"),
        (([0.0, 0.0], [0.0, 1.5]), {}, r"h must hold scores in \[0, 1\]"),
        (([0.0, np.nan], [0.0, 1.0]), {}, "nan"),
        (([0.0, 0.0], [0.0, 1.0]), {"confidence": 1.5}, r"confidence must be in \(0, 1\), got 1.5"),
        (([0.0, 0.0], [0.0, 1.0]), {"defensive": -0.1}, r"defensive must be in \[0, 1\]"),
        (([0.0, 0.0], [0.0, 1.0]), {"component": [0]}, "component must be a 1-D array of length 2"),
        (([0.0, 0.0], [0.0, 1.0]), {"component": [0.5, 1]}, "integer"),
        (([0.0, np.log(20.0)], [0.0, 1.0]), {"defensive": 0.1}, "exceeds 1/defensive"),
    ],
)
def test_importance_sampling_bad_inputs(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        importance_sampling(*args, **kwargs)


@pytest.mark.parametrize(
    "args, match",
    [
        (([0.0], [[0.0, 0.0]], [0.5, 0.6]), "shares must sum to 1"),
        (([0.0], [[0.0, 0.0]], [1.5, -0.5]), "nonnegative"),
        (([0.0], [[0.0, 0.0]], [1.0]), "one entry per column"),
        (([0.0, 0.0], [[0.0, 0.0]], [0.5, 0.5]), r"shape \(n, K\)"),
        (([0.0], [[np.nan, 0.0]], [0.5, 0.5]), "nan"),
    ],
)
def test_balance_log_weights_bad_inputs(args, match):
    with pytest.raises(InputError, match=match):
        balance_log_weights(*args)


def test_a_sample_impossible_under_the_mixture_is_a_bug_not_bad_input():
    # Samples come from the mixture, so one that no component with positive share can produce
    # means the engine's log-probs and its samples disagree: exit 3, not "your input is wrong".
    with pytest.raises(InternalError, match="impossible under every mixture component"):
        balance_log_weights([0.0], [[-np.inf, 0.0]], [1.0, 0.0])


def test_balance_ignores_zero_share_components_and_allows_impossible_under_p():
    log_w = balance_log_weights([-np.inf, -1.0], [[-2.0, -np.inf], [-1.0, -np.inf]], [1.0, 0.0])
    assert log_w[0] == -np.inf and log_w[1] == pytest.approx(0.0)


# --- the k-hat of w*h (the tail of what is averaged, not only of the weights) ---------------------


def defensive_run_with_hit_tail(rng, hit_weights, n=2000, a0=0.2):
    """Weights as a defensive mixture gives them: the non-hits near 1 (uniform on [0.5, 1.5],
    a bounded tail), the first len(hit_weights) samples hits (h = 1) with the given weights."""
    w = rng.uniform(0.5, 1.5, n)
    m = len(hit_weights)
    w[:m] = np.minimum(hit_weights, 1 / a0)
    h = np.zeros(n)
    h[:m] = 1.0
    return importance_sampling(np.log(w), h, defensive=a0)


def test_khat_of_w_h_flags_a_heavy_hit_tail_the_weights_hide():
    # Known answer: 400 hits whose weights are the exact quantiles of a Pareto tail of shape k = 1
    # (1e-4 (1 - u)^-1, u = (i - 1/2)/400), among 1600 non-hits of bounded uniform weight. The
    # weights' k-hat sees the uniform top of the non-hits (shape < 0) and passes; the tail of
    # w*h is the Pareto one, whose fitted shape (about 0.9: k = 1 shrunk by the PSIS prior
    # towards 0.5) is above the threshold min(0.7, 1 - 1/log10 2000) = 0.697.
    u = (np.arange(1, 401) - 0.5) / 400
    est = defensive_run_with_hit_tail(np.random.default_rng(1), 1e-4 / (1 - u))
    threshold = khat_threshold(2000)
    assert est.khat < 0 < threshold < est.khat_wh
    assert est.khat_wh == pytest.approx(pareto_khat(1e-4 / (1 - u)), rel=1e-12)  # the hits' tail alone
    assert est.khat_wh == pytest.approx(1.0, abs=0.15)
    assert not est.reliable and not est.upper_bound_only
    assert any(s.startswith(f"k-hat of w*h {est.khat_wh:.2f} > 0.70 (over the 400 hits)") for s in est.warnings)
    assert not any(s.startswith("k-hat 0") or s.startswith("k-hat -") for s in est.warnings)  # not the weights
    json.dumps(est.to_dict(), allow_nan=False)


@pytest.mark.parametrize("k", [0.5, 1.0])
def test_khat_of_w_h_estimates_the_hit_tail_shape(k):
    # R repeats of 400 hits with Pareto(shape k) weights. PSIS fits the M = 60 largest and
    # shrinks towards 0.5 as if by 10 pseudo-observations: the fit targets (60 k + 5) / 70.
    # Tolerance: 4 standard errors of the mean over R (sd of one fit ~ (1 + k)/sqrt(M), about
    # 0.2 at k = 1, so 4 * 0.2 / sqrt(200) = 0.06), plus 0.05 for the Zhang-Stephens fit's
    # finite-tail bias (measured -0.02 at k = 1, M = 60 over 300 repeats).
    rng = np.random.default_rng(31)
    R = 200
    ks = np.array([defensive_run_with_hit_tail(rng, 1e-4 * (rng.pareto(1 / k, 400) + 1)).khat_wh
                   for _ in range(R)])
    target = (60 * k + 5) / 70
    assert abs(ks.mean() - target) < 4 * ks.std(ddof=1) / np.sqrt(R) + 0.05


def test_khat_of_w_h_flags_heavy_hits_and_spares_light_ones():
    # Heavy: hits' weights 1e-9 times Pareto of shape k = 2 (400 hits, M = 60; the scale keeps
    # them under the non-hits' weights, so the weights' own k-hat passes in every run). The fit
    # has sd about (1 + k)/sqrt(M) = 0.39 around (60 * 2 + 5)/70 = 1.79, so it falls below the
    # threshold 0.697 with probability about Phi(-2.8) = 0.003: over R = 200 runs at most
    # 0.003 R + 3 sigma (= 0.6 + 2.3) misses, i.e. <= 2. Light: hits' weights uniform like the
    # non-hits' (fit about -0.75, sd 0.13: the threshold is 11 sd away): no run may be flagged.
    rng = np.random.default_rng(32)
    R, threshold = 200, khat_threshold(2000)
    heavy = [defensive_run_with_hit_tail(rng, 1e-9 * (rng.pareto(0.5, 400) + 1)) for _ in range(R)]
    light = [defensive_run_with_hit_tail(rng, rng.uniform(0.5, 1.5, 400)) for _ in range(R)]
    assert all(e.khat <= threshold for e in heavy + light)
    assert sum(e.khat_wh <= threshold for e in heavy) <= 2
    assert all(any(s.startswith("k-hat of w*h") for s in e.warnings) for e in heavy if e.khat_wh > threshold)
    assert all(e.khat_wh <= threshold and e.reliable for e in light)


def test_khat_of_w_h_needs_50_hits():
    # PSIS's tail M = ceil(min(0.2 n, 3 sqrt n)) holds 10 points from n = 50 on (diagnostics.py
    # says why fewer are not a check).
    rng = np.random.default_rng(33)
    for m, fitted in [(49, False), (50, True)]:
        est = defensive_run_with_hit_tail(rng, rng.uniform(0.5, 1.5, m), n=500)
        assert (est.khat_wh is not None) == fitted
    assert monte_carlo(np.ones(100)).khat_wh is None


# --- effective hits: the few-hits rule for graded judges --------------------------------------------


def test_graded_scores_count_their_sum_not_their_number():
    # A graded judge scores every sample 1e-3 and three samples 0.99: 1000 samples score above 0,
    # but the expected number of harmful samples is 997 * 1e-3 + 3 * 0.99 = 3.967 < 5.
    n, a0 = 1000, 0.2
    h = np.full(n, 1e-3)
    h[:3] = 0.99
    log_w = np.log(np.random.default_rng(6).uniform(0.5, 1 / a0, n))
    for est in (importance_sampling(log_w, h, defensive=a0), monte_carlo(h)):
        assert est.n_harmful == 1000
        assert est.n_hits_effective == pytest.approx(3.967, rel=1e-12)
        assert est.upper_bound_only and not est.reliable
        assert any("add up to 3.97 expected harmful samples, fewer than 5" in s for s in est.warnings)
    # the same judge with one more near-1 score: 4.956 is still short of 5; with two more, 5.945 passes
    h[3:5] = 0.99
    assert not importance_sampling(log_w, h, defensive=a0).upper_bound_only
    assert importance_sampling(log_w, h, defensive=a0).n_hits_effective == pytest.approx(5.945, rel=1e-12)


@pytest.mark.parametrize("k", range(9))
def test_binary_scores_effective_hits_are_the_count(k):
    n, a0 = 300, 0.2
    h = np.zeros(n)
    h[:k] = 1.0
    log_w = np.log(np.random.default_rng(k).uniform(0.5, 1 / a0, n))
    for est in (importance_sampling(log_w, h, defensive=a0), monte_carlo(h)):
        assert est.n_hits_effective == est.n_harmful == k
        assert est.upper_bound_only == (k < 5)
        if 0 < k < 5:
            assert f"only {k} of {n} samples were harmful: ci_high is an upper bound" in est.warnings


def test_effective_hits_leave_out_harmful_samples_of_weight_zero():
    log_w = np.zeros(100)
    log_w[:3] = -np.inf
    h = np.zeros(100)
    h[:8] = 1.0
    est = importance_sampling(log_w, h)
    assert est.n_harmful == 8 and est.n_hits_effective == 5 and not est.upper_bound_only


@pytest.mark.parametrize("P", [0.002, 0.01])
def test_graded_few_hits_bound_coverage(P):
    # A graded judge on the Gaussian-tail problem: h = 0.99 on the event x > t and 1e-3 elsewhere,
    # so the truth is E_p[h] = 1e-3 + 0.989 P. The proposal N(-2, 1) misses the event; a0 = 0.5,
    # n = 400. Runs with fewer than 5 effective hits must bound the truth with ci_high at the
    # one-sided 97.5% level (the Clopper-Pearson bound for sum(a0 w h) is rigorous), so the
    # failure count over R runs is ~ Binomial(R, <= 0.025): accept 0.025 + 3 sigma. The old rule
    # counted all 400 samples as hits and reported p_hat + 1.96 SE, which misses the truth in
    # most runs where the 200 target draws saw no event.
    rng = np.random.default_rng(2025)
    R, n, a0 = 400, 400, 0.5
    truth = 1e-3 + 0.989 * P
    failures = few = 0
    for _ in range(R):
        log_w, event, comp = gaussian_tail_run(rng, P, n, a0, proposal_shift=-2.0)
        h = np.where(event > 0, 0.99, 1e-3)
        est = importance_sampling(log_w, h, comp, defensive=a0)
        if est.n_hits_effective < 5:
            few += 1
            assert est.upper_bound_only and not est.reliable
            failures += est.ci_high < truth
    assert few > R // 4  # the few-hits bound was exercised
    assert failures / R <= 0.025 + 3 * np.sqrt(0.025 * 0.975 / R)


# --- defensive share 0: a few hits bound nothing ----------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_few_hits_without_defensive_share_report_no_bound(k):
    # Without a defensive share nothing caps the weights, so the part of the target the proposal
    # rarely visits can carry any probability: no bound below 1 holds for every problem, and
    # p_hat + z SE from k hits is not one.
    rng = np.random.default_rng(k)
    n = 500
    log_w = rng.normal(0.0, 1.0, n)
    h = np.zeros(n)
    h[:k] = 1.0
    est = importance_sampling(log_w, h, defensive=0.0)
    assert est.ci_high == 1.0 and est.upper_bound_only and not est.reliable
    assert est.p_hat == pytest.approx(np.mean(np.exp(log_w) * h))
    assert any(s.startswith("defensive share 0: the weights are unbounded") for s in est.warnings)
    # a graded judge's few effective hits likewise
    g = np.full(n, 1e-3)
    g[:k] = 0.5
    est = importance_sampling(log_w, g, defensive=0.0)
    assert est.n_harmful == n and est.ci_high == 1.0 and not est.reliable
    # five hits are still unreliable (the ESS of w*h is at most 5 < 10), and every unreliable
    # estimate without a defensive share reports 1; forty hits of equal weight pass the rule and
    # report the main interval, whose upper end is below 1 (weights of light tail: log-sd 0.3)
    h[:5] = 1.0
    assert importance_sampling(log_w, h, defensive=0.0).ci_high == 1.0
    h[:40] = 1.0
    light = 0.3 * log_w
    light[:40] = 0.0
    est = importance_sampling(light, h, defensive=0.0)
    assert est.reliable and est.ci_high < 1.0 and est.ci_high_conservative == 1.0


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_every_bound_is_one_sided_at_the_two_sided_level(confidence):
    # ci_high is the upper end of the two-sided `confidence` interval on every path: a one-sided
    # bound at (1 + confidence)/2. Zero hits: the conservative bound (1 - ((1 - c)/2)^(1/n)) / a0;
    # few hits: the conservative bound, m / a0 with n KL(mean(a0 w h) || m) = log(1 / tail);
    # many hits: the bootstrap-t's upper end at the same tail (these 50 hits' weights are uniform,
    # a bounded tail, so no spread allowance; test_the_upper_end_allows_for_the_spread has one).
    n, a0 = 400, 0.25
    tail = (1 - confidence) / 2
    log_w = np.log(np.random.default_rng(7).uniform(0.5, 1 / a0, n))
    est = importance_sampling(log_w, np.zeros(n), defensive=a0, confidence=confidence)
    assert est.ci_high == pytest.approx((1 - tail ** (1 / n)) / a0, rel=1e-12)
    h = np.zeros(n)
    h[:2] = 1.0
    est = importance_sampling(log_w, h, defensive=a0, confidence=confidence)
    x, m = np.mean(a0 * np.exp(log_w) * h), a0 * est.ci_high
    kl = x * np.log(x / m) + (1 - x) * np.log((1 - x) / (1 - m))
    assert n * kl == pytest.approx(np.log(1 / tail), rel=1e-9)
    h[:50] = 1.0
    est = importance_sampling(log_w, h, defensive=a0, confidence=confidence)
    assert est.reliable
    wh = np.exp(log_w) * h
    low, high, se = bootstrap_t_interval(wh, None, confidence, seed=zlib.crc32(wh.tobytes()))
    assert est.khat_wh <= 0.0
    assert (est.ci_low, est.ci_high) == (max(low, 0.0), high) and se == pytest.approx(est.std_error)


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_the_upper_end_allows_for_the_spread(confidence):
    # 30 hits whose log-weights are normal (sd 0.4; too few hits for k-hat of w h): ci_high is the
    # bootstrap-t's upper end times exp((s_up^2 - s^2) / 2), s the hits' log-weight sd and
    # s_up^2 = s^2 (k - 1) / chi2_tail(k - 1), the tail being the interval's one-sided level.
    # Catches the allowance missing, at another level than the interval's, or on the lower end.
    n, a0, k = 400, 0.25, 30
    tail = (1 - confidence) / 2
    rng = np.random.default_rng(8)
    log_w = np.log(rng.uniform(0.5, 1 / a0, n))
    log_w[:k] = np.clip(rng.normal(0.0, 0.4, k), None, np.log(1 / a0))
    h = np.zeros(n)
    h[:k] = 1.0
    est = importance_sampling(log_w, h, defensive=a0, confidence=confidence)
    assert est.reliable and est.khat_wh is None
    wh = np.exp(log_w) * h
    low, high, _ = bootstrap_t_interval(wh, None, confidence, seed=zlib.crc32(wh.tobytes()))
    s2 = np.var(log_w[:k], ddof=1)
    allowance = np.exp(0.5 * s2 * ((k - 1) / stats.chi2.ppf(tail, k - 1) - 1))
    assert est.ci_low == max(low, 0.0)
    assert est.ci_high == pytest.approx(high * allowance, rel=1e-12) and allowance > 1.03
