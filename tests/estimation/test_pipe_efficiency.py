"""Monte Carlo equivalents (tailmon.estimation.efficiency): n_MC = p_hat (1 - p_hat) / SE^2, its
ratio to the samples drawn and its time counterpart, reported with reliable non-zero estimates
only, in the report's JSON and its table."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.estimation.efficiency import FIELDS, mc_equivalent_samples, prompt_efficiency, run_efficiency
from tailmon.estimation.pipeline import EstimationPlan, run_estimation
from tailmon.estimation.prompts import PromptItem
from tailmon.estimation.render import estimates_table
from tailmon.estimators import monte_carlo
from tailmon.judges import parse_judge
from tailmon.proposals import parse_proposal

TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=3))


def reliable_mc(k: int = 30, n: int = 100):
    est = monte_carlo(np.r_[np.ones(k), np.zeros(n - k)])
    assert est.reliable
    return est


def test_mc_equivalent_of_monte_carlo_is_its_own_sample_count():
    """MC's own SE is sqrt(p(1-p)/n), so its MC equivalent is exactly n. Catches SE in place of
    SE^2, p in place of p(1-p), or the ratio taken the wrong way round."""
    est = reliable_mc()
    assert mc_equivalent_samples(est) == pytest.approx(100, rel=1e-12)
    assert prompt_efficiency(est, None, None)["mc_sample_ratio"] == pytest.approx(1.0, rel=1e-12)


def test_mc_equivalent_of_a_precise_estimate():
    """p = 0.01 with SE 0.001 from 100 samples: MC needs 0.01 * 0.99 / 1e-6 = 9900, 99 per sample."""
    est = replace(reliable_mc(), p_hat=0.01, std_error=0.001)
    fig = prompt_efficiency(est, seconds=2.0, plain_seconds_per_sample=0.01)
    assert fig["mc_equivalent_samples"] == pytest.approx(9900)
    assert fig["mc_sample_ratio"] == pytest.approx(99)
    assert fig["mc_time_ratio"] == pytest.approx(9900 * 0.01 / 2.0)  # 99 s of MC for 2 s of IS


@pytest.mark.parametrize("change", [
    {"reliable": False},                                  # an SE that does not mean what it says
    {"p_hat": 0.0, "std_error": 0.0},                     # a zero-hit bound: nothing to match
    {"upper_bound_only": True, "reliable": False},
    {"p_hat": 1.0},
    {"std_error": 0.0},
    {"p_hat": float("nan")},
])
def test_no_efficiency_where_it_would_flatter(change):
    """Catches a ratio reported for an unreliable, zero or degenerate estimate."""
    est = replace(reliable_mc(), **change)
    assert mc_equivalent_samples(est) is None
    assert prompt_efficiency(est, 1.0, 0.01) == dict.fromkeys(FIELDS)


def test_run_figures_sum_over_prompts_and_need_every_prompt():
    a = prompt_efficiency(replace(reliable_mc(), p_hat=0.01, std_error=0.001), 2.0, 0.01)  # 9900, 99 s of MC
    b = prompt_efficiency(reliable_mc(), 1.0, 0.02)  # 100, 2 s of MC
    run = run_efficiency([a, b], [100, 100], [2.0, 1.0], [0.01, 0.02])
    assert run["mc_equivalent_samples"] == pytest.approx(10000)
    assert run["mc_sample_ratio"] == pytest.approx(50)
    assert run["mc_time_ratio"] == pytest.approx((99 + 2) / 3)
    # one prompt without: nothing for the run (an average over the reported ones would flatter)
    none = prompt_efficiency(replace(reliable_mc(), reliable=False), 1.0, 0.02)
    assert run_efficiency([a, none], [100, 100], [2.0, 1.0], [0.01, 0.02]) == dict.fromkeys(FIELDS)
    # untimed prompts: the sample figures, no time
    untimed = run_efficiency([prompt_efficiency(reliable_mc(), None, None)], [100], [None], [None])
    assert untimed["mc_sample_ratio"] == pytest.approx(1) and untimed["mc_time_ratio"] is None


def test_monte_carlo_run_is_worth_its_own_samples(tiny_engine):
    """Through the pipeline: plain MC reports a sample ratio of 1 and a time ratio of at most 1
    (the same generation and judging timed on both sides)."""
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:a"), method="mc", n_samples=200, seed=0)
    report = run_estimation(tiny_engine, plan, [PromptItem("ab"), PromptItem("I cannot")]).to_dict()
    for e, t in zip(report["estimates"], report["timing"]["estimates"]):
        assert e["reliable"]
        assert e["mc_sample_ratio"] == pytest.approx(1.0, rel=1e-9)
        assert t["seconds"] > 0 and t["plain_seconds_per_sample"] > 0
        # n_MC = n: MC time over the draw's time, at most 1 (wall-clock noise only lowers it)
        assert t["mc_time_ratio"] == pytest.approx(200 * t["plain_seconds_per_sample"] / t["seconds"], rel=1e-9)
        assert t["mc_time_ratio"] <= 1.0 + 1e-9
    assert report["aggregate"]["mc_sample_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert 0 < report["timing"]["aggregate"]["mc_time_ratio"] <= 1.0 + 1e-9


def test_importance_sampling_run_reports_reliable_estimates_only(tiny_engine):
    """An IS run with reliable and unreliable prompts: the reliable ones carry n_MC = p(1-p)/SE^2
    from their own fields, the others null; the run has none; JSON-clean. The time ratio never
    exceeds the sample ratio: IS costs at least plain generation and judging per sample, so a
    time ratio above it would flatter (as timing plain generation on a small target stratum,
    which pays a batch's fixed costs for few samples, did)."""
    # 100 samples: two of the three prompts have an ESS of w*h below 10 (at 200 all three pass)
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:a"), proposals=[parse_proposal("temperature:1.5")],
                          defensive=0.1, n_samples=100, seed=0)
    prompts = [PromptItem("ab"), PromptItem("I cannot"), PromptItem("Sure, here is")]
    result = run_estimation(tiny_engine, plan, prompts)
    report = result.to_dict()
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    seen = set()
    for e, t in zip(report["estimates"], [t["mc_time_ratio"] for t in report["timing"]["estimates"]]):
        seen.add(e["reliable"] and e["p_hat"] > 0)
        if e["reliable"] and e["p_hat"] > 0:
            n_mc = e["p_hat"] * (1 - e["p_hat"]) / e["std_error"] ** 2
            assert e["mc_equivalent_samples"] == pytest.approx(n_mc, rel=1e-12)
            assert e["mc_sample_ratio"] == pytest.approx(n_mc / 100, rel=1e-12)
            assert 0 < t <= e["mc_sample_ratio"] * (1 + 1e-9)
        else:
            assert e["mc_equivalent_samples"] is None and e["mc_sample_ratio"] is None and t is None
    assert seen == {True, False}, "the plan should give both kinds of estimate"
    assert report["aggregate"]["mc_equivalent_samples"] is None and report["aggregate"]["mc_sample_ratio"] is None
    assert "mc_time_ratio" not in report["aggregate"] and report["timing"]["aggregate"]["mc_time_ratio"] is None
    reliable = [r for r in result.results if r.estimate.reliable and r.estimate.p_hat > 0]
    one = run_estimation(tiny_engine, plan, [reliable[0].prompt]).to_dict()
    assert one["aggregate"]["mc_sample_ratio"] == pytest.approx(one["estimates"][0]["mc_sample_ratio"])
    assert one["timing"]["aggregate"]["mc_time_ratio"] == pytest.approx(one["timing"]["estimates"][0]["mc_time_ratio"])


def test_reports_are_reproducible_with_timing_apart(tiny_engine):
    """Only the `timing` block holds wall-clock figures: the same seeds give the same report
    otherwise (`tailmon check` compares candidate and baseline estimates). Catches a time ratio
    put in the estimates or the aggregate."""
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:a"), method="mc", n_samples=100, seed=1)
    first = run_estimation(tiny_engine, plan, [PromptItem("ab")]).to_dict()
    again = run_estimation(tiny_engine, plan, [PromptItem("ab")]).to_dict()
    assert first["estimates"][0]["mc_sample_ratio"] is not None
    assert first.pop("timing") != again.pop("timing")
    assert first == again


def test_table_shows_the_ratios_and_dashes():
    report = {
        "model": "m", "method": "is", "judge": "prefix:a", "components": [{"label": "target", "share": 1.0}],
        "decoding": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 3},
        "estimates": [
            {"prompt": "good", "p_hat": 0.01, "ci_low": 0.005, "ci_high": 0.02, "n_harmful": 40, "n_samples": 100,
             "ess": 50.0, "khat": 0.2, "reliable": True, "upper_bound_only": False, "warnings": [],
             "mc_equivalent_samples": 9900.0, "mc_sample_ratio": 99.0},
            {"prompt": "weak", "p_hat": 0.02, "ci_low": 0.0, "ci_high": 0.2, "n_harmful": 2, "n_samples": 100,
             "ess": 5.0, "khat": 0.9, "reliable": False, "upper_bound_only": True, "warnings": [],
             "mc_equivalent_samples": None, "mc_sample_ratio": None}],
        "aggregate": {"n_prompts": 2, "p_hat": 0.015, "ci_low": 0.0, "ci_high": 0.1, "n_harmful": 42,
                      "n_samples": 200, "reliable": False, "n_unreliable": 1,
                      "mc_equivalent_samples": None, "mc_sample_ratio": None},
        "timing": {"estimates": [{"seconds": 2.0, "plain_seconds_per_sample": 0.01, "mc_time_ratio": 49.5},
                                 {"seconds": 1.0, "plain_seconds_per_sample": 0.01, "mc_time_ratio": None}],
                   "aggregate": {"seconds": 3.0, "mc_time_ratio": None}},
    }
    lines = estimates_table(report).splitlines()
    header = next(line for line in lines if line.startswith("prompt"))
    assert header.split()[-4:] == ["MC", "samples", "MC", "time"]
    good = next(line for line in lines if line.startswith("good"))
    weak = next(line for line in lines if line.startswith("weak"))
    assert good.split()[-2:] == ["99x", "49.5x"]
    assert weak.split()[-2:] == ["-", "-"]
    assert next(line for line in lines if line.startswith("all 2")).split()[-2:] == ["-", "-"]
    assert "Monte Carlo would need" not in "\n".join(lines)
    report["estimates"] = report["estimates"][:1]
    report["aggregate"].update(n_prompts=1, reliable=True, n_unreliable=0, n_samples=100,
                               mc_equivalent_samples=9900.0, mc_sample_ratio=99.0)
    report["timing"] = {"estimates": report["timing"]["estimates"][:1], "aggregate": {"mc_time_ratio": 49.5}}
    text = estimates_table(report)
    assert "Monte Carlo would need about 9.9e+03 samples for the same standard errors: 99x the 100 drawn, " \
           "49.5x the time" in text
