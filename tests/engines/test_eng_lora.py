"""LoRA variants: peft adapters switched on and off without reloading (DESIGN section 3).

Each test builds its own engine (make_tiny_engine): loading an adapter wraps the engine's model
in a PeftModel, which must not leak into the shared tiny engine.
"""

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import InputError
from tailmon.proposals import LoraProposal

TOL = 1e-4  # sampling vs scoring, float32 round-off (see test_eng_consistency.py)


@pytest.fixture
def engine(make_tiny_engine):
    return make_tiny_engine()


def target_variant(**kw):
    return Variant("target", Decoding(max_new_tokens=6, **kw))


@pytest.mark.parametrize("decoding_kw", [{}, {"temperature": 0.7, "top_p": 0.8}, {"top_k": 5}])
def test_lora_sample_logprobs_equal_score_and_adapter_turns_off(engine, lora_adapter, decoding_kw):
    prompt = "ab"
    target = target_variant(**decoding_kw)
    base_samples = engine.sample(prompt, target, 60, seed=1)
    before = engine.score(prompt, target, base_samples.token_ids)  # no adapter ever loaded
    np.testing.assert_allclose(base_samples.logprobs, before, atol=TOL)

    lora = LoraProposal(lora_adapter).variant(target)
    assert lora.adapter == lora_adapter
    samples = engine.sample(prompt, lora, 60, seed=2)
    np.testing.assert_allclose(samples.logprobs, engine.score(prompt, lora, samples.token_ids), atol=TOL)
    # the adapter changes the distribution
    assert np.max(np.abs(engine.score(prompt, lora, base_samples.token_ids) - before)) > 0.1

    # after the LoRA variant was used, the target is the base model again, exactly
    after = engine.score(prompt, target, base_samples.token_ids)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    again = engine.sample(prompt, target, 60, seed=1)
    assert again.token_ids == base_samples.token_ids
    np.testing.assert_allclose(again.logprobs, base_samples.logprobs, rtol=0, atol=1e-6)
    # and the adapter is still there, not reloaded, when asked for again
    np.testing.assert_allclose(engine.score(prompt, lora, samples.token_ids), samples.logprobs, atol=TOL)


def test_adapter_scale(engine, lora_adapter):
    prompt = "I cannot"
    target = target_variant()
    samples = engine.sample(prompt, target, 40, seed=3)
    base = engine.score(prompt, target, samples.token_ids)
    zero = Variant("lora0", target.decoding, adapter=lora_adapter, adapter_scale=0.0)
    half = Variant("lora.5", target.decoding, adapter=lora_adapter, adapter_scale=0.5)
    full = Variant("lora1", target.decoding, adapter=lora_adapter, adapter_scale=1.0)
    s_full = engine.score(prompt, full, samples.token_ids)
    s_zero = engine.score(prompt, zero, samples.token_ids)
    s_half = engine.score(prompt, half, samples.token_ids)
    np.testing.assert_allclose(s_zero, base, rtol=0, atol=1e-6)  # scale 0 is the target
    assert np.max(np.abs(s_half - base)) > 1e-2
    assert np.max(np.abs(s_half - s_full)) > 1e-2
    # switching scales back and forth is stateless
    np.testing.assert_allclose(engine.score(prompt, full, samples.token_ids), s_full, rtol=0, atol=1e-6)
    lora_samples = engine.sample(prompt, half, 40, seed=4)
    np.testing.assert_allclose(lora_samples.logprobs, engine.score(prompt, half, lora_samples.token_ids), atol=TOL)
    np.testing.assert_allclose(engine.score(prompt, target, samples.token_ids), base, rtol=0, atol=1e-6)


def test_lora_next_token_logprobs_switch_too(engine, lora_adapter):
    target = target_variant()
    lora = Variant("lora", target.decoding, adapter=lora_adapter)
    before = engine.next_token_logprobs("ab", target, [[], [7]])
    with_lora = engine.next_token_logprobs("ab", lora, [[], [7]])
    assert np.max(np.abs(with_lora - before)) > 0.05
    np.testing.assert_allclose(engine.next_token_logprobs("ab", target, [[], [7]]), before, rtol=0, atol=1e-6)


def test_missing_adapter_is_an_input_error(engine, tmp_path):
    bad = Variant("lora", target_variant().decoding, adapter=str(tmp_path))
    with pytest.raises(InputError):
        engine.score("ab", bad, [[7]])


def test_an_adapter_rewritten_in_the_same_folder_is_loaded_again(make_tiny_engine, tmp_path):
    """An adaptive monitor whose update was not adopted deletes the candidate's folder and writes
    the next candidate into the same one. The engine must score under the new weights, not the
    ones it loaded from that path before. Catches adapters cached by path alone."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    def write(seed: int, folder):
        base = make_tiny_engine().model  # a fresh tiny model (seeds torch itself: the adapter's seed comes after)
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(str(folder))

    folder = tmp_path / "gen-0001"
    variant = Variant("lora", Decoding(max_new_tokens=3), adapter=str(folder))
    seqs = [[7, 8, 9], [11, 1], [17]]
    write(1, folder)
    engine = make_tiny_engine()
    first = engine.score("ab", variant, seqs)
    shutil.rmtree(folder)
    write(2, folder)
    again = engine.score("ab", variant, seqs)
    fresh = make_tiny_engine().score("ab", variant, seqs)
    np.testing.assert_allclose(again, fresh, atol=1e-6)
    assert np.max(np.abs(again - first)) > 1e-3  # the two adapters differ
    s = engine.sample("ab", variant, 50, seed=3)  # sampling reads the new weights too
    np.testing.assert_allclose(s.logprobs, make_tiny_engine().score("ab", variant, s.token_ids), atol=2e-5)
