"""`exact.prefix_probability` against brute-force enumeration of every response.

Brute force: enumerate all responses of the variant (stop tokens end them, max_new_tokens cuts
them), decode each as the `prefix:` judge sees it, and add up the probabilities of those whose
text starts with TEXT. Both sides use the engine's processed log-probs, but computed in
different batches: float32 logits depend slightly on the batch's padding and composition
(~1e-7 relative per token), so over <= 3 tokens the two sums agree to a relative 1e-5, while a
missed or double-counted tokenisation changes them by far more (>= 1e-3 here).
"""

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.engines.exact import prefix_probability
from tailmon.errors import InputError

REL = 1e-5

PREFIXES = [
    "Sure",        # one token
    "a",           # "a" or "ab"
    "ab",          # "ab", or "a" + "b": two tokenisations
    "ab!",         # "ab" + "!" or "a" + "b" + "!" (3 tokens)
    "abab",        # "ab""ab", "a""b""ab", "ab""a""b" (3 tokens); "a""b""a""b" needs 4
    " here is",    # two tokens
    "<|im_start|>user",  # a special (non-stop) token's text is part of the response text
    "Sur",         # a proper prefix of a token's text
    "zzz",         # impossible
]


def brute_force(engine, enumerate_all, prompt, variant, text):
    seqs, logp = enumerate_all(engine, prompt, variant)
    hit = np.array([engine.decode(s).startswith(text) for s in seqs])
    return float(np.exp(logp[hit]).sum()) if hit.any() else 0.0


# (decoding, the prefixes with a positive probability under it)
DECODINGS = [
    (Decoding(temperature=1.0, max_new_tokens=3), set(PREFIXES) - {"zzz"}),
    # top-p removes the rarer tokens: "ab!", "abab", " here is", ... become impossible
    (Decoding(temperature=1.0, top_p=0.95, max_new_tokens=3), {"Sure", "a", "ab", "Sur"}),
]


@pytest.mark.parametrize("decoding, positive", DECODINGS)
def test_prefix_probability_equals_enumeration(tiny_engine, enumerate_all, decoding, positive):
    variant = Variant("v", decoding)
    seqs, logp = enumerate_all(tiny_engine, "ab", variant)
    texts = [tiny_engine.decode(s) for s in seqs]
    probs = np.exp(logp)
    assert abs(probs.sum() - 1) < 1e-6
    for text in PREFIXES:
        hit = np.array([t.startswith(text) for t in texts])
        expected = float(probs[hit].sum())
        got = prefix_probability(tiny_engine, "ab", variant, text)
        assert got == pytest.approx(expected, rel=REL, abs=1e-15), text
        assert (got > 0) == (text in positive), text


def test_several_tokenisations_are_all_counted(tiny_engine, enumerate_all):
    variant = Variant("v", Decoding(max_new_tokens=2))
    a, b, ab = tiny_engine.tokenizer.convert_tokens_to_ids(["a", "b", "ab"])
    lp = tiny_engine.next_token_logprobs("I cannot", variant, [[], [a]])
    direct = np.exp(lp[0, ab])           # the "ab" token
    split = np.exp(lp[0, a] + lp[1, b])  # "a" then "b"
    assert direct > 1e-4 and split > 1e-4
    got = prefix_probability(tiny_engine, "I cannot", variant, "ab")
    assert got == pytest.approx(direct + split, rel=REL)
    assert got == pytest.approx(brute_force(tiny_engine, enumerate_all, "I cannot", variant, "ab"), rel=REL)


def test_respects_max_new_tokens(tiny_engine, enumerate_all):
    prompt = "Sure, here is"
    one = Variant("v", Decoding(max_new_tokens=1))
    two = Variant("v", Decoding(max_new_tokens=2))
    three = Variant("v", Decoding(max_new_tokens=3))
    lp = tiny_engine.next_token_logprobs(prompt, one, [[]])[0]
    ab = tiny_engine.tokenizer.convert_tokens_to_ids("ab")
    # with one token, "ab" can only be the "ab" token
    assert prefix_probability(tiny_engine, prompt, one, "ab") == pytest.approx(np.exp(lp[ab]), rel=REL)
    assert prefix_probability(tiny_engine, prompt, two, "ab") > prefix_probability(tiny_engine, prompt, one, "ab")
    # " here is" needs two tokens; "abab" needs at least two
    assert prefix_probability(tiny_engine, prompt, one, " here is") == 0.0
    assert prefix_probability(tiny_engine, prompt, one, "abab") == 0.0
    for variant in (two, three):
        for text in ["abab", " here is", "ab"]:
            assert prefix_probability(tiny_engine, prompt, variant, text) == pytest.approx(
                brute_force(tiny_engine, enumerate_all, prompt, variant, text), rel=REL, abs=1e-15)


def test_system_prompt_variant_and_empty_prefix(tiny_engine, enumerate_all):
    variant = Variant("v", Decoding(max_new_tokens=2), system_prompt="I cannot")
    assert prefix_probability(tiny_engine, "ab", variant, "a") == pytest.approx(
        brute_force(tiny_engine, enumerate_all, "ab", variant, "a"), rel=REL)
    with pytest.raises(InputError):
        prefix_probability(tiny_engine, "ab", variant, "")
