"""The tiny model fixture itself: the properties the other tests rely on."""

import numpy as np

from tailmon.engines.base import Decoding, Variant


def test_decode_is_concatenation_of_token_texts(tiny_engine, tiny_tokenizer):
    vocab = tiny_tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokenizer))))
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(vocab), size=rng.integers(1, 8)).tolist()
        raw = tiny_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert raw == "".join(vocab[i] for i in ids)
        # the engine drops only the stop token
        assert tiny_engine.decode(ids) == "".join(vocab[i] for i in ids if i not in tiny_engine.stop_token_ids)
    assert [tiny_engine.token_text(t) for t in range(len(vocab)) if t not in tiny_engine.stop_token_ids] == [
        v for t, v in enumerate(vocab) if t not in tiny_engine.stop_token_ids
    ]


def test_prompt_rendering_round_trips(tiny_engine, tiny_tokenizer):
    ids = tiny_engine.prompt_ids("ab, here is cannot no", "Sure")
    text = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nSure<|im_end|>\n<|im_start|>user\nab, here is cannot no<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tiny_tokenizer.unk_token_id not in tiny_engine.prompt_ids("Sure, here is", None)


def test_stop_token_and_vocab(tiny_engine):
    assert tiny_engine.stop_token_ids == frozenset({1})
    assert tiny_engine.vocab_size == 18


def test_distributions_are_peaked_but_full(tiny_engine):
    """Every token keeps some mass (so chi-square tests see every sequence), none dominates, and
    EOS is likely enough that responses end."""
    v = Variant("t", Decoding())
    for prompt in ["ab", "Sure, here is", "I cannot"]:
        p = np.exp(tiny_engine.next_token_logprobs(prompt, v, [[], [7], [14], [7, 8]]))
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
        assert p.min() > 1e-5
        assert p.max() < 0.9
    p_eos = np.exp(tiny_engine.next_token_logprobs("ab", v, [[], [7], [7, 8]]))[:, 1]
    assert p_eos.max() > 0.05
