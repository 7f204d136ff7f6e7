"""What the two engines over vLLM share: the in-process one (`tailmon.engines.vllm`) and the one
over OpenAI-compatible vLLM servers (`tailmon.engines.openai`).

Seeds of vLLM requests, the stop tokens of a model's generation_config, vLLM's sampler's
processed log-probs written out in torch, and how both draw components that return to the target
(`ReturnsByRequests`). Nothing here imports vLLM: the openai engine runs where vLLM is not
installed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tailmon.engines.base import Decoding, Samples, Variant
from tailmon.errors import InputError

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


# Mixed into a draw's seed for its continuation requests (`ReturnsByRequests`): a continuation that
# reused the head's seeds would draw its tokens with the head's random numbers, tying y_K+1.. to
# y_1..K beyond what p(. | y_1..K) says.
CONTINUE_TAG = 0x636F6E74


def continuation_seed(seed: int) -> int:
    """The seed of a draw's continuation requests (each takes `vllm_request_seed(this, row)`)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, CONTINUE_TAG]).generate_state(1)[0])


class ReturnsByRequests:
    """Components that return to the target (`Variant.returns_after` = K, `return:K:SPEC`) for
    the engines over vLLM, which cannot switch a sequence's context mid-decode: the head's
    requests are cut at K tokens, then every response still open gets a request of its own whose
    prompt is the *continuation's* rendered prompt followed by the K drawn token ids, under the
    continuation's (the target's) adapter and decoding, seeded from `continuation_seed`. vLLM
    prefills that prompt afresh (its prefix cache is keyed by token ids and adapter, so at most it
    reuses blocks the target computed for the same ids): nothing computed under the head's system
    prompt or adapter enters the continuation's context, so the tokens after K follow
    p(. | x, y_1..K) exactly. `score` is the head's score of the first K tokens plus the
    continuation's log-probs of the rest in its own context; `next_token_logprobs` is the head's
    before K tokens and the continuation's from K on.

    The engine implements `_score_from(prompt, variant, seqs, skip)` (the processed log-probs of
    each response's tokens from position `skip` on, under a variant that draws every token),
    `_next_token_rows(prompt, variant, prefixes)` and `_continue(requests)`, which draws the
    continuations (prompt ids, variant, max tokens, seed; one sample each) as `Samples`.
    """

    returns_to_target = True

    def score(self, prompt: str, variant: Variant, responses: Sequence[Sequence[int]]) -> np.ndarray:
        seqs = [list(map(int, r)) for r in responses]
        d = variant.decoding
        for r in seqs:
            if len(r) > d.max_new_tokens:
                raise InputError(f"a response of {len(r)} tokens is longer than max_new_tokens={d.max_new_tokens}")
            if any(t < 0 or t >= self.vocab_size for t in r):
                raise InputError("a response holds a token id outside the vocabulary")
        if not seqs:
            return np.zeros(0, dtype=np.float64)
        if not variant.returns:
            return self._score_from(prompt, variant, seqs, 0)
        # q(y_1..K) under the head, times p(y_K+1.. | y_1..K) under the continuation in its own
        # context: the density `sample` draws from.
        k = variant.returns_after
        result = self._score_from(prompt, variant.head, [r[:k] for r in seqs], 0)
        longer = [i for i, r in enumerate(seqs) if len(r) > k]
        if longer:
            result[longer] += self._score_from(prompt, variant.continuation, [seqs[i] for i in longer], k)
        return result

    def next_token_logprobs(self, prompt: str, variant: Variant, prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        seqs = [list(map(int, p)) for p in prefixes]
        if not variant.returns:
            return self._next_token_rows(prompt, variant, seqs)
        out = np.zeros((len(seqs), self.vocab_size))
        later = np.array([len(s) >= variant.returns_after for s in seqs], dtype=bool)
        for part, rows in ((variant.continuation, np.flatnonzero(later)), (variant.head, np.flatnonzero(~later))):
            if rows.size:
                out[rows] = self._next_token_rows(prompt, part, [seqs[i] for i in rows])
        return out

    def _continue_from_target(self, prompt: str, draws: Sequence[tuple[Variant, Samples, int]]) -> None:
        """Draw the rest of every response that the head of a returning variant (each of `draws`:
        variant, its head's samples, the draw's seed) left open after its K tokens, in place: one
        request per open response, all of them through one `_continue` call."""
        requests, rows = self._continuation_requests(prompt, draws)
        if requests:
            join_continuations(rows, self._continue(requests))

    def _continuation_requests(self, prompt: str, draws: Sequence[tuple[Variant, Samples, int]]):
        """The continuation requests of `draws` (prompt ids, variant, max tokens, seed) and, for
        each, the (samples, row) it continues."""
        requests, rows = [], []
        for variant, samples, seed in draws:
            target, k = variant.continuation, variant.returns_after
            steps = variant.decoding.max_new_tokens - k
            if steps <= 0:
                continue
            ids = self.rendered(prompt, target)
            base = continuation_seed(seed)
            for i, (toks, done) in enumerate(zip(samples.token_ids, samples.finished)):
                if not done and len(toks) == k:
                    requests.append((ids + toks, target, steps, vllm_request_seed(base, i)))
                    rows.append((samples, i))
        return requests, rows


def samples_from(rows: Sequence[tuple[list[int], Sequence[float]]], stops) -> Samples:
    """`Samples` of responses given as (token ids, each token's processed log-prob); a response
    is finished when it ends with one of `stops`."""
    return Samples(token_ids=[toks for toks, _ in rows],
                   logprobs=np.asarray([float(sum(lps)) for _, lps in rows], dtype=np.float64),
                   finished=[bool(toks and toks[-1] in stops) for toks, _ in rows],
                   token_logprobs=[np.asarray(lps, dtype=np.float64) for _, lps in rows])


def join_continuations(rows: Sequence[tuple[Samples, int]], rest: Samples) -> None:
    """Append each continuation of `rest` to the response (samples, row) it continues, in place."""
    for (samples, i), toks, lps, done in zip(rows, rest.token_ids, rest.token_logprobs, rest.finished):
        samples.token_ids[i] = samples.token_ids[i] + toks
        samples.token_logprobs[i] = np.concatenate([samples.token_logprobs[i], lps])
        samples.logprobs[i] += float(np.sum(lps))
        samples.finished[i] = done
