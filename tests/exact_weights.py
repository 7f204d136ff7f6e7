"""Checks that an estimate's weights and p_hat are exactly what they must be, for the embedded
model's tests (transformers, vLLM, OpenAI-compatible engines).

A tolerance on p_hat alone cannot catch a weight that is off by a constant factor from a few
hundred samples (issue 16: "within 50%" passes a 1.5x bias). Two checks can:

* `assert_weights_recomputed`: every sample's log-weight equals the balance heuristic recomputed
  from teacher-forced scoring of its token ids under the target and every component, with the
  realised shares n_j / n; and p_hat equals mean(w h) of the recomputed weights. Any error in how
  the pipeline assembles weights (a wrong column, nominal shares, a stale prompt rendering for one
  component, a sampled log-prob that is not the processed one) moves them by far more than the
  engines' round-off.
* `combined_z`: over R independent estimates of exact values P_i, Z = sum_i (p_hat_i - P_i) / SE_i /
  sqrt(R) is close to N(0, 1) when the estimator is unbiased (each z_i has mean ~0 and sd ~1; the
  estimated SE makes it slightly heavy-tailed when hits are few). A bias by a factor c shifts each
  z_i by (c - 1) P / SE_i, i.e. by (c - 1) sqrt(hits) for hits of nearly equal weight: at c = 1.5
  and 10-40 hits that is 1.6-3.2 per estimate, so Z moves by sqrt(R) times that (>= 6 at R = 16).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from scipy.special import logsumexp

# |Z| above this is a failure: P(|N(0,1)| > 3.5) = 4.7e-4, and the bound leaves about 1 sd for the
# heavier tails of z_i with an estimated SE; a 1.5x bias gives |Z| >= 6 in the tests that use it.
Z_LIMIT = 3.5


def recompute_log_weights(engine, plan, prompt: str, result) -> np.ndarray:
    """log w of each sample of `result` (a PromptResult), from the engine's teacher-forced scores."""
    comps = plan.components
    ids = result.token_ids
    assert ids is not None and len(ids) == len(result.scores)
    counts = np.bincount(np.asarray(result.component), minlength=len(comps))
    shares = counts / counts.sum()
    log_q = np.stack([engine.score(prompt, c.variant, ids) for c in comps], axis=1)
    used = shares > 0
    log_mix = logsumexp(log_q[:, used] + np.log(shares[used])[None, :], axis=1)
    return log_q[:, 0] - log_mix  # component 0 is the target itself


def assert_weights_recomputed(engine, plan, prompt: str, result, atol: float) -> None:
    """The estimate's log-weights and p_hat equal those recomputed by scoring (see the module)."""
    assert plan.components[0].variant == plan.target, "component 0 must be the target"
    want = recompute_log_weights(engine, plan, prompt, result)
    got = np.asarray(result.log_weights)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    p_hat = float(np.mean(np.exp(want) * np.asarray(result.scores)))
    # the weights agree within atol in the log, so their mean within a factor e^atol
    assert abs(result.estimate.p_hat - p_hat) <= math.expm1(atol) * p_hat + 1e-300, (result.estimate.p_hat, p_hat)


def combined_z(pairs) -> tuple[float, list[float]]:
    """Z = sum_i (p_hat_i - P_i) / SE_i / sqrt(R) over (estimate, exact P_i) pairs (see the
    module), and the z_i."""
    z = []
    for e, exact in pairs:
        assert e.n_harmful > 0 and e.std_error > 0, "every estimate must have hits for a z"
        z.append((e.p_hat - exact) / e.std_error)
    return float(np.sum(z) / math.sqrt(len(z))), [round(float(v), 2) for v in z]


def chi_square_pvalue(expected_p, counts):
    """Chi-square goodness-of-fit p-value of `counts` against probabilities `expected_p`, and the
    number of cells: responses with expected count < 5 are pooled into one cell (the validity rule
    of the chi-square approximation), merged into the previous cell when the pool is itself < 5
    (tests/engines/test_eng_distribution.py)."""
    expected = expected_p * counts.sum()
    big = expected >= 5
    exp_cells = list(expected[big])
    obs_cells = list(counts[big])
    if (~big).any():
        exp_cells.append(expected[~big].sum())
        obs_cells.append(counts[~big].sum())
    exp_cells, obs_cells = np.array(exp_cells), np.array(obs_cells, dtype=float)
    if exp_cells[-1] < 5 and (~big).any():  # a pooled cell too small to stand alone: merge it
        exp_cells[-2] += exp_cells[-1]
        obs_cells[-2] += obs_cells[-1]
        exp_cells, obs_cells = exp_cells[:-1], obs_cells[:-1]
    stat = float(np.sum((obs_cells - exp_cells) ** 2 / exp_cells))
    return float(stats.chi2.sf(stat, len(exp_cells) - 1)), len(exp_cells)


def assert_draws_follow(engine, prompt, variant, samples, enumerate_all, atol):
    """A component's draws against its exact enumerated distribution: every response inside the
    support, sampled log-probs equal to the exact ones (`atol`), and the frequencies passing a
    chi-square test (p > 1e-3 over at least 10 cells)."""
    seqs, logp = enumerate_all(engine, prompt, variant)
    assert abs(np.exp(logp).sum() - 1.0) < 1e-6
    index = {tuple(s): i for i, s in enumerate(seqs)}
    counts = np.zeros(len(seqs))
    for ids in samples.token_ids:
        counts[index[tuple(ids)]] += 1  # KeyError: a response outside the (truncated) support
    np.testing.assert_allclose(samples.logprobs, logp[[index[tuple(s)] for s in samples.token_ids]],
                               atol=atol, err_msg=variant.name)
    pvalue, cells = chi_square_pvalue(np.exp(logp), counts)
    assert cells >= 10, variant.name
    assert pvalue > 1e-3, f"{variant.name}: chi-square p = {pvalue:.2g} over {cells} cells"


def prefix_event_estimate(engine, prompt: str, event: dict, proposal: str, *, n_samples: int, seed: int):
    """The IS estimate of an exact prefix event of tests/vllm_engines/data/reference.json (`event`:
    word, temperature, max_new_tokens, p) with one proposal at the defensive share 0.1: (plan,
    PromptResult), for the engines' IS tests."""
    from tailmon.engines.base import Decoding, Variant
    from tailmon.estimation.pipeline import EstimationPlan, estimate_prompt
    from tailmon.estimation.prompts import PromptItem
    from tailmon.judges import parse_judge
    from tailmon.proposals import parse_proposal

    target = Variant("target", Decoding(temperature=event["temperature"], max_new_tokens=event["max_new_tokens"]))
    plan = EstimationPlan(target=target, judge=parse_judge(f"prefix:{event['word']}"), method="is",
                          proposals=[parse_proposal(proposal)], defensive=0.1, n_samples=n_samples, seed=seed)
    return plan, estimate_prompt(engine, plan, PromptItem(prompt))
