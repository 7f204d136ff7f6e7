"""Fitting a token tilt to a monitor's hits.

The zero-variance proposal for P = E_p[h] is q* proportional to p·h: the target's own harmful
responses. The family is q_b(y_t | ctx) = p(y_t | ctx) exp(b[y_t]) / Z_b(ctx), Z_b(ctx) = sum_v
p(v | ctx) exp(b[v]), with a bias only on candidate tokens; with s_i(b) = log q_b(y_i) / p(y_i) =
sum_t (b[y_it] - log Z_b(ctx_it)), both objectives need, for every hit i drawn from any mixture
with weight w_i = p / mixture, only the target's probabilities of the candidates at its positions:

* "ce" (default): the cross-entropy method, maximise sum_i u_i s_i(b): KL(q* || q_b). It matches
  the candidates' frequencies at the hits' own positions, whose contexts already lean towards the
  event, so it may bias too little for the contexts a fresh response passes through. What
  `tailmon proposals fit-tilt` and adaptive monitors run (their tests measured it).
* "variance": minimise the estimated second moment of the next run's estimate,
  sum_i u_i / (a0 + (1 - a0) exp(s_i(b))), u_i ~ w_i h_i: the weight the mixture a0 p + (1 - a0)
  q_b gives hit i, averaged under p over the hits (E_p[w h] / P). It raises the hits that q_b
  draws too rarely and saturates once q_b draws a hit often enough, where a bias that grows
  further only inflates Z_b at every position of every response.
  `defensive` is a0. benchmarks/tilt.py fits with it; the two objectives have not been compared
  side by side on the embedded model.

Both are smooth (the CE objective concave), fitted by L-BFGS with a ridge term (lam/2) |b|^2 per
prompt (u sums to 1 per prompt), which keeps a token that few hits hold near 0. Candidates are the
judge's words as tokens (`word_tokens`), or the tokens held by at least `min_responses` distinct
hits. Whatever the fit, the estimate stays exact: the tilt only chooses where samples are drawn.
"""

from __future__ import annotations

import datetime
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from tailmon import __version__
from tailmon.engines.base import Engine, Variant
from tailmon.engines.tilt import MAX_ABS_BIAS, save_tilt
from tailmon.errors import InputError
from tailmon.redact import mask_secrets

from .lora import pilot_figures, texts_sha256
from .sampling import derive_seed, draw
from .spec import parse_proposal
from .variants import TiltProposal

RIDGE = {"ce": 0.05, "variance": 1e-4}
MIN_RESPONSES = 2
# The first fit's hits come from the seeding mixture, where a few carry nearly all the weight w h:
# tempered (module doc of tailmon.proposals.adaptive); refits on rounds drawn with a tilt are not.
TEMPER_SEED, TEMPER_TILTED = 0.5, 1.0
_DRAW = 31  # seed tag


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
             temper: float = 1.0, objective: str = "ce", defensive: float = 0.1) -> TiltFit:
    """The tilt for `hits` (see the module doc): `objective` "ce" (default) or "variance".

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


def top_biases(engine: Engine, fitted: TiltFit, k: int = 5) -> list[tuple[str, float]]:
    """The `k` largest biases (by size) with their tokens' text."""
    order = np.argsort(-np.abs(fitted.bias))[:k]
    return [(engine.decode([int(fitted.token_ids[i])]), float(fitted.bias[i])) for i in order]


def fit_tilt_rounds(engine: Engine, target: Variant, judge, prompts: Sequence[str], start: Sequence[str], out,
                    *, rounds: int = 0, samples: int = 64, defensive: float = 0.1, seed: int = 0,
                    progress: bool = False, report: Callable[[str], None] | None = None) -> tuple[TiltFit, dict]:
    """`tailmon proposals fit-tilt`: draw a pilot of `samples` per prompt from the target (share
    `defensive`) and the `start` proposals, fit a tilt to its hits, then `rounds` times draw
    from the target and the last tilt and refit on every round's hits (u = w h, w under the
    mixture each round drew from, so all rounds estimate the same q* ~ p h). Writes the tilt
    file `out` with its provenance; returns the final fit and the provenance."""
    from tqdm import tqdm

    if int(rounds) != rounds or rounds < 0:
        raise InputError(f"rounds must be an integer >= 0, got {rounds}", setting="rounds")
    if int(samples) != samples or samples < 2:
        raise InputError(f"samples must be an integer >= 2, got {samples}", setting="samples")
    if not 0 <= defensive < 1:
        raise InputError(f"defensive must be in [0, 1), got {defensive}", setting="defensive")
    if not prompts:
        raise InputError("fitting a tilt needs prompts")
    if not start:
        raise InputError("the pilot needs a seeding proposal (the target alone rarely gives hits)", setting="start")
    say = report or (lambda line: None)
    facts = engine.base_facts() or {}
    words = judge.words()
    candidates = word_tokens(engine, words) if words else None
    seeding = [parse_proposal(x).variant(target) for x in start]
    pool = {x: ([], [], []) for x in prompts}  # prompt -> every round's ids, log w, h
    records, fitted = [], None
    with tempfile.TemporaryDirectory(prefix="tailmon-tilt-") as tmp:
        for k in range(rounds + 1):
            if k == 0:
                variants = [target] + seeding
                shares = [defensive] + [(1 - defensive) / len(seeding)] * len(seeding)
            else:
                # each round's tilt is a file of its own: the engine keys a tilt by its content anyway
                path = save_tilt(Path(tmp) / f"round-{k - 1}.json", fitted.token_ids, fitted.bias,
                                 tokenizer_sha256=facts.get("tokenizer_sha256"))
                variants = [target, TiltProposal(str(path)).variant(target)]
                shares = [defensive, 1 - defensive]
            draws = []
            with tqdm(total=len(prompts) * samples, desc=f"round {k}/{rounds} sampling", unit="sample",
                      file=sys.stderr, disable=not progress, leave=False) as bar:
                for x in prompts:
                    d = draw(engine, x, variants, shares, samples, lambda j, x=x: derive_seed(seed, _DRAW, k, x, j),
                             judge, bar.update)
                    draws.append(d)
                    pool[x][0].extend(d.ids)
                    pool[x][1].extend(d.log_w)
                    pool[x][2].extend(d.scores)
            fig = pilot_figures(draws)
            if fig["n_harmful"] == 0:
                raise InputError(f"round {k}: none of the {len(prompts) * samples} samples was harmful under judge "
                                 f"'{mask_secrets(judge.spec, pairs=False)}', so there is no hit to fit a tilt to: "
                                 "draw more samples (--samples), or seed from a hotter proposal "
                                 "(--start temperature:2)")
            hits = hit_sets(list(pool), [v[0] for v in pool.values()], [np.asarray(v[1]) for v in pool.values()],
                            [np.asarray(v[2]) for v in pool.values()])
            temper = TEMPER_SEED if k == 0 else TEMPER_TILTED
            fitted = fit_tilt(engine, target, hits, candidates=candidates, temper=temper)
            if not fitted.token_ids.size:
                raise InputError(f"round {k}: the fitted bias is 0 on every token: the hits share no token the "
                                 "tilted target would not already give them; draw more samples (--samples)")
            record = {"round": k, "mixture": [v.name for v in variants], "hits": fig["n_harmful"],
                      "hits_fitted": fitted.hits, "samples": fig["n_samples"], "p_hat": fig["p_hat"],
                      "ess_wh": fig["ess_wh"], "variance": fig["variance"], "temper": temper,
                      "tokens": int(fitted.token_ids.size),
                      "top": [[t, round(b, 4)] for t, b in top_biases(engine, fitted)]}
            records.append(record)
            say(round_line(record))
    provenance = {
        "fitted_by": "tailmon proposals fit-tilt",
        "judge": mask_secrets(judge.spec, pairs=False),
        "model": {"ref": engine.model_id, **{k: facts[k] for k in ("weights_fingerprint", "tokenizer_sha256")
                                             if k in facts}},
        "target": {"system_prompt": target.system_prompt,
                   **{k: getattr(target.decoding, k) for k in ("temperature", "top_p", "top_k", "max_new_tokens")}},
        "prompts": len(prompts), "prompts_sha256": texts_sha256(prompts), "start": list(start),
        "rounds": rounds, "samples": samples, "defensive": defensive, "seed": seed,
        "candidates": "judge words" if candidates else "tokens shared by the hits",
        "hits": fitted.hits, "objective": fitted.objective, "history": records,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tailmon_version": __version__,
    }
    save_tilt(out, fitted.token_ids, fitted.bias, tokenizer_sha256=facts.get("tokenizer_sha256"),
              tokens=[engine.decode([int(t)]) for t in fitted.token_ids], provenance=provenance)
    return fitted, provenance


def round_line(record: dict) -> str:
    """One line per round: hits, p_hat, ESS of w h, and the largest biases with their tokens."""
    top = ", ".join(f"{t!r} {b:+.2f}" for t, b in record["top"])
    return (f"round {record['round']}: {record['hits']} hits in {record['samples']} samples, "
            f"p_hat {record['p_hat']:.3g}, ESS(w*h) {record['ess_wh']:.1f}; {record['tokens']} tokens biased, "
            f"largest: {top}")
