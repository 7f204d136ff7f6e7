"""Exact probabilities of prefix events, for tests and benchmarks of the estimators.

P(response text starts with TEXT) under a variant is a finite sum over token paths: at each
step, a token either completes TEXT (its text starts with what is left), or consumes part of it
(what is left starts with its text) and the recursion continues, or leaves the event. Every
tokenisation of TEXT is counted, stop tokens end the response (no match), and paths longer than
max_new_tokens do not count, exactly as the `prefix:` judge sees truncated responses. Log-probs
are the engine's processed ones, so temperature and truncation are honoured.
"""

from __future__ import annotations

import weakref

import numpy as np

from tailmon.engines.base import Engine, Variant
from tailmon.errors import InputError

# Text of every token, per engine: computed once (a whole vocabulary of decodes), dropped with it.
_TOKEN_TEXTS: "weakref.WeakKeyDictionary[Engine, list[str]]" = weakref.WeakKeyDictionary()


def token_texts(engine: Engine) -> list[str]:
    if engine not in _TOKEN_TEXTS:
        _TOKEN_TEXTS[engine] = [engine.token_text(t) for t in range(engine.vocab_size)]
    return _TOKEN_TEXTS[engine]


def prefix_probability(engine: Engine, prompt: str, variant: Variant, text: str, max_nodes: int = 20000) -> float:
    """P_variant(decoded response starts with `text`), summed over every tokenisation."""
    if not text:
        raise InputError("prefix text must not be empty")
    texts = token_texts(engine)
    stops = engine.stop_token_ids
    memo: dict[str, tuple[np.ndarray, list[int]]] = {}

    def candidates(left: str):
        """Tokens that complete `left`, and tokens that consume a proper part of it."""
        if left not in memo:
            complete = [t for t, p in enumerate(texts) if t not in stops and p.startswith(left)]
            partial = [t for t, p in enumerate(texts) if t not in stops and left.startswith(p) and len(p) < len(left)]
            memo[left] = (np.array(complete, dtype=np.int64), partial)
        return memo[left]

    total = 0.0
    frontier: list[tuple[list[int], str, float]] = [([], text, 0.0)]  # ids so far, text left, log mass
    visited = 0
    for _depth in range(variant.decoding.max_new_tokens):
        if not frontier:
            break
        visited += len(frontier)
        if visited > max_nodes:
            raise InputError(f"prefix '{text}' branches into more than {max_nodes} token paths")
        logps = engine.next_token_logprobs(prompt, variant, [ids for ids, _, _ in frontier])
        nxt = []
        for (ids, left, mass), logp in zip(frontier, logps):
            complete, partial = candidates(left)
            total += float(np.exp(mass + logp[complete]).sum()) if complete.size else 0.0
            for t in partial:  # includes empty pieces, which consume nothing
                if np.isfinite(logp[t]):
                    nxt.append((ids + [int(t)], left[len(texts[t]):], mass + float(logp[t])))
        frontier = nxt
    return total
