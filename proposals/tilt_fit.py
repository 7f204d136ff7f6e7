"""Fitting a token tilt to a monitor's hits by the cross-entropy method.

The zero-variance proposal for P = E_p[h] is q* proportional to p·h: the target's own harmful
responses. Within the tilt family q_b(y_t | ctx) = p(y_t | ctx) exp(b[y_t]) / Z_b(ctx) the
cross-entropy method picks the b closest to q* in KL(q* || q_b), estimated from weighted samples
drawn from any mixture (u_i proportional to w_i h_i, w = p / mixture):

    maximise  sum_i u_i sum_t [ b[y_it] - log Z_b(ctx_it) ]  -  (lam / 2) |b|^2.

The objective is concave in b (log Z_b is convex), so L-BFGS finds its maximum. Its gradient in
b[v] is the weighted count of v in the hits minus its expected count under q_b at the same
positions: a token gets a positive bias when hits hold it more often than the tilted target would
put it there. Only tokens that occur in at least `min_responses` distinct hits get a bias (so
Z_b needs p(v | ctx) for those tokens alone), and the ridge term keeps a token that occurs in
few hits near 0: with u summing to 1 per prompt, a token in a fraction f of a prompt's hit mass
has |b| <= f / lam whatever its probability, so lam = 0.05 bounds a token in 5% of the hits by a
bias of 1 and leaves room for the decisive ones (a profane word in most hits), whose bias is set by
their expected count rather than by the ridge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from tailmon.engines.base import Engine, Variant
from tailmon.engines.tilt import MAX_ABS_BIAS
from tailmon.errors import InputError

RIDGE = 0.05
MIN_RESPONSES = 2


@dataclass
class HitSet:
    """Hits of one prompt: their token ids and CE weights u (w·h, any scale: normalised per prompt)."""

    prompt: str
    responses: list[list[int]]
    weights: np.ndarray


@dataclass
class TiltFit:
    token_ids: np.ndarray
    bias: np.ndarray
    hits: int
    prompts: int
    objective: float
    """The fitted objective per unit of hit weight (higher: q_b closer to the hits)."""


def hit_sets(prompts: Sequence[str], ids: Sequence[Sequence[Sequence[int]]], log_w: Sequence[np.ndarray],
             scores: Sequence[np.ndarray]) -> list[HitSet]:
    """Per prompt, the responses with h > 0 and their weights w·h (rescaled by the prompt's largest
    log-weight, so that exp never underflows)."""
    out = []
    for prompt, rows, lw, h in zip(prompts, ids, log_w, scores):
        lw, h = np.asarray(lw, dtype=float), np.asarray(h, dtype=float)
        keep = np.flatnonzero((h > 0) & np.isfinite(lw))
        if keep.size == 0:
            continue
        u = np.exp(lw[keep] - lw[keep].max()) * h[keep]
        out.append(HitSet(prompt, [list(rows[i]) for i in keep], u))
    return out


def word_tokens(engine: Engine, words: Sequence[str], max_pieces: int = 3) -> list[int]:
    """Token ids that spell `words` (a judge's `words()`) as the model writes them: each word
    lower-case and capitalised, with and without a leading space, tokenised. A form that is one
    token gives that token; a longer one (up to `max_pieces`) gives its pieces after the first,
    since a first piece such as " f" or "b" starts thousands of harmless words, while "uck" after
    it is rare anywhere else: biasing the later pieces raises the word where the target already
    began it."""
    tok = engine.tokenizer
    if tok is None:
        return []
    out: dict[int, None] = {}
    for word in words:
        for form in dict.fromkeys((word, " " + word, word.capitalize(), " " + word.capitalize())):
            ids = [int(i) for i in tok(form, add_special_tokens=False)["input_ids"]]
            if len(ids) == 1:
                out[ids[0]] = None
            elif 1 < len(ids) <= max_pieces:
                out.update(dict.fromkeys(ids[1:]))
    return list(out)


def fit_tilt(engine: Engine, target: Variant, hits: Sequence[HitSet], *, candidates: Sequence[int] | None = None,
             ridge: float = RIDGE, min_responses: int = MIN_RESPONSES, max_tokens: int = 2000,
             temper: float = 1.0) -> TiltFit:
    """The cross-entropy tilt for `hits` (see the module doc).

    `candidates`: the tokens that may get a bias (`word_tokens` of the judge's words); None:
    those held by at least `min_responses` distinct hits. `temper` < 1 flattens the hits'
    weights (u ~ (w h)^temper): a pilot drawn from a poor proposal has a few hits carrying
    nearly all the weight, and an exact cross-entropy step then copies those few responses.
    InputError when there is nothing to learn from."""
    hits = [h for h in hits if h.responses]
    if not hits:
        raise InputError("fitting a token tilt needs hits: no sample was judged harmful")
    # distinct responses holding each token, over every prompt
    holders: dict[int, int] = {}
    for h in hits:
        for r in {tuple(r) for r in h.responses}:
            for t in set(r):
                holders[t] = holders.get(t, 0) + 1
    if candidates:
        support = sorted(set(int(t) for t in candidates))
    else:
        support = sorted(t for t, c in holders.items() if c >= min_responses)
    if not support:
        raise InputError(f"fitting a token tilt needs a token shared by {min_responses} distinct harmful responses; "
                         f"the {sum(len(h.responses) for h in hits)} hits share none")
    if len(support) > max_tokens:  # the most widely held ones
        support = sorted(sorted(support, key=lambda t: -holders[t])[:max_tokens])
    col = {t: j for j, t in enumerate(support)}
    # Per position of every hit: log p(v | ctx) for v in the support, the index of the drawn token
    # in it (-1 when outside), and the position's CE weight.
    logp_rows, chosen, pos_w = [], [], []
    cols = np.asarray(support)
    for h in hits:
        u = h.weights ** temper
        u = u / u.sum()  # each prompt's hit mass is 1
        for r, ui in zip(h.responses, u):
            if not r:
                continue
            rows = engine.next_token_logprobs(h.prompt, target, [r[:t] for t in range(len(r))])
            logp_rows.append(rows[:, cols])
            chosen += [col.get(t, -1) for t in r]
            pos_w += [ui] * len(r)
    logp = np.concatenate(logp_rows)  # (positions, |S|)
    # exp(-inf) = 0: tokens outside a truncated support contribute nothing to Z
    prob = np.exp(logp)
    chosen_a = np.asarray(chosen)
    pw = np.asarray(pos_w)
    counts = np.zeros(len(support))
    np.add.at(counts, chosen_a[chosen_a >= 0], pw[chosen_a >= 0])
    total = float(sum(1.0 for _ in hits))

    def negative(b):
        # log Z = log(1 + sum_S p(v)(e^b - 1)), computed stably as logsumexp over {rest, S}
        rest = np.clip(1.0 - prob.sum(axis=1), 0.0, None)
        with np.errstate(divide="ignore"):
            terms = np.concatenate([np.log(rest)[:, None], logp + b[None, :]], axis=1)
        log_z = logsumexp(terms, axis=1)
        q = np.exp(logp + b[None, :] - log_z[:, None])
        value = counts @ b - pw @ log_z - 0.5 * ridge * total * (b @ b)
        grad = counts - pw @ q - ridge * total * b
        return -value, -grad

    res = minimize(negative, np.zeros(len(support)), jac=True, method="L-BFGS-B",
                   bounds=[(-MAX_ABS_BIAS, MAX_ABS_BIAS)] * len(support))
    bias = res.x
    keep = np.abs(bias) > 1e-3  # a bias this small changes no probability by more than 0.1%
    return TiltFit(np.asarray(support)[keep], bias[keep], sum(len(h.responses) for h in hits), len(hits),
                   float(-res.fun) / total)
