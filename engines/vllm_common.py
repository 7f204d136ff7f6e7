"""What the two engines over vLLM share: the in-process one (`tailmon.engines.vllm`) and the one
over OpenAI-compatible vLLM servers (`tailmon.engines.openai`).

Seeds of vLLM requests, the stop tokens of a model's generation_config, and vLLM's sampler's
processed log-probs written out in torch. Nothing here imports vLLM: the openai engine runs where
vLLM is not installed.
"""

from __future__ import annotations

import torch

from tailmon.engines.base import Decoding

# Seeds of the samples of one draw are SEED_STRIDE * seed + (sample index): distinct draws get
# disjoint seed ranges as long as n < SEED_STRIDE.
SEED_STRIDE = 1_000_003


def vllm_request_seed(seed: int, start: int) -> int:
    """The seed of a vLLM request for samples start, start+1, ... of a draw seeded `seed`.

    vLLM gives the j-th of a request's n samples the seed `request seed + j`
    (vllm/v1/engine/parallel_sampling.py), so requests seeded seed, seed+1, ... would repeat each
    other's samples shifted by one. Offsetting each request by its first sample's index makes
    every sample of the draw get a seed of its own: stride * seed + index.
    """
    return (int(seed) * SEED_STRIDE + int(start)) % 2**62  # + j stays inside a signed 64-bit seed


def generation_eos(path) -> list[int]:
    """EOS ids of the model's generation_config (as TransformersEngine adds them), when it has one."""
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def vllm_style_processed_logprobs(raw: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """`tailmon.engines.vllm.vllm_processed_logprobs` without vLLM installed (for the
    OpenAI-compatible engine, whose servers sample with vLLM's torch top-k/top-p): the same
    operations written out after vLLM 0.32's `apply_top_k_top_p_pytorch` and `apply_top_k_only`
    (checked equal, bit for bit, by tests/vllm_engines/test_vllm_engine.py where vLLM is
    installed): temperature; top-k keeps every token whose value is >= the k-th largest (ties
    kept); top-p sorts ascending, sums the probabilities in that order and drops the tokens whose
    cumulative mass is <= 1 - p (never the largest); log_softmax in float32."""
    logits = raw.float() / decoding.temperature
    vocab = logits.shape[-1]
    k = decoding.top_k if 0 < decoding.top_k < vocab else 0
    if decoding.top_p >= 1.0:
        if k:
            kth = logits.topk(k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.log_softmax(dim=-1, dtype=torch.float32)
    logits_sort, order = logits.sort(dim=-1, descending=False)
    if k:
        kth = logits_sort[..., vocab - k: vocab - k + 1]
        logits_sort = logits_sort.masked_fill(logits_sort < kth, float("-inf"))
    cumulative = torch.cumsum(logits_sort.softmax(dim=-1), dim=-1)
    drop = cumulative <= 1 - torch.tensor(decoding.top_p, dtype=torch.float32)
    drop[..., -1] = False
    logits_sort = logits_sort.masked_fill(drop, float("-inf"))
    logits = torch.empty_like(logits).scatter_(-1, order, logits_sort)
    return logits.log_softmax(dim=-1, dtype=torch.float32)
