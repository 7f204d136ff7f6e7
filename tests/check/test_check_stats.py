"""The statistics of `tailmon check`: the regression test's calibration and power, its paired
(common random numbers) variance, the bounds fallback, the absolute gates, and the plan the
check shares with the daemon. Synthetic estimates, no model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from tailmon.engines.base import Variant
from tailmon.errors import InputError
from tailmon.estimators import Estimate, importance_sampling
from tailmon.judges import parse_judge
from tailmon.check.gate import (
    GateOptions,
    absolute_gates,
    paired_moments,
    ratio_gate,
    regression_test,
    unreliable_side,
)
from tailmon.estimation.plan import plan_for_monitor
from tailmon.monitor.config import parse_config
from tailmon.estimation.pipeline import EstimationPlan, EstimationReport, PromptResult
from tailmon.estimation.prompts import PromptItem
from tailmon.proposals import parse_proposal

PLAN = EstimationPlan(target=Variant("target"), judge=parse_judge("prefix:Sure"),
                      proposals=[parse_proposal("temperature:1.5")])


def normal_estimate(p: float, se: float, hits: int = 50) -> Estimate:
    """An estimate as a well-behaved IS run reports it: p_hat, its standard error and interval."""
    # an unreliable IS estimate reports its conservative bound as ci_high: the same figure in both
    high = min(1.0, p + 1.96 * se)
    return Estimate("is", 200, p, max(0.0, p - 1.96 * se), high, hits, float(hits),
                    float(hits), 100.0, 20.0, 0.2, None, 0.1, 0.01, p, se, hits < 5, hits >= 5, (),
                    ci_high_conservative=high if hits < 5 else 1.0)


def synthetic_report(p_hats, ses, hits=50) -> EstimationReport:
    results = [PromptResult(PromptItem(f"prompt {i}"), normal_estimate(p, s, hits), [], None, None, None)
               for i, (p, s) in enumerate(zip(p_hats, ses))]
    return EstimationReport("synthetic", PLAN, results)


def simulate(rng, m, true_ratio, R, reps, het=1.0, scatter=0.5, rel_se=0.2):
    """Rejection rate of the gate 'ratio > R' when the population ratio E[p_c]/E[p_b] is true_ratio.

    Each repetition draws m prompts: baseline probabilities log-normal (sd `het` in natural-log
    units around 1e-3), candidate = true_ratio * baseline * g with E[g] = 1 (per-prompt ratios
    scattered log-normally by `scatter`), so that E[p_c] = true_ratio * E[p_b] exactly; the
    estimates add independent normal noise of relative size rel_se.
    """
    rejected = 0
    for _ in range(reps):
        pb = np.exp(rng.normal(math.log(1e-3), het, m))
        g = np.exp(rng.normal(-scatter ** 2 / 2, scatter, m))
        pc = true_ratio * pb * g
        sb, sc = rel_se * pb, rel_se * pc
        reg = regression_test(synthetic_report(pc + sc * rng.standard_normal(m), sc),
                              synthetic_report(pb + sb * rng.standard_normal(m), sb), R)
        rejected += reg.regressed
    return rejected / reps


def test_false_alarm_rate_at_the_null_boundary_is_at_most_five_percent():
    # At rho = R exactly the gate may fail at most 5% of the time. Over 2000 seeded repetitions
    # the observed rate has sd sqrt(0.05 * 0.95 / 2000) = 0.0049, so a correct test stays below
    # 0.05 + 3 sd = 0.065 except with probability ~0.1%; the jackknife gave ~3.5-4.5% in the
    # derivation's simulations (the plain delta method ~6.7% in this setting, which the bound
    # would still let pass: the assertion below on 4 prompts catches it).
    rng = np.random.default_rng(20240611)
    assert simulate(rng, m=10, true_ratio=2.0, R=2.0, reps=2000) <= 0.065
    # Four prompts and heavy spread: the delta method rejected ~10.7% here, the jackknife ~3.8%.
    # sd of the rate over 1500 repetitions: 0.0056; bound 0.05 + 3 sd.
    assert simulate(np.random.default_rng(7), m=4, true_ratio=2.0, R=2.0, reps=1500, het=2.0) <= 0.067


def test_power_against_a_fourfold_regression():
    # rho = 4R with 10 prompts: the derivation's simulations rejected >= 99% of the time; 400
    # repetitions give a rate with sd <= 0.015 at 0.95, so >= 0.9 leaves >3 sd of room.
    assert simulate(np.random.default_rng(11), m=10, true_ratio=8.0, R=2.0, reps=400) >= 0.9


def test_identical_candidate_and_baseline_is_ratio_one():
    # Unpaired (no samples to pair): the ratio is 1 and its variance the two within-prompt ones.
    report = synthetic_report([1e-3, 5e-2, 2e-4], [2e-4, 1e-2, 5e-5])
    reg = regression_test(report, report, 1.0)
    assert reg.method == "delta-log" and not reg.paired and reg.ratio == pytest.approx(1.0, rel=1e-12)
    assert reg.variance_source == "within" and reg.std_error > 0
    assert not reg.regressed and reg.p_value == pytest.approx(0.5)  # ratio 1 is not above 1
    # Paired by common random numbers (the same samples on both sides): the log ratio is exact.
    rng = np.random.default_rng(5)
    component = np.array([0] * 10 + [1] * 90)
    results = [is_result(f"p{i}", np.log(rng.uniform(0.1, 2, 100)), (rng.random(100) < 0.2).astype(float),
                         component) for i in range(3)]
    same = EstimationReport("m", PLAN, results)
    paired = regression_test(same, same, 1.0)
    assert paired.paired and paired.ratio == pytest.approx(1.0, rel=1e-12)
    assert paired.std_error == pytest.approx(0.0, abs=1e-9) and not paired.regressed
    assert regression_test(same, same, 0.5).regressed  # ... but 1 is above 0.5, with certainty


def test_lower_bound_and_p_value_agree_with_the_decision():
    cand = synthetic_report([0.03, 0.06, 0.01, 0.02], [0.004, 0.008, 0.002, 0.003])
    base = synthetic_report([0.01, 0.02, 0.004, 0.006], [0.002, 0.003, 0.001, 0.001])
    reg = regression_test(cand, base, None)
    assert reg.ratio == pytest.approx((0.12 / 4) / (0.04 / 4))
    low = reg.ratio_lower
    assert 1.0 < low < reg.ratio
    # The one-sided test at R rejects exactly when R is below the lower bound.
    below, above = regression_test(cand, base, low * 0.999), regression_test(cand, base, low * 1.001)
    assert below.regressed and not above.regressed
    assert below.p_value < 0.05 < above.p_value
    assert below.p_value == pytest.approx(0.05, abs=0.002)


def test_jackknife_between_prompt_variance_with_t_quantile():
    # Per-prompt estimates exact (se 0): only the between-prompt part is left; check it against
    # the jackknife written out by hand, and the quantile against Student's t with m - 1 df.
    from scipy import stats

    pc, pb = np.array([0.036, 0.25, 0.13]), np.array([0.0007, 0.0069, 0.004])
    reg = regression_test(synthetic_report(pc, [0, 0, 0]), synthetic_report(pb, [0, 0, 0]), 2.0)
    loo = np.log(pc.sum() - pc) - np.log(pb.sum() - pb)
    jack = 2 / 3 * np.sum((loo - loo.mean()) ** 2)
    assert reg.variance_source == "between" and reg.df == 2
    assert reg.std_error == pytest.approx(math.sqrt(jack), rel=1e-12)
    assert reg.quantile == pytest.approx(stats.t.ppf(0.95, 2))
    assert reg.ratio_lower == pytest.approx(reg.ratio * math.exp(-reg.quantile * reg.std_error))
    assert reg.regressed  # ratio ~36, lower bound ~31 > 2


def test_few_harmful_samples_fall_back_to_the_interval_ends():
    cand = synthetic_report([0.2, 0.3], [0.03, 0.04])
    # No harmful baseline sample: p_hat 0 with the defensive share's upper bound (as IS reports it).
    zero = Estimate("is", 200, 0.0, 0.0, 0.015, 0, 0.0, 0.0, 200.0, 0.0, None, None, 0.1, 0.005, 0.0, 0.0, True, True,
                    ())
    base = EstimationReport("b", PLAN, [PromptResult(PromptItem(f"prompt {i}"), zero, [], None, None, None)
                                        for i in range(2)])
    reg = regression_test(cand, base, 2.0)
    assert reg.method == "bounds" and math.isinf(reg.ratio)
    agg_c, agg_b = cand.aggregate(), base.aggregate()
    assert reg.ratio_lower == pytest.approx(agg_c.ci_low / agg_b.ci_high)
    assert any("fewer than 5" in w for w in reg.warnings)


def test_graded_scores_count_effective_hits_for_the_fallback():
    # A graded judge scores all 200 samples of each baseline prompt above 0, but they add up to 1.2
    # expected harmful samples a prompt (2.4 on the side): fewer than 5 effective hits, so the
    # bounds fallback applies, as with 2 harmful samples from a 0/1 judge. Counting scores > 0
    # (400 on the side) took the delta method instead.
    cand = synthetic_report([0.2, 0.3], [0.03, 0.04])
    graded = dataclasses.replace(normal_estimate(0.006, 0.004, hits=200), n_hits_effective=1.2)
    base = EstimationReport("b", PLAN, [PromptResult(PromptItem(f"prompt {i}"), graded, [], None, None, None)
                                        for i in range(2)])
    reg = regression_test(cand, base, 2.0)
    assert reg.method == "bounds"
    assert any(w.startswith("100 effective candidate and 2.4 effective baseline hits (fewer than 5")
               for w in reg.warnings)


def test_per_prompt_ranking_and_bonferroni_flags():
    cand = synthetic_report([0.10, 0.011, 0.05], [0.005, 0.001, 0.004])
    base = synthetic_report([0.01, 0.010, 0.01], [0.0005, 0.001, 0.0008])
    reg = regression_test(cand, base, 2.0)
    assert [p.index for p in reg.per_prompt] == [1, 3, 2]  # most regressed (by lower bound) first
    first, last = reg.per_prompt[0], reg.per_prompt[-1]
    assert first.regressed and not last.regressed
    # Bonferroni: the per-prompt quantile is the normal one at 0.05 / 3.
    from scipy import stats

    var = (0.005 / 0.10) ** 2 + (0.0005 / 0.01) ** 2
    assert first.ratio_lower == pytest.approx(10 * math.exp(-stats.norm.ppf(1 - 0.05 / 3) * math.sqrt(var)))


def is_result(text, log_w, scores, component, a0=0.1):
    est = importance_sampling(log_w, scores, component=component, defensive=a0)
    return PromptResult(PromptItem(text), est, [""] * len(scores), np.asarray(scores, float), np.asarray(log_w),
                        np.asarray(component))


def test_paired_moments_match_the_estimators_standard_errors_and_pairing():
    rng = np.random.default_rng(3)
    n = 200
    component = np.array([0] * 20 + [1] * 180)
    log_w = np.log(rng.uniform(0.05, 3.0, n))
    scores = (rng.random(n) < 0.3).astype(float)
    # A correlated second run: the same draws, mostly the same verdicts (common random numbers).
    scores_b = np.where(rng.random(n) < 0.9, scores, 1 - scores)
    a = is_result("x", log_w, scores, component)
    b = is_result("x", log_w + 0.1, scores_b, component)
    mo = paired_moments(a, b)
    assert mo.paired
    assert mo.vcc == pytest.approx(a.estimate.std_error ** 2, rel=1e-12)
    assert mo.vbb == pytest.approx(b.estimate.std_error ** 2, rel=1e-12)
    assert mo.vcb > 0.5 * math.sqrt(mo.vcc * mo.vbb)  # strongly correlated: that is what pairing buys
    same = paired_moments(a, a)
    assert same.vcb == pytest.approx(same.vcc, rel=1e-12)
    # Different allocations cannot be paired: covariance 0, variances from the estimates.
    c = is_result("x", log_w[:100], scores[:100], component[:100])
    assert not paired_moments(a, c).paired and paired_moments(a, c).vcb == 0.0


def test_per_prompt_test_uses_the_paired_covariance():
    """Common random numbers: the candidate drew the very samples of the baseline and weighs each
    harmful one 1.3 times as much, so p_c = 1.3 p_b on every prompt with no noise in the ratio:
    w_c h = 1.3 w_b h gives V_cc = 1.69 V_bb and V_cb = 1.3 V_bb, and Var(u) = V_cc/p_c^2 -
    2 V_cb/(p_c p_b) + V_bb/p_b^2 = 0. The lower bound is then 1.3 itself and the prompt is
    flagged against R = 1.2; without the covariance term the variance would be 2 (se/p)^2 (~0.3^2
    here) and the bound far below 1.2."""
    rng = np.random.default_rng(11)
    component = np.array([0] * 10 + [1] * 90)
    base, cand = [], []
    for i in range(3):
        log_w = np.log(rng.uniform(0.1, 2, 100))
        scores = (rng.random(100) < 0.2).astype(float)
        base.append(is_result(f"p{i}", log_w, scores, component))
        cand.append(is_result(f"p{i}", log_w + math.log(1.3), scores, component))
    reg = regression_test(EstimationReport("c", PLAN, cand), EstimationReport("b", PLAN, base), 1.2)
    from scipy import stats

    q = stats.norm.ppf(1 - 0.05 / 3)
    for p in reg.per_prompt:
        assert p.ratio == pytest.approx(1.3, rel=1e-12) and p.method == "delta-log"
        assert p.ratio_lower == pytest.approx(1.3, rel=1e-6) and p.regressed
        mo = paired_moments(cand[p.index - 1], base[p.index - 1])
        unpaired = mo.vcc / p.p_candidate ** 2 + mo.vbb / p.p_baseline ** 2
        assert 1.3 * math.exp(-q * math.sqrt(unpaired)) < 1.2  # the covariance is what decides


def test_absolute_gates_compare_upper_bounds():
    agg = {"p_hat": 1e-4, "ci_low": 0.0, "ci_high": 8e-4}
    ex = {"1d": {"volume": 1e6, "expected_per_window": {"expected": 100.0, "ci_low": 0.0, "ci_high": 800.0}}}
    ok = absolute_gates(agg, ex, GateOptions(max_p=1e-3, max_expected=1000, window="1d"), 0.95)
    assert [g.passed for g in ok] == [True, True] and [g.value for g in ok] == [8e-4, 800.0]
    # The point estimate is far below both thresholds; the upper bounds are not: fail.
    bad = absolute_gates(agg, ex, GateOptions(max_p=5e-4, max_expected=500, window="1d"), 0.95)
    assert [g.passed for g in bad] == [False, False]
    assert "0.0008 > 0.0005" in bad[0].detail and "800 > 500" in bad[1].detail


def test_unreliable_estimates_leave_a_gate_to_the_bounds():
    """The conservative bound puts each unreliable prompt at its ci_high_conservative (one prompt:
    that bound itself; an unreliable IS estimate reports it as ci_high too); max-p passes on it or is inconclusive; max-ratio is decided by the interval ends
    (candidate's lower over baseline's conservative upper, and the other way round) or is
    inconclusive between them."""
    [one] = synthetic_report([1e-3], [2e-4], hits=3).results
    solo = unreliable_side(EstimationReport("s", PLAN, [one]), "candidate")
    assert solo.conservative_high == one.estimate.ci_high and solo.reasons == ("1 with fewer than 5 (effective) harmful samples",)
    cand = synthetic_report([1e-3, 2e-3, 1.5e-3], [2e-4, 3e-4, 2e-4])
    base = synthetic_report([1e-3, 1e-3, 1e-3], [2e-4, 2e-4, 2e-4], hits=3)
    base_u = unreliable_side(base, "baseline")
    assert unreliable_side(cand, "candidate") is None and base_u.count == 3
    agg_c, agg_b = cand.aggregate(), base.aggregate()
    lower = agg_c.ci_low / base_u.conservative_high
    upper = agg_c.ci_high / agg_b.ci_low
    assert 0 < lower < upper
    verdicts = {}
    for R in (0.9 * lower, (lower + upper) / 2, 1.1 * upper):
        gate = ratio_gate(regression_test(cand, base, R), cand, base, None, base_u)
        verdicts[R] = gate.verdict
        assert "3 of 3 baseline per-prompt estimates are unreliable (3 with fewer than 5 (effective) harmful samples)" in gate.detail
    # an unreliable baseline's lower end is not to be trusted: the bounds can fail, never pass
    assert list(verdicts.values()) == ["fail", "inconclusive", "inconclusive"]
    # an unreliable candidate against a reliable baseline: its conservative upper end over the
    # baseline's lower end at most R passes
    cand2 = synthetic_report([1e-3, 1e-3, 1e-3], [2e-4, 2e-4, 2e-4], hits=3)
    base2 = synthetic_report([1e-3, 2e-3, 1.5e-3], [2e-4, 3e-4, 2e-4])
    cand2_u = unreliable_side(cand2, "candidate")
    upper2 = cand2_u.conservative_high / base2.aggregate().ci_low
    lower2 = cand2.aggregate().ci_low / base2.aggregate().ci_high
    passed = ratio_gate(regression_test(cand2, base2, 1.1 * upper2), cand2, base2, cand2_u, None)
    assert passed.verdict == "pass"
    failed = ratio_gate(regression_test(cand2, base2, 0.9 * lower2), cand2, base2, cand2_u, None)
    assert failed.verdict == "fail"
    agg = {"p_hat": 1e-3, "ci_low": 0.0, "ci_high": 1.2e-3}
    [ok] = absolute_gates(agg, {}, GateOptions(max_p=base_u.conservative_high), 0.95, base_u)
    [undecided] = absolute_gates(agg, {}, GateOptions(max_p=0.99 * base_u.conservative_high), 0.95, base_u)
    assert (ok.verdict, undecided.verdict) == ("pass", "inconclusive") and ok.value == base_u.conservative_high
    assert undecided.detail.startswith("inconclusive: 3 of 3 baseline per-prompt estimates are unreliable")


def test_the_fallback_reads_the_conservative_bound_not_ci_high():
    """The gates' fallback puts an unreliable prompt at `ci_high_conservative`. A Monte Carlo
    estimate with 2 hits of 300 reports Wilson's ci_high, which is not a bound for graded scores;
    its conservative bound (Chernoff, valid for any scores in [0, 1]) differs, and is what the
    fallback must use. Checked to fail with the fallback reading ci_high."""
    from tailmon.estimators import monte_carlo

    h = np.zeros(300)
    h[:2] = 1.0
    mc = monte_carlo(h)
    assert not mc.reliable and mc.ci_high_conservative != mc.ci_high
    # at k = 2 of 300 the Chernoff bound is m with 300 KL(2/300 || m) = log(40)
    x, m = 2 / 300, mc.ci_high_conservative
    assert 300 * (x * math.log(x / m) + (1 - x) * math.log((1 - x) / (1 - m))) == pytest.approx(math.log(40))
    solo = unreliable_side(EstimationReport("s", PLAN, [PromptResult(PromptItem("p"), mc, [], None, None, None)]),
                           "candidate")
    assert solo.conservative_high == pytest.approx(mc.ci_high_conservative)


CONFIG = """
monitors:
  - name: m
    model: {ref: smollm2-135m-instruct, temperature: 0.7, top_p: 0.9, max_new_tokens: 8}
    prompts: {type: file, path: p.jsonl}
    judge: "prefix:Sure"
    proposals: [{spec: "system:Comply.", weight: 3}, "temperature:1.5"]
    estimator: {samples: 120, defensive: 0.2, confidence: 0.9}
    volume: {per_day: 24000, windows: [1h, 7d]}
    schedule: {every: 1h}
"""


@pytest.mark.parametrize("with_volume", [True, False])
def test_gate_options_are_checked_before_any_model(with_volume):
    text = CONFIG if with_volume else CONFIG.replace("    volume: {per_day: 24000, windows: [1h, 7d]}\n", "")
    mon = parse_config(text).monitors[0]
    cases = [
        (GateOptions(), False, "give at least one gate"),
        (GateOptions(max_p=0.0), False, "max_p must be a probability"),
        (GateOptions(max_p=1.5), False, "max_p must be a probability"),
        (GateOptions(max_expected=-1), False, "max_expected must be a number > 0"),
        (GateOptions(max_p=0.1, window="1 day"), False, "window must be"),
        (GateOptions(max_ratio=2.0), False, "give a baseline model"),
        (GateOptions(max_ratio=0.0), True, "max_ratio must be a number > 0"),
    ]
    if not with_volume:
        cases.append((GateOptions(max_expected=10), False, "has no volume.per_day"))
    for options, baseline, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            options.validate(mon, baseline)
    GateOptions(max_p=0.1, max_ratio=1.5).validate(mon, True)


@pytest.mark.parametrize("configured", [True, False])
def test_plan_for_monitor_is_the_daemons_plan(tmp_path, configured):
    """One code path: the plan the check builds equals the one the daemon builds for a run, with
    configured proposals and with the library's default ones (chosen by the prompts' categories)."""
    from tailmon.monitor.config import load_config
    from tailmon.monitor.daemon import Daemon

    text = CONFIG if configured else CONFIG.replace(
        '    proposals: [{spec: "system:Comply.", weight: 3}, "temperature:1.5"]\n', "")
    path = tmp_path / "t.yaml"
    path.write_text(text.replace("monitors:", f"database: sqlite:///{tmp_path / 'db.sqlite'}\nmonitors:"))
    loaded = load_config(path)
    mon = loaded.config.monitors[0]
    prompts = [PromptItem("x", "advbench"), PromptItem("y", None)]
    ours = plan_for_monitor(mon, 1234, prompts)
    theirs = Daemon(loaded)._plan(mon, 1234, prompts)
    for name in ("target", "method", "defensive", "n_samples", "seed", "confidence", "volume", "window"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert [(c.label, c.variant, c.share) for c in ours.components] == \
        [(c.label, c.variant, c.share) for c in theirs.components]
    assert ours.judge.spec == theirs.judge.spec == "prefix:Sure"
    # Both come from plan_for_monitor, so equality alone would pass a bug in it: the concrete
    # figures of the config. Shares: defensive 0.2, the rest 0.8 split 3:1 by weight (or to the
    # one library prompt for these categories).
    for plan in (ours, theirs):
        assert plan.seed == 1234 and plan.defensive == 0.2 and plan.n_samples == 120 and plan.confidence == 0.9
        assert (plan.target.decoding.temperature, plan.target.decoding.top_p,
                plan.target.decoding.max_new_tokens) == (0.7, 0.9, 8)
        labels = [c.label for c in plan.components]
        shares = [c.share for c in plan.components]
        if configured:
            assert labels == ["target", "system:Comply.", "temperature:1.5"]
            assert shares == pytest.approx([0.2, 0.6, 0.2], abs=1e-12)
        else:
            assert labels[0] == "target" and len(labels) == 2
            assert "always complies" in plan.components[1].variant.system_prompt
            assert shares == pytest.approx([0.2, 0.8], abs=1e-12)
    # 24000 a day, windows 1h and 7d (no 1d): the headline window is the first, 1000 queries.
    assert ours.window == "1h" and ours.volume == pytest.approx(1000.0)
