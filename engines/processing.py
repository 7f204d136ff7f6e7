"""The processed next-token distribution, shared by sampling and scoring.

One function turns logits into the log-probs the deployed sampler actually draws from:
temperature first, then top-k, then top-p (nucleus), each followed by renormalisation; the order
and tie rules of transformers' and vLLM's samplers. Computed in float32 (never bf16: its
log-softmax is off by up to ~1e-2 per token, which ruins weights over a long response).
"""

from __future__ import annotations

import torch

from tailmon.engines.base import Decoding


def processed_logprobs(logits: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """Log-probs over the last dimension; -inf for tokens the truncation removed."""
    logp = torch.log_softmax(logits.float() / decoding.temperature, dim=-1)
    vocab = logp.shape[-1]
    if 0 < decoding.top_k < vocab:
        kth = torch.topk(logp, decoding.top_k, dim=-1).values[..., -1:]
        # Ties with the k-th value are kept, as transformers' TopKLogitsWarper does.
        logp = torch.log_softmax(logp.masked_fill(logp < kth, float("-inf")), dim=-1)
    if decoding.top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        probs = sorted_logp.exp()
        # A token stays when the mass strictly before it is below top_p: the smallest prefix of
        # the sorted vocabulary whose mass reaches top_p, and never fewer than one token.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= decoding.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def tilted_logprobs(logp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A token tilt (`tailmon.engines.tilt`) applied to processed log-probs: logp + bias,
    renormalised over the last dimension. Tokens the truncation removed stay at -inf, so the
    tilted distribution has the target's own support. Float32, as `processed_logprobs`."""
    if bias is None:
        return logp
    return torch.log_softmax(logp + bias.to(device=logp.device, dtype=logp.dtype), dim=-1)
