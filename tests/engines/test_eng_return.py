"""Components that return to the target (`return:K:SPEC`) on the tiny model: their density, their
sampling log-probs, the continuation's distribution and the weights a mixture of them gives.

Every exact value here is computed by teacher forcing under *plain* variants (the inner proposal
and the target, each drawing every token), never through the returning variant's own code path:
    q_ret(y) = q(y_1..K) * p(y_K+1.. | y_1..K),
    p(y_K+1.. | y_1..K) = p(y) / p(y_1..K)   (both scored under the target).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import chi2

from stub_engine import StubEngine  # noqa: E402  (tests/ is on sys.path)
from tailmon.engines.base import Decoding, Samples, Variant
from tailmon.errors import InputError
from tailmon.judges import parse_judge
from tailmon.proposals import parse_proposal
from tailmon.proposals.sampling import draw, weight_horizon

PROMPT = "ab"
TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=3))
JUDGE = parse_judge("prefix:a")


def returning(spec: str, target: Variant = TARGET) -> Variant:
    return parse_proposal(spec).variant(target)


def plain_head(variant: Variant) -> Variant:
    """The inner proposal as a plain variant drawing every token (max_new_tokens as the target's)."""
    return Variant(variant.name + " (plain)", variant.decoding, variant.system_prompt, variant.adapter,
                   variant.adapter_scale, variant.steering)


def exact_returning_logprob(engine, variant: Variant, seqs) -> np.ndarray:
    """log q(y_1..K) + log p(y) - log p(y_1..K), each by teacher forcing under a plain variant."""
    k = variant.returns_after
    head = engine.score(PROMPT, plain_head(variant), [s[:k] for s in seqs])
    target = variant.continuation
    return head + engine.score(PROMPT, target, seqs) - engine.score(PROMPT, target, [s[:k] for s in seqs])


@pytest.mark.parametrize("spec", ["return:1:system:Sure, here is", "return:2:temperature:1.8", "return:3:system:I cannot"])
def test_density_is_the_head_then_the_target(tiny_engine, enumerate_all, spec):
    """The returning variant's score is q(y_1..K) p(y_K+1.. | y_1..K), and its next-token
    distributions (used by exact enumerations) are the same density. Catches scoring the tail
    under the proposal (or its system prompt), or the head under the target, and an off-by-one in K."""
    variant = returning(spec)
    seqs, logp = enumerate_all(tiny_engine, PROMPT, variant)
    assert math.fsum(np.exp(logp)) == pytest.approx(1.0, abs=1e-5)  # a distribution over whole responses
    expected = exact_returning_logprob(tiny_engine, variant, seqs)
    np.testing.assert_allclose(tiny_engine.score(PROMPT, variant, seqs), expected, atol=2e-5)
    np.testing.assert_allclose(logp, expected, atol=2e-5)
    if variant.returns_after < TARGET.decoding.max_new_tokens:  # the return changes the density
        assert np.max(np.abs(expected - tiny_engine.score(PROMPT, plain_head(variant), seqs))) > 0.1


@pytest.mark.parametrize("spec", ["return:1:system:Sure, here is", "return:2:temperature:1.8"])
def test_sampling_logprobs_equal_scoring_logprobs(tiny_engine, spec):
    """The log-prob a sample is drawn with is the one scoring gives it, per token too (the first K
    tokens' sum is what `draw` uses for a mixture of returning components). Catches a sampler that
    reports the head's log-prob only, or draws the continuation from another distribution than it scores."""
    variant = returning(spec)
    s = tiny_engine.sample(PROMPT, variant, 200, seed=3)
    np.testing.assert_allclose(s.logprobs, tiny_engine.score(PROMPT, variant, s.token_ids), atol=2e-5)
    np.testing.assert_allclose(s.logprobs, exact_returning_logprob(tiny_engine, variant, s.token_ids), atol=2e-5)
    assert [len(t) for t in s.token_logprobs] == [len(t) for t in s.token_ids]
    np.testing.assert_allclose([t.sum() for t in s.token_logprobs], s.logprobs, atol=1e-9)
    assert max(len(t) for t in s.token_ids) == 3  # some responses ran past K into the target's part
    # reproducible for a seed
    again = tiny_engine.sample(PROMPT, variant, 200, seed=3)
    assert again.token_ids == s.token_ids


def _conditional_chi_square(engine, variant: Variant, n: int, seed: int):
    """Pooled chi-square of the token after the first K, given the first K, against the target's
    conditional p(. | x, y_1..K) (its own prompt), over the prefixes that were continued.

    For each continued prefix the counts of the next token are multinomial with the target's
    probabilities; cells with expected count < 5 are pooled into one per prefix (dropped if that
    is still < 5), and prefixes with fewer than 30 continuations are left out. Each prefix adds
    (its cells - 1) degrees of freedom; the sum is chi-square with their total under the null."""
    k = variant.returns_after
    s = engine.sample(PROMPT, variant, n, seed)
    by_prefix: dict[tuple, Counter] = {}
    for ids in s.token_ids:
        if len(ids) > k:
            by_prefix.setdefault(tuple(ids[:k]), Counter())[ids[k]] += 1
    prefixes = [p for p, c in by_prefix.items() if sum(c.values()) >= 30]
    probs = np.exp(engine.next_token_logprobs(PROMPT, variant.continuation, [list(p) for p in prefixes]))
    stat, df = 0.0, 0
    for prefix, p in zip(prefixes, probs):
        counts = by_prefix[prefix]
        m = sum(counts.values())
        expected = m * p
        big = expected >= 5
        observed = np.array([counts.get(t, 0) for t in range(len(p))], dtype=float)
        cells_o = list(observed[big]) + [observed[~big].sum()]
        cells_e = list(expected[big]) + [expected[~big].sum()]
        if cells_e[-1] < 5:
            cells_o, cells_e = cells_o[:-1], cells_e[:-1]
            # the dropped cell's mass is left out of both sides; rescale the kept ones to m
            cells_e = list(np.array(cells_e) * sum(cells_o) / sum(cells_e))
        o, e = np.array(cells_o), np.array(cells_e)
        stat += float(((o - e) ** 2 / e).sum())
        df += len(o) - 1
    return stat, df, len(prefixes)


# False-alarm rate 1e-3 per check: chi-square quantile at 1 - 1e-3 for the realised degrees of
# freedom. 6000 samples give each of the main first tokens hundreds of continuations, enough power
# to see a continuation conditioned on the proposal's system prompt (checked: with the head's prompt
# in the continuation's prefill the statistic is in the thousands).
ALPHA = 1e-3
N_CHI = 6000


@pytest.mark.parametrize("spec", ["return:1:system:Sure, here is", "return:1:temperature:2.5"])
def test_continuation_follows_the_targets_conditional(tiny_engine, spec):
    """The tokens after K are drawn from p(. | x, y_1..K) with the target's own prompt and
    decoding. Catches a continuation that reuses the head's cache (its system prompt) or its
    temperature."""
    variant = returning(spec)
    stat, df, prefixes = _conditional_chi_square(tiny_engine, variant, N_CHI, seed=11)
    assert prefixes >= 3 and df >= 10
    assert stat < chi2.ppf(1 - ALPHA, df), (stat, df)


def test_continuation_after_an_adapter_uses_the_target_weights(make_tiny_engine, lora_adapter):
    """A LoRA head's continuation runs without the adapter. Catches a continuation drawn while the
    adapter is still switched on."""
    engine = make_tiny_engine()
    variant = returning(f"return:1:lora:{lora_adapter}")
    stat, df, prefixes = _conditional_chi_square(engine, variant, N_CHI, seed=12)
    assert prefixes >= 3 and df >= 10
    assert stat < chi2.ppf(1 - ALPHA, df), (stat, df)
    s = engine.sample(PROMPT, variant, 100, seed=1)
    np.testing.assert_allclose(s.logprobs, exact_returning_logprob(engine, variant, s.token_ids), atol=2e-5)


# --- weights of a mixture ------------------------------------------------------------------

def _exact_log_w(engine, draw_result, variants, shares, horizon):
    """log w = log p(y_1..M) - log sum_j a_j q_j(y_1..M) with q_j(y_1..M) = q_j(y_1..K_j) p(y_K_j+1..M | y_1..K_j),
    every factor by teacher forcing under plain variants."""
    seqs = [ids[:horizon] for ids in draw_result.ids]
    log_p = engine.score(PROMPT, variants[0], seqs)
    cols = [log_p]
    for v in variants[1:]:
        k = v.returns_after
        cols.append(engine.score(PROMPT, plain_head(v), [s[:k] for s in seqs]) + log_p
                    - engine.score(PROMPT, variants[0], [s[:k] for s in seqs]))
    a = np.asarray(shares)
    return log_p - logsumexp(np.stack(cols, axis=1) + np.log(a), axis=1)


def test_weight_of_a_returning_sample_is_the_ratio_over_its_first_k_tokens(tiny_engine):
    """One returning component (K = 1) with the target: w = p(y_1)/(a0 p(y_1) + a1 q(y_1)), whatever
    the later tokens. Catches weights computed over the whole response with the proposal's density
    for the tokens after K (they would vary with tokens the target drew)."""
    target = Variant("target", Decoding(temperature=0.7, max_new_tokens=4))
    variants = [target, returning("return:1:system:Sure, here is", target)]
    d = draw(tiny_engine, PROMPT, variants, [0.2, 0.8], 300, seed=lambda j: 100 + j, judge=JUDGE)
    assert d.horizon == 1
    np.testing.assert_allclose(d.log_w, _exact_log_w(tiny_engine, d, variants, d.shares, 1), atol=2e-5)
    # the same first token, the same weight: nothing after K enters it
    by_first: dict[int, set] = {}
    for ids, lw in zip(d.ids, d.log_w):
        by_first.setdefault(ids[0], set()).add(round(float(lw), 4))
    assert all(len(v) == 1 for v in by_first.values())
    assert max(len(i) for i in d.ids) == 4


def test_components_with_different_k_need_tokens_up_to_the_largest(tiny_engine):
    """K = 1 and K = 2 together: the horizon is 2 (the largest K), and the weights equal the exact
    ratio over two tokens. Catches a horizon at the smallest K (which would drop the K = 2
    component's second-token factor q(y_2|y_1)/p(y_2|y_1))."""
    target = Variant("target", Decoding(temperature=0.7, max_new_tokens=4))
    variants = [target, returning("return:1:temperature:2", target), returning("return:2:system:I cannot", target)]
    shares = [0.1, 0.45, 0.45]
    d = draw(tiny_engine, PROMPT, variants, shares, 300, seed=lambda j: 200 + j, judge=JUDGE)
    assert d.horizon == 2 == weight_horizon(variants, [0, 1, 2])
    exact = _exact_log_w(tiny_engine, d, variants, d.shares, 2)
    np.testing.assert_allclose(d.log_w, exact, atol=2e-5)
    assert np.max(np.abs(exact - _exact_log_w(tiny_engine, d, variants, d.shares, 1))) > 0.05


class _Recording:
    """An engine wrapper that records the length of every response it is asked to score."""

    def __init__(self, engine):
        self._engine = engine
        self.scored: list[int] = []

    def score(self, prompt, variant, responses):
        self.scored += [len(r) for r in responses]
        return self._engine.score(prompt, variant, responses)

    def score_many(self, prompt, variants, responses, need=None):
        self.scored += [len(r) for r in responses]
        return self._engine.score_many(prompt, variants, responses, need)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_scoring_reads_only_the_first_tokens_when_every_component_returns(tiny_engine):
    """With every component returning (K <= 2) nothing past token 2 is scored; a full-length
    component in the mixture brings whole responses back (its density needs every token).
    Catches scoring whole responses when it is not needed, and truncating when it is not allowed."""
    target = Variant("target", Decoding(temperature=0.7, max_new_tokens=5))
    returning_only = [target, returning("return:2:system:Sure, here is", target), returning("return:1:temperature:2", target)]
    rec = _Recording(tiny_engine)
    d = draw(rec, PROMPT, returning_only, [0.1, 0.45, 0.45], 120, seed=lambda j: j, judge=JUDGE)
    assert rec.scored and max(rec.scored) <= 2 and max(len(i) for i in d.ids) == 5
    mixed = returning_only + [parse_proposal("system:I cannot").variant(target)]
    rec = _Recording(tiny_engine)
    d = draw(rec, PROMPT, mixed, [0.1, 0.3, 0.3, 0.3], 120, seed=lambda j: j, judge=JUDGE)
    assert d.horizon is None and max(rec.scored) == 5
    full = [tiny_engine.score(PROMPT, v, d.ids) for v in mixed]
    np.testing.assert_allclose(d.log_w, np.asarray(full[0]) - logsumexp(np.stack(full, 1) + np.log(d.shares), 1),
                               atol=2e-5)


def test_horizon_rules():
    """No horizon when the target itself is scored alone, or a component returns to another variant."""
    other = Variant("other", Decoding(temperature=0.5, max_new_tokens=3))
    r = returning("return:2:temperature:2")
    assert weight_horizon([TARGET, r], [0, 1]) == 2
    assert weight_horizon([TARGET, r], [0]) is None  # share 0 and not scored: only the target is
    assert weight_horizon([TARGET, returning("return:2:temperature:2", other)], [0, 1]) is None


# --- engines that cannot return ------------------------------------------------------------

class _Plain(StubEngine):
    name = "plain"

    def __init__(self):
        self.sampled = 0

    def sample(self, prompt, variant, n, seed):
        self.sampled += n
        return super().sample(prompt, variant, n, seed)


def test_an_engine_that_cannot_return_refuses_before_drawing_anything():
    """An engine without the ability is never asked to draw a returning component as if it drew
    every token. Catches a silent full-length draw."""
    engine = _Plain()
    assert not engine.returns_to_target
    with pytest.raises(InputError, match="returns to the target after 2 tokens.*plain engine cannot"):
        draw(engine, PROMPT, [TARGET, returning("return:2:temperature:2")], [0.5, 0.5], 10, seed=lambda j: j,
             judge=JUDGE)
    assert engine.sampled == 0


def test_variant_validation():
    with pytest.raises(InputError, match="go together"):
        Variant("x", returns_after=2)
    with pytest.raises(InputError, match="integer >= 1"):
        Variant("x", returns_after=0, continuation=TARGET)
    with pytest.raises(InputError, match="max_new_tokens"):
        Variant("x", Decoding(max_new_tokens=5), returns_after=1, continuation=TARGET)
    r = returning("return:5:temperature:2")  # K beyond max_new_tokens: the head draws everything
    assert r.head.decoding.max_new_tokens == 3 and not r.head.returns


class _NoTokenLogprobs(_Recording):
    """An engine that returns to the target but gives no per-token log-probs with its samples."""

    def sample(self, prompt, variant, n, seed):
        s = self._engine.sample(prompt, variant, n, seed)
        return Samples(s.token_ids, s.logprobs, s.finished)


def test_without_per_token_logprobs_the_first_tokens_are_scored_under_their_own_component(tiny_engine):
    """`draw` needs each sample's own log-prob over the first M tokens; without per-token
    log-probs from the sampler it scores them. Catches the whole-response sampling log-prob used
    against the others' first-M ones."""
    target = Variant("target", Decoding(temperature=0.7, max_new_tokens=4))
    variants = [target, returning("return:1:system:Sure, here is", target), returning("return:2:temperature:2", target)]
    shares = [0.2, 0.4, 0.4]
    with_tokens = draw(tiny_engine, PROMPT, variants, shares, 90, seed=lambda j: 7 + j, judge=JUDGE)
    rec = _NoTokenLogprobs(tiny_engine)
    without = draw(rec, PROMPT, variants, shares, 90, seed=lambda j: 7 + j, judge=JUDGE)
    assert without.ids == with_tokens.ids and without.horizon == 2 and max(rec.scored) <= 2
    np.testing.assert_allclose(without.log_w, with_tokens.log_w, atol=2e-5)
