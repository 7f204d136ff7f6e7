"""The pipeline's importance weights, recomputed independently with the engine.

`estimate_prompt` keeps log_w and which component drew each sample, but not the token ids; the
ids are re-drawn here with the same per-component seeds (sampling is reproducible, see
test_eng_consistency.py), checked against the stored response texts, and scored directly.
Tolerance 1e-4 on log w: the drawing component's log-prob comes from sampling and the others
from scoring, which agree to 1e-4 (float32 round-off, test_eng_consistency.py).
"""

import numpy as np
import pytest
from scipy.special import logsumexp

from tailmon.engines.base import Decoding, Variant
from tailmon.judges import parse_judge
from tailmon.estimation.pipeline import EstimationPlan, allocate, component_seed, estimate_prompt
from tailmon.estimation.prompts import PromptItem
from tailmon.proposals import parse_proposal

TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=4))
PROMPT = PromptItem("ab")


def redraw(engine, plan, prompt):
    """The pipeline's samples, drawn again: ids and drawing component, in the pipeline's order."""
    counts = allocate(plan.n_samples, [c.share for c in plan.components])
    ids, drawn = [], []
    for j, (comp, n_j) in enumerate(zip(plan.components, counts)):
        if n_j:
            ids += engine.sample(prompt.text, comp.variant, n_j, component_seed(plan.seed, prompt.text, j)).token_ids
            drawn += [j] * n_j
    return ids, np.array(drawn), np.array(counts)


# n = 150: every count is exact (30/60/60). n = 37 with shares 0.1/0.45/0.45: largest remainder
# gives 4/17/16, realised shares 0.108/0.459/0.432, so weights built from the nominal shares
# would differ from the ones below by up to |log(0.108/0.1)| = 0.08 in log w, far above 1e-4.
@pytest.mark.parametrize("defensive, n, expected_counts", [(0.2, 150, [30, 60, 60]), (0.1, 37, [4, 17, 16])])
def test_mixture_weights_are_balance_heuristic_and_bounded(tiny_engine, defensive, n, expected_counts):
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:a"),
                          proposals=[parse_proposal("system:Sure, here is"), parse_proposal("temperature:1.5")],
                          defensive=defensive, n_samples=n, seed=7)
    result = estimate_prompt(tiny_engine, plan, PROMPT)
    ids, drawn, counts = redraw(tiny_engine, plan, PROMPT)
    assert [tiny_engine.decode(r) for r in ids] == result.responses
    np.testing.assert_array_equal(result.component, drawn)
    assert counts.tolist() == expected_counts

    # every weight <= 1 / defensive: p / (a0 p + ...) <= 1 / a0
    w = np.exp(result.log_weights)
    assert np.all(w <= (1 + 1e-9) / defensive)
    assert w.max() > 1.0  # the bound is not trivially met

    # log w = log p - log sum_j a_j q_j with a_j = n_j / n, all scored directly
    logq = np.stack([tiny_engine.score(PROMPT.text, c.variant, ids) for c in plan.components], axis=1)
    expected = logq[:, 0] - logsumexp(logq + np.log(counts / plan.n_samples), axis=1)
    np.testing.assert_allclose(result.log_weights, expected, rtol=0, atol=1e-4)

    # the estimate is the mean of w h with the judge's scores
    h = np.array([r.startswith("a") for r in result.responses], dtype=float)
    np.testing.assert_array_equal(result.scores, h)
    assert result.estimate.p_hat == pytest.approx(float(np.mean(w * h)), rel=1e-12)


@pytest.mark.parametrize("proposal", ["temperature:1.5", "system:I cannot"])
def test_single_proposal_without_defensive_weight_is_the_likelihood_ratio(tiny_engine, proposal):
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:a"), proposals=[parse_proposal(proposal)],
                          defensive=0.0, n_samples=120, seed=3)
    result = estimate_prompt(tiny_engine, plan, PROMPT)
    assert set(result.component.tolist()) == {1}
    ids, _, _ = redraw(tiny_engine, plan, PROMPT)
    assert [tiny_engine.decode(r) for r in ids] == result.responses
    q_variant = plan.components[1].variant
    expected = tiny_engine.score(PROMPT.text, TARGET, ids) - tiny_engine.score(PROMPT.text, q_variant, ids)
    np.testing.assert_allclose(result.log_weights, expected, rtol=0, atol=1e-4)
    # unbounded without a defensive share: some weights exceed what a0 = 0.2 would allow
    assert np.exp(result.log_weights).max() > 1.0


def test_monte_carlo_keeps_no_weights(tiny_engine):
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:a"), method="mc", n_samples=50, seed=1)
    result = estimate_prompt(tiny_engine, plan, PROMPT)
    assert result.log_weights is None
    assert result.estimate.method == "mc"
    assert result.estimate.p_hat == pytest.approx(float(np.mean(result.scores)))
    samples = tiny_engine.sample(PROMPT.text, TARGET, 50, component_seed(1, PROMPT.text, 0))
    assert [tiny_engine.decode(r) for r in samples.token_ids] == result.responses


def test_progress_counts_every_sample(tiny_engine):
    seen = []
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:a"), proposals=[parse_proposal("temperature:1.5")],
                          defensive=0.1, n_samples=37, seed=0)
    estimate_prompt(tiny_engine, plan, PROMPT, progress=seen.append)
    assert sum(seen) == 37
