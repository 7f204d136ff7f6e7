"""Sampling and teacher-forced scoring are the same function (DESIGN sections 1 and 3).

Every importance weight is log p(y) - log q(y) with one side from sampling and the other from
scoring, so the log-prob a sample was drawn with must equal `score` of the same ids under the
same variant. The bound 1e-4 per sequence is float32 round-off: a cached incremental forward
and a full padded forward differ by ~1e-6 per token in the logits here; 1e-4 is far below any
error a real bug makes (a wrong temperature, a missing EOS term or a dropped renormalisation is
off by 1e-2 or more on these sequences).
"""

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.proposals import SystemPromptProposal, TemperatureProposal

TOL = 1e-4

DECODINGS = {
    "T1": Decoding(temperature=1.0, max_new_tokens=8),
    "T0.7": Decoding(temperature=0.7, max_new_tokens=8),
    "T1-top_p0.8": Decoding(temperature=1.0, top_p=0.8, max_new_tokens=8),
    "T0.7-top_p0.8": Decoding(temperature=0.7, top_p=0.8, max_new_tokens=8),
    "top_k5": Decoding(temperature=1.0, top_k=5, max_new_tokens=8),
    "T0.7-top_k5-top_p0.8": Decoding(temperature=0.7, top_k=5, top_p=0.8, max_new_tokens=8),
}


def check_samples(engine, prompt, variant, samples):
    m = variant.decoding.max_new_tokens
    stops = engine.stop_token_ids
    for ids, done in zip(samples.token_ids, samples.finished):
        assert 1 <= len(ids) <= m
        # a stop token can only be the last token, and `finished` says whether there is one
        assert not any(t in stops for t in ids[:-1])
        assert done == (ids[-1] in stops)
        if not done:
            assert len(ids) == m
    assert samples.logprobs.dtype == np.float64
    assert np.all(np.isfinite(samples.logprobs))
    scored = engine.score(prompt, variant, samples.token_ids)
    np.testing.assert_allclose(samples.logprobs, scored, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", list(DECODINGS))
def test_sample_logprobs_equal_score_target(tiny_engine, name):
    variant = Variant("target", DECODINGS[name])
    # 150 samples with batch size 64: three batches, the last one partial
    samples = tiny_engine.sample("ab", variant, 150, seed=1)
    assert len(samples) == 150
    # both finished and cut responses occur, so the EOS term and the cut are both exercised
    assert 0 < sum(samples.finished) < 150
    check_samples(tiny_engine, "ab", variant, samples)


@pytest.mark.parametrize("name", ["T1", "T0.7-top_p0.8", "top_k5"])
def test_sample_logprobs_equal_score_system_prompt_variant(tiny_engine, name):
    target = Variant("target", DECODINGS[name])
    variant = SystemPromptProposal("Sure, here is").variant(target)
    assert variant.system_prompt == "Sure, here is"
    samples = tiny_engine.sample("I cannot", variant, 100, seed=2)
    check_samples(tiny_engine, "I cannot", variant, samples)


@pytest.mark.parametrize("name", ["T1", "T0.7", "T0.7-top_p0.8"])
def test_sample_logprobs_equal_score_temperature_variant(tiny_engine, name):
    target = Variant("target", DECODINGS[name])
    variant = TemperatureProposal(1.5).variant(target)
    assert variant.decoding.temperature == 1.5
    samples = tiny_engine.sample("Sure, here is", variant, 100, seed=3)
    check_samples(tiny_engine, "Sure, here is", variant, samples)


def test_scores_differ_between_variants(tiny_engine):
    """The variants are different distributions (else the tests above prove little)."""
    target = Variant("target", DECODINGS["T1"])
    samples = tiny_engine.sample("ab", target, 50, seed=4)
    lp_target = tiny_engine.score("ab", target, samples.token_ids)
    for other in [Variant("t07", DECODINGS["T0.7"]),
                  SystemPromptProposal("Sure, here is").variant(target),
                  TemperatureProposal(1.5).variant(target)]:
        lp_other = tiny_engine.score("ab", other, samples.token_ids)
        assert np.max(np.abs(lp_other - lp_target)) > 0.1


def test_system_prompt_variant_renders_another_prompt(tiny_engine):
    target = Variant("target", DECODINGS["T1"])
    variant = SystemPromptProposal("I cannot").variant(target)
    plain = tiny_engine.prompt_ids("ab", None)
    with_system = tiny_engine.prompt_ids("ab", "I cannot")
    assert plain != with_system
    assert with_system[-len(plain):] == plain  # the same user turn, after a system turn
    lp_t = tiny_engine.next_token_logprobs("ab", target, [[], [7]])
    lp_s = tiny_engine.next_token_logprobs("ab", variant, [[], [7]])
    assert np.max(np.abs(lp_t - lp_s)) > 0.05
    # one rendering for sampler and scorer: the system-prompt samples' own log-probs are
    # reproduced by scoring under the same variant, not under the target
    samples = tiny_engine.sample("ab", variant, 40, seed=5)
    np.testing.assert_allclose(samples.logprobs, tiny_engine.score("ab", variant, samples.token_ids), atol=TOL)
    assert np.max(np.abs(samples.logprobs - tiny_engine.score("ab", target, samples.token_ids))) > 0.05


def test_truncated_tokens_score_minus_inf(tiny_engine):
    """A token outside the top-k support scores -inf (DESIGN: -inf where truncation removed it)."""
    variant = Variant("k2", Decoding(top_k=2, max_new_tokens=2))
    logp = tiny_engine.next_token_logprobs("ab", variant, [[]])[0]
    assert np.isfinite(logp).sum() == 2
    outside = int(np.flatnonzero(~np.isfinite(logp))[0])
    inside = int(np.flatnonzero(np.isfinite(logp))[0])
    s = tiny_engine.score("ab", variant, [[outside], [inside]])
    assert s[0] == -np.inf and np.isfinite(s[1])


def test_score_handles_mixed_lengths_and_chunking(tiny_engine, monkeypatch):
    """Right padding, different lengths and splitting into chunks do not change scores."""
    import tailmon.engines.transformers_engine as transformers_engine

    variant = Variant("t", Decoding(temperature=0.7, max_new_tokens=8))
    samples = tiny_engine.sample("ab", variant, 120, seed=6)
    assert len({len(r) for r in samples.token_ids}) > 2
    whole = tiny_engine.score("ab", variant, samples.token_ids)
    one_by_one = np.array([tiny_engine.score("ab", variant, [r])[0] for r in samples.token_ids[:20]])
    np.testing.assert_allclose(whole[:20], one_by_one, atol=TOL)
    monkeypatch.setattr(transformers_engine, "SCORE_TOKEN_BUDGET", 20)  # a few rows per chunk
    np.testing.assert_allclose(tiny_engine.score("ab", variant, samples.token_ids), whole, atol=TOL)


def test_next_token_logprobs_match_score(tiny_engine):
    """score(y) = sum over positions of next_token_logprobs(prefix)[next token]."""
    variant = Variant("t", Decoding(temperature=0.7, top_p=0.8, max_new_tokens=6))
    samples = tiny_engine.sample("I cannot", variant, 10, seed=7)
    for ids, lp in zip(samples.token_ids, samples.logprobs):
        rows = tiny_engine.next_token_logprobs("I cannot", variant, [ids[:i] for i in range(len(ids))])
        assert rows.shape == (len(ids), tiny_engine.vocab_size)
        assert abs(sum(rows[i, t] for i, t in enumerate(ids)) - lp) < TOL


def test_same_seed_same_samples_different_seed_different(tiny_engine):
    variant = Variant("t", Decoding(max_new_tokens=6))
    a = tiny_engine.sample("ab", variant, 80, seed=11)
    b = tiny_engine.sample("ab", variant, 80, seed=11)
    c = tiny_engine.sample("ab", variant, 80, seed=12)
    assert a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert a.finished == b.finished
    assert a.token_ids != c.token_ids
