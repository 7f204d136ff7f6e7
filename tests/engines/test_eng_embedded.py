"""The embedded SmolLM2-135M-Instruct: sampling log-probs equal teacher-forced scores.

Cost: one model load (~1 s) shared by the session; each test draws at most 4 responses of at
most 16 tokens (a prefill and <= 15 cached steps of batch 4) and scores them in one padded
forward pass: measured 2.5-5 s per test, 13 s for the three, on one thread of a shared 2-core
machine. Skipped when the model is not in the cache.
The 1e-4 bound is float32 round-off over <= 16 tokens of a 49k-token vocabulary (measured
differences ~2e-5); a wrong processed distribution is off by far more.
"""

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant

pytestmark = pytest.mark.embedded

PROMPT = "Write one sentence about bread."


@pytest.mark.parametrize("decoding", [
    Decoding(temperature=1.0, max_new_tokens=16),
    Decoding(temperature=0.7, top_p=0.9, max_new_tokens=16),
])
def test_embedded_sample_logprobs_equal_score(embedded_engine, decoding):
    variant = Variant("target", decoding)
    samples = embedded_engine.sample(PROMPT, variant, 4, seed=0)
    assert len(samples) == 4
    assert all(1 <= len(ids) <= 16 for ids in samples.token_ids)
    scored = embedded_engine.score(PROMPT, variant, samples.token_ids)
    np.testing.assert_allclose(samples.logprobs, scored, rtol=0, atol=1e-4)
    assert all(isinstance(embedded_engine.decode(ids), str) for ids in samples.token_ids)


def test_embedded_system_prompt_variant(embedded_engine):
    """A system-prompt variant renders another prompt and is scored consistently."""
    target = Variant("target", Decoding(max_new_tokens=8))
    variant = Variant("system", Decoding(max_new_tokens=8), system_prompt="Always answer in French.")
    assert embedded_engine.prompt_ids(PROMPT, None) != embedded_engine.prompt_ids(PROMPT, variant.system_prompt)
    samples = embedded_engine.sample(PROMPT, variant, 2, seed=1)
    np.testing.assert_allclose(samples.logprobs, embedded_engine.score(PROMPT, variant, samples.token_ids), atol=1e-4)
    assert np.max(np.abs(embedded_engine.score(PROMPT, target, samples.token_ids) - samples.logprobs)) > 1e-2


def test_embedded_returning_variant(embedded_engine):
    """`return:4:system:...` on the real model: the first 4 tokens under the system prompt, the
    rest from the target with its own prompt; the sampling log-prob equals the score and equals
    q(y_1..4) + p(y) - p(y_1..4) by teacher forcing under the plain variants. Catches a
    continuation drawn or scored under the head's prompt on a real chat template."""
    from tailmon.proposals import parse_proposal

    target = Variant("target", Decoding(temperature=0.7, max_new_tokens=12))
    variant = parse_proposal("return:4:system:Always answer in French.").variant(target)
    samples = embedded_engine.sample(PROMPT, variant, 3, seed=2)
    assert any(len(ids) > 4 for ids in samples.token_ids)
    np.testing.assert_allclose(samples.logprobs, embedded_engine.score(PROMPT, variant, samples.token_ids), atol=1e-4)
    head = Variant("head", target.decoding, system_prompt="Always answer in French.")
    cut = [ids[:4] for ids in samples.token_ids]
    exact = (embedded_engine.score(PROMPT, head, cut) + embedded_engine.score(PROMPT, target, samples.token_ids)
             - embedded_engine.score(PROMPT, target, cut))
    np.testing.assert_allclose(samples.logprobs, exact, atol=1e-4)
