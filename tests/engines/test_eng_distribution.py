"""Sampling frequencies match the exact response distribution (chi-square goodness of fit).

With max_new_tokens of 2 or 3 every response can be enumerated (a stop token ends it) and its
exact probability computed with `next_token_logprobs`. N draws are then compared with the exact
probabilities by a chi-square test after pooling: responses with expected count < 5 are merged
into one cell (the usual validity rule for the chi-square approximation; the pooled cell is kept
when its own expected count is >= 5). The seed is fixed and the test asserts p > 1e-3: a correct
sampler fails with probability 1e-3 per seed, so a fixed seed either always passes or reveals a
discrepancy; an error in the sampled distribution of even 1% of the mass on a few sequences gives
p ~ 0 at N = 20000.
"""

import numpy as np
import pytest

from exact_weights import chi_square_pvalue  # noqa: E402  (tests/ is on sys.path)
from tailmon.engines.base import Decoding, Variant

N = 20000


CASES = {
    # (prompt, decoding, seed)
    "T1-m2": ("ab", Decoding(temperature=1.0, max_new_tokens=2), 101),
    "T0.7-top_p0.8-m3": ("Sure, here is", Decoding(temperature=0.7, top_p=0.8, max_new_tokens=3), 102),
    "T1-top_k4-m3": ("I cannot", Decoding(temperature=1.0, top_k=4, max_new_tokens=3), 103),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_frequencies_match_exact_distribution(make_tiny_engine, enumerate_all, case):
    prompt, decoding, seed = CASES[case]
    engine = make_tiny_engine(batch_size=2000)  # large batches: 10 sampling loops of 2000 rows
    variant = Variant("v", decoding)
    seqs, logp = enumerate_all(engine, prompt, variant)
    p = np.exp(logp)
    # the exact probabilities form a distribution
    assert abs(p.sum() - 1.0) < 1e-6
    # responses ending with EOS early and responses cut at max_new_tokens both occur
    assert any(len(s) < decoding.max_new_tokens for s in seqs)

    index = {tuple(s): i for i, s in enumerate(seqs)}
    samples = engine.sample(prompt, variant, N, seed=seed)
    counts = np.zeros(len(seqs))
    for ids in samples.token_ids:
        counts[index[tuple(ids)]] += 1  # KeyError: a response outside the enumerated support
    # each sample's log-prob is the exact one of its response
    np.testing.assert_allclose(samples.logprobs, logp[[index[tuple(s)] for s in samples.token_ids]], atol=1e-4)
    pvalue, cells = chi_square_pvalue(p, counts)
    assert cells >= 10
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2g} over {cells} cells"


def test_chi_square_detects_a_wrong_temperature(make_tiny_engine, enumerate_all):
    """Power check of the test above: T=1 samples against T=0.8 probabilities are rejected."""
    engine = make_tiny_engine(batch_size=2000)
    seqs, logp_wrong = enumerate_all(engine, "ab", Variant("v", Decoding(temperature=0.8, max_new_tokens=2)))
    index = {tuple(s): i for i, s in enumerate(seqs)}
    samples = engine.sample("ab", Variant("v", Decoding(temperature=1.0, max_new_tokens=2)), N, seed=101)
    counts = np.zeros(len(seqs))
    for ids in samples.token_ids:
        counts[index[tuple(ids)]] += 1
    pvalue, _ = chi_square_pvalue(np.exp(logp_wrong), counts)
    assert pvalue < 1e-6
