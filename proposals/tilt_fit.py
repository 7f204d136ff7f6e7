"""Fitting a token tilt to a monitor's hits.

The zero-variance proposal for P = E_p[h] is q* proportional to p·h: the target's own harmful
responses. The family is q_b(y_t | ctx) = p(y_t | ctx) exp(b[y_t]) / Z_b(ctx), Z_b(ctx) = sum_v
p(v | ctx) exp(b[v]), with a bias only on candidate tokens; with s_i(b) = log q_b(y_i) / p(y_i) =
sum_t (b[y_it] - log Z_b(ctx_it)), both objectives need, for every hit i drawn from any mixture
with weight w_i = p / mixture, only the target's probabilities of the candidates at its positions:

* "variance" (default): minimise the estimated second moment of the next run's estimate,
  sum_i u_i / (a0 + (1 - a0) exp(s_i(b))), u_i ~ w_i h_i: the weight the mixture a0 p + (1 - a0)
  q_b gives hit i, averaged under p over the hits (E_p[w h] / P). It raises the hits that q_b
  draws too rarely and saturates once q_b draws a hit often enough, where a bias that grows
  further only inflates Z_b at every position of every response.
* "ce": the cross-entropy method, maximise sum_i u_i s_i(b): KL(q* || q_b). It matches the
  candidates' frequencies at the hits' own positions, whose contexts already lean towards the
  event, so it tends to bias too little for the contexts a fresh response passes through. Kept
  for comparison; the two have not been compared side by side on the embedded model.

Both are smooth (the CE objective concave), fitted by L-BFGS with a ridge term (lam/2) |b|^2 per
prompt (u sums to 1 per prompt), which keeps a token that few hits hold near 0. Candidates are the
judge's words as tokens (`word_tokens`), or the tokens held by at least `min_responses` distinct
hits. Whatever the fit, the estimate stays exact: the tilt only chooses where samples are drawn.
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

RIDGE = {"ce": 0.05, "variance": 1e-4}
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
             ridge: float | None = None, min_responses: int = MIN_RESPONSES, max_tokens: int = 2000,
             temper: float = 1.0, objective: str = "variance", defensive: float = 0.1) -> TiltFit:
    """The tilt for `hits` (see the module doc): `objective` "variance" (default) or "ce".

    `candidates`: the tokens that may get a bias (`word_tokens` of the judge's words); None:
    those held by at least `min_responses` distinct hits. `temper` < 1 flattens the hits'
    weights (u ~ (w h)^temper): a pilot drawn from a poor proposal has a few hits carrying
    nearly all the weight, and an exact cross-entropy step then copies those few responses.
    InputError when there is nothing to learn from."""
    if objective not in RIDGE:
        raise InputError(f"tilt objective must be 'variance' or 'ce', got '{objective}'")
    ridge = RIDGE[objective] if ridge is None else float(ridge)
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
    logp_rows, chosen, pos_w, hit_of, hit_u = [], [], [], [], []
    cols = np.asarray(support)
    for h in hits:
        u = h.weights ** temper
        u = u / u.sum()  # each prompt's hit mass is 1
        per_response = engine.position_logprobs(h.prompt, target, h.responses, cols)
        for r, ui, rows in zip(h.responses, u, per_response):
            if not r:
                continue
            logp_rows.append(rows)
            chosen += [col.get(t, -1) for t in r]
            pos_w += [ui] * len(r)
            hit_of += [len(hit_u)] * len(r)
            hit_u.append(ui)
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

    hit_a, u_hit = np.asarray(hit_of), np.asarray(hit_u)
    a0 = float(defensive)
    inside = chosen_a >= 0

    def second_moment(b):
        # s_i = log q_b(y_i) / p(y_i); the candidate mixture's weight of hit i is
        # 1 / (a0 + (1 - a0) e^s_i), and sum_i u_i times it estimates E_p[w h] / P, the relative
        # second moment of the estimate (per unit of P; u = w h / sum w h per prompt).
        rest = np.clip(1.0 - prob.sum(axis=1), 0.0, None)
        with np.errstate(divide="ignore"):
            terms = np.concatenate([np.log(rest)[:, None], logp + b[None, :]], axis=1)
        log_z = logsumexp(terms, axis=1)
        q = np.exp(logp + b[None, :] - log_z[:, None])
        per_pos = np.where(inside, b[np.where(inside, chosen_a, 0)], 0.0) - log_z
        s_hit = np.bincount(hit_a, weights=per_pos, minlength=len(u_hit))
        e = np.exp(np.clip(s_hit, -700, 700))
        denom = a0 + (1 - a0) * e
        value = float(u_hit @ (1.0 / denom)) + 0.5 * ridge * total * (b @ b)
        c = -u_hit * (1 - a0) * e / denom ** 2  # d value / d s_i
        c_pos = c[hit_a]
        grad = np.bincount(chosen_a[inside], weights=c_pos[inside], minlength=len(support)) - c_pos @ q
        return value, grad + ridge * total * b

    fun = second_moment if objective == "variance" else negative
    res = minimize(fun, np.zeros(len(support)), jac=True, method="L-BFGS-B",
                   bounds=[(-MAX_ABS_BIAS, MAX_ABS_BIAS)] * len(support))
    bias = res.x
    keep = np.abs(bias) > 1e-3  # a bias this small changes no probability by more than 0.1%
    return TiltFit(np.asarray(support)[keep], bias[keep], sum(len(h.responses) for h in hits), len(hits),
                   float(res.fun) / total if objective == "variance" else float(-res.fun) / total)
