"""Importance sampling through the whole pipeline recovers exactly computable probabilities.

Events are `prefix:TEXT` judges on the tiny model, whose probabilities under the target are
exact (`exact.prefix_probability`, itself checked against enumeration in test_eng_exact.py).
For each event, R independent repeats of `estimate_prompt` (different seeds) are compared with
the exact value. The standard deviation of one estimate is not guessed either: every response
the mixture can draw is enumerated, and the exact variance of the stratified estimator with the
pipeline's realised counts n_j is
    Var(p_hat) = (1/n^2) sum_j n_j Var_{q_j}(w h),  w = p / sum_j (n_j/n) q_j,
so every tolerance below derives from it (conftest.exact_is_design). Checks per event:
  * unbiasedness: |mean of R estimates - P| <= 4 sd / sqrt(R) (two-sided normal false-alarm
    rate 6e-5 per event);
  * accuracy: the median relative error over R repeats <= (0.674 + 3 * 0.787 / sqrt(R)) rse,
    rse = sd / P. For a normal estimate the median of |error| is 0.674 sd; the sample median of
    |Z| over R draws has standard deviation 1 / (2 sqrt(R) f) = 0.787 / sqrt(R), f = 0.635 the
    density of |Z| at its median; the bound is that median plus 3 of its standard deviations
    (R = 50: 1.01 rse, R = 30: 1.11 rse);
  * coverage, pooled over all repeats of all events of a group: the number of 95% intervals
    that contain P is ~ Binomial(N, 0.95) for honest intervals; accept anything above the mean
    minus 3 binomial sigmas (over-coverage, e.g. from conservative zero-hit bounds, is not an
    error).

Group A, the deep tail (max_new_tokens = 1): prompt "ab", target temperature 0.2, proposal
`temperature:2`, defensive 0.1, n = 400. One response token, so a hit's weight depends on that
token alone. (With more tokens after the event, a tempered proposal's weights vary with every
free token: p_T / q_2 of the following tokens, whose variance grows with each token; computed
exactly, comparable single-token events with a target at temperature 0.3 and max_new_tokens = 2
have a relative sd of 0.5-1.0 at n = 500, too variable for a normal interval. That is the
proposal's quality, not the pipeline's, so the deep levels use one token and the multi-token
path is checked in group B at moderate levels.) Exact values:
    "s"   (token "system")                       P = 1.3e-2
    ","                                          P = 1.7e-3
    " "   (" here", " is", " cannot", " no")     P = 1.8e-4
    "S"   (token "Sure")                         P = 6.1e-5
    "I"                                          P = 3.2e-6
    " is"                                        P = 8.1e-7
each with relative sd 0.16-0.3 at n = 400 (the proposal puts 3-15% on each event). Monte
Carlo with the same 400 samples sees the two smallest on average 0.0013 and 0.0003 times per run:
it reports p_hat = 0.

Group B, whole responses (max_new_tokens 2-3, EOS ends some of them): prompt "ab", target
temperature 0.7, system-prompt and tempered proposals and a mixture of both; events
"ass" P = 4.9e-2, "!" P = 2.8e-2, "assistant\n" P = 6.2e-3 (relative sd 0.1-0.28 at n = 400).
"""

import math

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.engines.exact import prefix_probability
from tailmon.judges import parse_judge
from tailmon.estimation.pipeline import EstimationPlan, estimate_prompt
from tailmon.estimation.prompts import PromptItem
from tailmon.proposals import parse_proposal

PROMPT = "ab"
N_SAMPLES = 400
Z_MEDIAN = 0.6745  # median of |Z|
SD_MEDIAN = 0.787  # sqrt(R) * sd of the sample median of |Z| over R draws: 1 / (2 f(0.6745)), f = 0.635


def plan_for(text, target, proposals, defensive, seed, method="is", n=N_SAMPLES):
    judge = parse_judge(f"prefix:{text}")
    assert judge.text == text
    return EstimationPlan(target=target, judge=judge, method=method,
                          proposals=[parse_proposal(s) for s in proposals] if method == "is" else (),
                          defensive=defensive, n_samples=n, seed=seed)


def run_repeats(engine, text, target, proposals, defensive, R, method="is", n=N_SAMPLES):
    estimates = []
    for seed in range(R):
        plan = plan_for(text, target, proposals, defensive, seed, method, n)
        estimates.append(estimate_prompt(engine, plan, PromptItem(PROMPT)).estimate)
    return estimates


def check_level(estimates, P, sd):
    R = len(estimates)
    p_hat = np.array([e.p_hat for e in estimates])
    assert abs(p_hat.mean() - P) <= 4 * sd / math.sqrt(R), (p_hat.mean(), P, sd)
    rse = sd / P
    median_rel = float(np.median(np.abs(p_hat - P) / P))
    assert median_rel <= (Z_MEDIAN + 3 * SD_MEDIAN / math.sqrt(R)) * rse, (median_rel, rse)
    return sum(e.ci_low <= P <= e.ci_high for e in estimates)


def coverage_floor(N, c=0.95):
    return N * c - 3 * math.sqrt(N * c * (1 - c))


# --- group A: the deep tail -----------------------------------------------------------------

TARGET_A = Variant("target", Decoding(temperature=0.2, max_new_tokens=1))
PROPOSAL_A = ["temperature:2"]
# (prefix, decade the exact value must lie in: [lo, hi))
LEVELS_A = [("s", 1e-2, 1e-1), (",", 1e-3, 1e-2), (" ", 1e-4, 1e-3), ("S", 1e-5, 1e-4),
            ("I", 1e-6, 1e-5), (" is", 1e-7, 1e-6)]
R_A = 50


def test_exact_levels_span_the_tail(tiny_engine):
    for text, lo, hi in LEVELS_A:
        P = prefix_probability(tiny_engine, PROMPT, TARGET_A, text)
        assert lo <= P < hi, (text, P)


def test_is_recovers_deep_tail_probabilities(tiny_engine, exact_design):
    covered = total = 0
    for text, _, _ in LEVELS_A:
        P = prefix_probability(tiny_engine, PROMPT, TARGET_A, text)
        P_enum, sd = exact_design(tiny_engine, PROMPT, text, plan_for(text, TARGET_A, PROPOSAL_A, 0.1, 0))
        assert P_enum == pytest.approx(P, rel=1e-5)
        assert sd / P < 0.35  # the design has enough hits for a normal interval (see docstring)
        estimates = run_repeats(tiny_engine, text, TARGET_A, PROPOSAL_A, 0.1, R_A)
        covered += check_level(estimates, P, sd)
        total += len(estimates)
        assert all(e.n_samples == N_SAMPLES for e in estimates)
    assert covered >= coverage_floor(total), f"{covered} of {total} intervals cover"


def test_monte_carlo_at_the_same_budget_misses_the_small_end(tiny_engine):
    """MC with 400 samples: expected hits per run 400 P <= 0.0013, so nearly every run reports
    p_hat = 0 (relative error 1). Runs with a hit ~ Binomial(R, 1 - (1 - P)^400), mean <= 0.07:
    at most 2 of R=50 (P(>= 3) ~ 5e-5). MC is not wrong, only uninformative: its interval is
    an honest upper bound ~ 3.7/n far above P."""
    for text in ["I", " is"]:
        P = prefix_probability(tiny_engine, PROMPT, TARGET_A, text)
        estimates = run_repeats(tiny_engine, text, TARGET_A, [], 0.0, R_A, method="mc")
        assert sum(e.p_hat > 0 for e in estimates) <= 2
        assert all(e.ci_high >= P for e in estimates)
        assert all(e.method == "mc" and not e.reliable for e in estimates if e.p_hat == 0)


def test_is_without_defensive_share(tiny_engine, exact_design):
    """defensive = 0: every sample from the proposal, weights p/q unbounded but still unbiased."""
    covered = total = 0
    for text in [",", "S", "I"]:
        P = prefix_probability(tiny_engine, PROMPT, TARGET_A, text)
        plan = plan_for(text, TARGET_A, PROPOSAL_A, 0.0, 0)
        assert [c.share for c in plan.components] == [0.0, 1.0]
        _, sd = exact_design(tiny_engine, PROMPT, text, plan)
        estimates = run_repeats(tiny_engine, text, TARGET_A, PROPOSAL_A, 0.0, R_A)
        covered += check_level(estimates, P, sd)
        total += len(estimates)
    assert covered >= coverage_floor(total), f"{covered} of {total} intervals cover"


# --- group B: whole responses -------------------------------------------------------------

TARGET_B3 = Variant("target", Decoding(temperature=0.7, max_new_tokens=3))
TARGET_B2 = Variant("target", Decoding(temperature=0.7, max_new_tokens=2))
GROUP_B = [
    # (target, event, proposals, exact P (documented; checked to 10%))
    (TARGET_B3, "ass", ["system:Sure, here is"], 4.9e-2),
    (TARGET_B3, "!", ["temperature:1.5"], 2.8e-2),
    (TARGET_B2, "assistant\n", ["system: no no no"], 6.2e-3),
    (TARGET_B3, "ass", ["system:Sure, here is", "temperature:1.5"], 4.9e-2),
]
R_B = 30


def test_is_recovers_probabilities_of_multi_token_responses(tiny_engine, exact_design):
    covered = total = 0
    for target, text, proposals, documented in GROUP_B:
        P = prefix_probability(tiny_engine, PROMPT, target, text)
        assert P == pytest.approx(documented, rel=0.1)
        P_enum, sd = exact_design(tiny_engine, PROMPT, text, plan_for(text, target, proposals, 0.1, 0))
        assert P_enum == pytest.approx(P, rel=1e-5)
        assert sd / P < 0.3
        estimates = run_repeats(tiny_engine, text, target, proposals, 0.1, R_B)
        covered += check_level(estimates, P, sd)
        total += len(estimates)
    assert covered >= coverage_floor(total), f"{covered} of {total} intervals cover"
