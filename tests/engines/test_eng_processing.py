"""`processed_logprobs` (temperature, then top-k, then top-p, renormalised) and Decoding checks."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tailmon.engines.base import Decoding
from tailmon.engines.processing import processed_logprobs
from tailmon.errors import InputError


def random_logits(seed, rows=64, vocab=50, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def test_temperature_only_is_scaled_log_softmax():
    logits = random_logits(0)
    for t in [0.3, 0.7, 1.0, 2.5]:
        out = processed_logprobs(logits, Decoding(temperature=t))
        torch.testing.assert_close(out, torch.log_softmax(logits / t, dim=-1), rtol=0, atol=1e-6)


def test_top_k_keeps_exactly_the_k_largest():
    logits = random_logits(1)  # continuous values: no ties
    for k in [1, 3, 10, 49]:
        out = processed_logprobs(logits, Decoding(top_k=k))
        kept = torch.isfinite(out)
        assert (kept.sum(dim=1) == k).all()
        top = torch.topk(logits, k, dim=1).indices
        expected = torch.zeros_like(kept).scatter(1, top, True)
        assert torch.equal(kept, expected)
        torch.testing.assert_close(torch.logsumexp(out, dim=1), torch.zeros(len(logits)), rtol=0, atol=1e-5)
        # renormalised softmax of the kept logits
        ref = torch.log_softmax(logits.masked_fill(~kept, float("-inf")), dim=1)
        torch.testing.assert_close(out[kept], ref[kept], rtol=0, atol=1e-5)
    # k >= vocab and k = 0 keep everything
    for k in [0, 50, 80]:
        assert torch.isfinite(processed_logprobs(logits, Decoding(top_k=k))).all()


def test_top_p_keeps_smallest_prefix_reaching_the_mass():
    logits = random_logits(2)
    for top_p in [0.05, 0.3, 0.8, 0.95]:
        out = processed_logprobs(logits, Decoding(top_p=top_p))
        probs = torch.softmax(logits.double(), dim=1)
        for i in range(len(logits)):
            order = torch.argsort(probs[i], descending=True)
            cum = torch.cumsum(probs[i][order], 0)
            n_keep = int((cum < top_p).sum()) + 1  # smallest prefix whose mass reaches top_p
            kept = torch.isfinite(out[i])
            assert int(kept.sum()) == n_keep
            assert kept[order[:n_keep]].all()
        torch.testing.assert_close(torch.logsumexp(out, dim=1), torch.zeros(len(logits)), rtol=0, atol=1e-5)


def test_a_dominant_token_is_always_kept():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    out = processed_logprobs(logits, Decoding(top_p=0.01))
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]
    assert float(out[0, 0]) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 0.9), (0.7, 0, 0.8), (1.3, 5, 1.0), (0.5, 10, 0.9), (2.0, 3, 0.5), (0.8, 20, 0.99),
])
def test_matches_transformers_warpers(temperature, top_k, top_p):
    """Same kept sets and same renormalised log-probs as transformers' warpers applied in the
    order temperature -> top-k -> top-p (the order of its generate())."""
    logits = random_logits(3, rows=128, vocab=100)
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = torch.log_softmax(scores, dim=-1)
    out = processed_logprobs(logits, Decoding(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    kept = torch.isfinite(ref)
    torch.testing.assert_close(out[kept], ref[kept], rtol=0, atol=1e-5)


def test_computed_in_float32_from_low_precision_logits():
    logits = random_logits(4).to(torch.bfloat16)
    out = processed_logprobs(logits, Decoding(temperature=0.7))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.log_softmax(logits.float() / 0.7, dim=-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0}, {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_p": 0}, {"top_p": 1.5}, {"top_p": -0.1},
    {"top_k": -1}, {"top_k": 2.5},
    {"max_new_tokens": 0}, {"max_new_tokens": -3}, {"max_new_tokens": 1.5},
])
def test_decoding_validation(kwargs):
    with pytest.raises(InputError):
        Decoding(**kwargs)


def test_decoding_truncation_flags():
    assert not Decoding().truncates
    assert Decoding(top_p=0.9).truncates and Decoding(top_k=5).truncates
    d = Decoding(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=7).untruncated()
    assert (d.temperature, d.top_p, d.top_k, d.max_new_tokens) == (0.7, 1.0, 0, 7)
