"""A truncating target (top-p) with a proposal that must not truncate (DESIGN sections 3 and 8).

Target: prompt "ab", temperature 0.7, top_p 0.8, max_new_tokens 3. Proposal: system prompt
"Sure, here is", which reorders the vocabulary, so it samples untruncated and says so in the
warnings. Event `prefix:as` (the token "assistant"), exact P = 5.9e-2 under the truncated
target (exact.prefix_probability honours top-p). Relative sd of one estimate with n = 400,
defensive 0.1: ~0.10 (exact, conftest.exact_is_design). Tolerances as in
test_pipe_exact_is.py: mean of R estimates within 4 sd / sqrt(R) of P; coverage count over R
repeats >= R 0.95 - 3 sqrt(R 0.95 0.05).
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
TARGET = Variant("target", Decoding(temperature=0.7, top_p=0.8, max_new_tokens=3))
PROPOSAL = "system:Sure, here is"
EVENT = "as"
R = 30


def make_plan(seed, n=400):
    return EstimationPlan(target=TARGET, judge=parse_judge(f"prefix:{EVENT}"), proposals=[parse_proposal(PROPOSAL)],
                          defensive=0.1, n_samples=n, seed=seed)


def test_proposal_component_is_untruncated_and_says_so(tiny_engine):
    plan = make_plan(0, n=100)
    target, proposal = plan.components
    assert target.variant.decoding.top_p == 0.8 and target.note is None
    d = proposal.variant.decoding
    assert (d.top_p, d.top_k, d.temperature, d.max_new_tokens) == (1.0, 0, 0.7, 3)
    assert proposal.note and PROPOSAL in proposal.note
    result = estimate_prompt(tiny_engine, plan, PromptItem(PROMPT))
    assert proposal.note in result.estimate.warnings


def test_is_unbiased_for_the_truncated_target(tiny_engine, exact_design):
    P = prefix_probability(tiny_engine, PROMPT, TARGET, EVENT)
    untruncated = prefix_probability(tiny_engine, PROMPT, Variant("u", TARGET.decoding.untruncated()), EVENT)
    assert P == pytest.approx(5.9e-2, rel=0.05)
    assert abs(P - untruncated) > 0.1 * P  # the truncation matters for this event
    P_enum, sd = exact_design(tiny_engine, PROMPT, EVENT, make_plan(0))
    assert P_enum == pytest.approx(P, rel=1e-5)
    estimates, zero_weights = [], 0
    for seed in range(R):
        result = estimate_prompt(tiny_engine, make_plan(seed), PromptItem(PROMPT))
        estimates.append(result.estimate)
        zero_weights += int(np.sum(np.isneginf(result.log_weights)))
    # proposal samples outside the target's nucleus get weight 0 (and are reported)
    assert zero_weights > 0
    assert any("impossible under the target" in w for e in estimates for w in e.warnings)
    p_hat = np.array([e.p_hat for e in estimates])
    assert abs(p_hat.mean() - P) <= 4 * sd / math.sqrt(R), (p_hat.mean(), P, sd)
    covered = sum(e.ci_low <= P <= e.ci_high for e in estimates)
    assert covered >= R * 0.95 - 3 * math.sqrt(R * 0.95 * 0.05)
