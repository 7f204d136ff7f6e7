"""Components that return to the target (`return:K:SPEC`) inside the mixture's one batched decode.

`TransformersEngine.sample_mixture` decodes a returning component's head with the other rows;
after K tokens its open rows switch in place to the target: their KV rows recomputed from the
target's rendered prompt and the K tokens (never the head's cache), their adapter, decoding and
tilt the target's, token t still drawn with uniform column t of the component's seed. So the
component draws the token ids `sample` draws with the same seed (`sample` decodes the head, then
`_continue_from_target`), with log-probs equal to `score` under the returning variant.

Tolerances, as tests/engines/test_eng_mixture.py: LOGPROB_ATOL 1e-5 between the two paths and
against `score` (float32 round-off of other batch shapes is ~1e-6 per response here; a row that
kept the head's cache, positions, temperature, adapter or tilt after K is off by 1e-2 or more,
and almost always draws other tokens, which the token-id equality catches first).
"""

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from exact_weights import assert_draws_follow  # noqa: E402  (tests/ is on sys.path)
from tailmon.engines.base import Decoding, Tilt, Variant
from tailmon.engines.tilt import save_tilt
from tailmon.proposals import parse_proposal

LOGPROB_ATOL = 1e-5
PROMPT = "ab"
M = 6
TARGET = Variant("target", Decoding(temperature=0.9, max_new_tokens=M))

_TILT_DIR = tempfile.mkdtemp(prefix="tailmon-return-tilt-")
# biases on "Sure", "!", "I" and a strong one on the stop token (<|im_end|>, id 1): a tilted head
# often stops before its K tokens, which must end the response there
_TILT = str(save_tilt(Path(_TILT_DIR) / "tilt.json", [7, 17, 11, 1], [3.0, 2.0, -1.5, 2.5]))


def ret(spec: str, target: Variant = TARGET) -> Variant:
    return parse_proposal(spec).variant(target)


def tilted(k: int, target: Variant = TARGET, **kw) -> Variant:
    """A tilted head (top_k 6, its own system prompt) that returns after k tokens."""
    return Variant(f"tilt-return:{k}", Decoding(top_k=6, max_new_tokens=target.decoding.max_new_tokens),
                   tilt=Tilt(_TILT, 1.5), returns_after=k, continuation=target, **kw)


def spying_sample(engine) -> list[str]:
    """Record the variants `engine.sample` is called for (a component outside the batch)."""
    called = []
    sample = engine.sample

    def spy(prompt, variant, n, seed):
        called.append(variant.name)
        return sample(prompt, variant, n, seed)

    engine.sample = spy
    return called


def recording_forwards(engine) -> list[tuple[int, int]]:
    """(rows, positions) of the input of every forward pass of the engine."""
    shapes = []
    forward = engine._forward

    def recorded(input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    engine._forward = recorded
    return shapes


def check_against_sample(engine, variants, counts, seeds):
    """The batched mixture against `sample` per component and against `score`; every component
    inside the batch (no `sample` call). Returns the batched draws."""
    called = spying_sample(engine)
    batched = engine.sample_mixture(PROMPT, variants, counts, seeds)
    assert called == [], f"drawn outside the batch: {called}"
    del engine.sample
    for v, n, s, b in zip(variants, counts, seeds, batched):
        alone = engine.sample(PROMPT, v, n, s)
        assert b.token_ids == alone.token_ids, v.name
        assert b.finished == alone.finished, v.name
        np.testing.assert_allclose(b.logprobs, alone.logprobs, rtol=0, atol=LOGPROB_ATOL, err_msg=v.name)
        for bt, at in zip(b.token_logprobs, alone.token_logprobs):
            np.testing.assert_allclose(bt, at, rtol=0, atol=LOGPROB_ATOL, err_msg=v.name)
        # the weights stay exact: the draw's log-prob is the returning variant's density
        np.testing.assert_allclose(b.logprobs, engine.score(PROMPT, v, b.token_ids), rtol=0, atol=LOGPROB_ATOL,
                                   err_msg=v.name)
    return batched


def lengths(samples) -> list[int]:
    return [len(t) for t in samples.token_ids]


@pytest.mark.parametrize("case", ["same prompt", "system head", "two K", "K >= max_new_tokens"])
def test_returning_components_in_the_batch_draw_what_sample_draws(make_tiny_engine, case):
    """A returning head without a system prompt (its prompt is the target's: one prefill, no
    mask until the switch), with one (prompts of two lengths), two returning components of K 1
    and 4, and K past max_new_tokens (the head draws everything). Batch size 16: a component's
    rows span batches and batches hold several components. Catches a continuation under the
    head's cache or prompt, wrong positions after the switch, the head's temperature kept, a
    wrong uniform column."""
    engine = make_tiny_engine(batch_size=16)
    variants = {"same prompt": [TARGET, ret("return:2:temperature:2")],
                "system head": [TARGET, ret("return:3:system:Sure, here is")],
                "two K": [TARGET, ret("return:1:system:I cannot a b ab"), ret("return:4:temperature:1.6")],
                "K >= max_new_tokens": [TARGET, ret(f"return:{M + 2}:system:Sure, here is"),
                                        ret("return:2:temperature:2")]}[case]
    counts = [9, 14, 11][: len(variants)]
    seeds = [31, 32, 33][: len(variants)]
    batched = check_against_sample(engine, variants, counts, seeds)
    for v, s in zip(variants[1:], batched[1:]):
        k = v.returns_after
        if k < M:  # rows went past K into the target's part
            assert max(lengths(s)) > k, v.name
    assert 0 < sum(sum(s.finished) for s in batched) < sum(counts)


def test_lora_and_tilted_heads_switch_adapter_and_tilt(make_tiny_engine, lora_adapter):
    """A LoRA head (with and without a system prompt) and a tilted head whose stop-token bias
    ends many responses before K: the rows that switch run the base weights and the target's
    untilted decoding after K; the rows that ended before K stay ended. Catches the adapter or
    the tilt left on after the switch, and a head that stopped being continued."""
    engine = make_tiny_engine(batch_size=16)
    variants = [TARGET,
                ret(f"return:2:lora:{lora_adapter}"),
                replace(ret(f"return:3:lora:{lora_adapter}"), name="lora-sys", system_prompt="Sure, here is"),
                tilted(3, system_prompt="I cannot")]
    counts, seeds = [7, 12, 10, 24], [41, 42, 43, 44]
    batched = check_against_sample(engine, variants, counts, seeds)
    tilt_lengths = lengths(batched[3])
    assert min(tilt_lengths) < 3 and max(tilt_lengths) > 3  # stopped before K, and went past it
    assert all(f for n, f in zip(tilt_lengths, batched[3].finished) if n < 3)
    assert max(lengths(batched[1])) > 2 and max(lengths(batched[2])) > 3


def test_a_target_prompt_longer_than_the_batch_widens_the_cache(make_tiny_engine, lora_adapter):
    """The target renders a longer prompt (its system prompt) than every head in the batch, and is
    not itself in it: the switch widens the batch's cache on the left (masked). Catches a target
    prompt cut to the batch's width or written over the rows' padding unmasked."""
    engine = make_tiny_engine(batch_size=64)
    target = Variant("target", Decoding(temperature=0.8, max_new_tokens=M), system_prompt="Sure, here is I cannot a")
    heads = [replace(ret("return:2:temperature:1.7", target), name="short-1", system_prompt=None),
             replace(ret(f"return:1:lora:{lora_adapter}", target), name="short-2", system_prompt="b")]
    assert all(len(engine.rendered(PROMPT, h)) < len(engine.rendered(PROMPT, target)) for h in heads)
    batched = check_against_sample(engine, heads, [13, 11], [51, 52])
    assert max(lengths(batched[0])) > 2 and max(lengths(batched[1])) > 1


@pytest.mark.parametrize("spec", ["return:3:system:Sure, here is", "return:3:temperature:1.7"])
def test_the_returning_component_costs_no_decode_loop_of_its_own(make_tiny_engine, spec):
    """Forward passes of target + a returning component (one batch): one prefill of the distinct
    prompts, one pass per decode step for every row together, and, for a head with its own
    system prompt, one pass of the switched rows' first K - 1 = 2 tokens under the target's
    prompt (reused from the prefill: no prompt is prefilled again); a head that differs from the
    target only in temperature already holds the target's KV rows: no pass at all. The
    per-component path (`batched_return=False`) decodes the component's head and continuation
    in loops of their own. Catches a second decode loop, a target prefill repeated when the
    batch holds it, and a recomputation where none is needed."""
    engine = make_tiny_engine(batch_size=64)
    variants = [TARGET, ret(spec)]
    counts, seeds = [10, 10], [61, 62]
    shapes = recording_forwards(engine)
    batched = engine.sample_mixture(PROMPT, variants, counts, seeds)
    longest = max(len(t) for s in batched for t in s.token_ids)
    prompts = {tuple(engine.rendered(PROMPT, v)) for v in variants}
    assert shapes[0] == (len(prompts), max(map(len, prompts)))  # one prefill of the distinct prompts
    # the rows still open after K = 3 tokens (those that went on)
    switched = sum(len(t) > 3 for t in batched[1].token_ids)
    assert 0 < switched < 10
    recomputed = [(switched, 2)] if len(prompts) == 2 else []  # their first 2 tokens in one pass
    assert [s for s in shapes[1:] if s[1] > 1] == recomputed
    assert [s for s in shapes[1:] if s[1] == 1] == [(20, 1)] * (longest - 1)  # every row in every decode step
    shapes.clear()
    engine.batched_return = False
    alone = engine.sample_mixture(PROMPT, variants, counts, seeds)
    assert [s.token_ids for s in alone] == [s.token_ids for s in batched]
    # the target's loop, the head's (K - 1 steps) and the continuation's: more passes, and narrower
    assert len(shapes) >= 1 + 1 + longest - 1 + 3
    assert max(rows for rows, _ in shapes) <= 10


N = 20000


def test_continuation_frequencies_inside_the_batch_match_the_exact_distribution(make_tiny_engine, lora_adapter,
                                                                               enumerate_all):
    """N draws of each returning component (system head at T 1.8 K=1, LoRA head K=1, tilted head K=2;
    max_new_tokens 3) in one batched decode with the target, against each component's exact
    distribution by enumeration (the head's next-token distributions for the first K tokens,
    the target's own after them: `next_token_logprobs` of the returning variant): chi-square
    p > 1e-3 per component (a correct sampler fails with probability < 1e-3 per component, never
    at this fixed seed); an error of 1% of the mass on a few responses gives p ~ 0 at N = 20000
    (test_eng_distribution.py's power check). Catches a continuation drawn from anything but the
    target's conditional given the head's tokens."""
    engine = make_tiny_engine(batch_size=3000)
    target = Variant("target", Decoding(temperature=0.9, max_new_tokens=3))
    components = [(target, 301),
                  # a hot head: a continuation left at its temperature is far from the target's
                  (replace(ret("return:1:system:Sure, here is", target),
                           decoding=Decoding(temperature=1.8, max_new_tokens=3)), 302),
                  (ret(f"return:1:lora:{lora_adapter}", target), 303),
                  (tilted(2, target), 304)]
    variants = [v for v, _ in components]
    called = spying_sample(engine)
    draws = engine.sample_mixture(PROMPT, variants, [N] * len(variants), [s for _, s in components])
    assert called == []
    for v, samples in zip(variants, draws):
        assert_draws_follow(engine, PROMPT, v, samples, enumerate_all, LOGPROB_ATOL)
