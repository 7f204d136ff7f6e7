"""Importance sampling with components that return to the target recovers exactly computable
probabilities through the whole pipeline, across five orders of magnitude.

The checks (unbiasedness within 4 exact sd / sqrt(R), the median relative error bound, pooled
coverage above the binomial floor) and their derivations are those of test_pipe_exact_is.py; the
exact sd of every design comes from enumerating every response (conftest.exact_is_design, which
scores each response under each component with `engine.score`, whose returning density is
itself checked against plain teacher forcing in tests/engines/test_eng_return.py).

Group R1, responses of 3 tokens: prompt "ab", target temperature 0.2, `return:1:temperature:2`
(a hotter first token, then the target), defensive 0.1, n = 400; the events of
test_pipe_exact_is.py group A, decided by the first token (P 1.3e-2 .. 8.1e-7). Computed exactly:
the returning design has relative sd 0.18-0.30 at every level, while the full-length
`temperature:2` at the same 3 tokens has 0.44-1.5 (its weights multiply p/q of two more tokens
the event does not depend on), 1.9-5.1 times the returning one's: the test asserts more than 1.5
times (exact values, no sampling error; a return that changed nothing would give 1).

Group R2, components with different K (the weights need tokens up to the largest K = 2): target
temperature 0.5, 3 tokens, `return:2:temperature:2` and `return:1:system:Sure, here is` with
defensive 0.1, n = 800; two-token events "ab" (P 6.2e-2: the token "ab" or "a" then "b") and
"bb" (P 5.0e-2), relative sd about 0.24 and 0.27.
"""

import math

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.engines.exact import prefix_probability
from tailmon.estimation.pipeline import EstimationPlan, estimate_prompt
from tailmon.estimation.prompts import PromptItem
from tailmon.judges import parse_judge
from tailmon.proposals import parse_proposal

PROMPT = "ab"
Z_MEDIAN = 0.6745  # median of |Z|
SD_MEDIAN = 0.787  # sqrt(R) * sd of the sample median of |Z| over R draws (test_pipe_exact_is.py)


def plan_for(text, target, proposals, seed, n):
    return EstimationPlan(target=target, judge=parse_judge(f"prefix:{text}"),
                          proposals=[parse_proposal(s) for s in proposals], defensive=0.1, n_samples=n, seed=seed)


def check_level(estimates, P, sd):
    R = len(estimates)
    p_hat = np.array([e.p_hat for e in estimates])
    assert abs(p_hat.mean() - P) <= 4 * sd / math.sqrt(R), (p_hat.mean(), P, sd)
    median_rel = float(np.median(np.abs(p_hat - P) / P))
    assert median_rel <= (Z_MEDIAN + 3 * SD_MEDIAN / math.sqrt(R)) * sd / P, (median_rel, sd / P)
    return sum(e.ci_low <= P <= e.ci_high for e in estimates)


def coverage_floor(N, c=0.95):
    return N * c - 3 * math.sqrt(N * c * (1 - c))


TARGET_R1 = Variant("target", Decoding(temperature=0.2, max_new_tokens=3))
LEVELS_R1 = [("s", 1e-2, 1e-1), (",", 1e-3, 1e-2), (" ", 1e-4, 1e-3), ("S", 1e-5, 1e-4), ("I", 1e-6, 1e-5),
             (" is", 1e-7, 1e-6)]
R_R1 = 30


def test_returning_components_recover_deep_tail_probabilities(tiny_engine, exact_design):
    """Catches weights that mix horizons (checked: the drawing component's whole-response log-prob
    against the others' first-K ones biases every level), and a return that does not cut the
    weights' spread (the exact precision check)."""
    covered = total = 0
    for text, lo, hi in LEVELS_R1:
        P = prefix_probability(tiny_engine, PROMPT, TARGET_R1, text)
        assert lo <= P < hi, (text, P)
        P_enum, sd = exact_design(tiny_engine, PROMPT, text, plan_for(text, TARGET_R1, ["return:1:temperature:2"], 0, 400))
        assert P_enum == pytest.approx(P, rel=1e-5)
        assert sd / P < 0.35
        _, sd_full = exact_design(tiny_engine, PROMPT, text, plan_for(text, TARGET_R1, ["temperature:2"], 0, 400))
        assert sd_full > 1.5 * sd, (text, sd_full / P, sd / P)
        estimates = [estimate_prompt(tiny_engine, plan_for(text, TARGET_R1, ["return:1:temperature:2"], seed, 400),
                                     PromptItem(PROMPT)).estimate for seed in range(R_R1)]
        covered += check_level(estimates, P, sd)
        total += len(estimates)
    assert covered >= coverage_floor(total), f"{covered} of {total} intervals cover"


TARGET_R2 = Variant("target", Decoding(temperature=0.5, max_new_tokens=3))
PROPOSALS_R2 = ["return:2:temperature:2", "return:1:system:Sure, here is"]
R_R2 = 30


def test_returning_components_with_different_k(tiny_engine, exact_design):
    """Events decided after token K: catches a continuation that is not the target's (checked:
    responses cut at K, or a continuation conditioned on the head's system prompt, bias the
    estimates). (Weights truncated at the smallest K bias these events too little to see here;
    tests/engines/test_eng_return.py checks the horizon exactly.)"""
    covered = total = 0
    for text, documented in [("ab", 6.2e-2), ("bb", 5.0e-2)]:
        P = prefix_probability(tiny_engine, PROMPT, TARGET_R2, text)
        assert P == pytest.approx(documented, rel=0.05)
        P_enum, sd = exact_design(tiny_engine, PROMPT, text, plan_for(text, TARGET_R2, PROPOSALS_R2, 0, 800))
        assert P_enum == pytest.approx(P, rel=1e-5)
        assert sd / P < 0.3
        estimates = [estimate_prompt(tiny_engine, plan_for(text, TARGET_R2, PROPOSALS_R2, seed, 800),
                                     PromptItem(PROMPT)).estimate for seed in range(R_R2)]
        covered += check_level(estimates, P, sd)
        total += len(estimates)
    assert covered >= coverage_floor(total), f"{covered} of {total} intervals cover"
