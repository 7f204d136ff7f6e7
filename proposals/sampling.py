"""Weighted draws from a defensive mixture: the sampling core of the estimation pipeline
(tailmon.estimation.pipeline) and of building proposals (CEM training, tuning).

Fixed counts per component by largest remainder, each sample scored under every other component
on the same token ids (its own log-prob comes from sampling), balance-heuristic weights with the
realised shares n_j / n. It lives here rather than in the monitor package because building a
proposal needs it and data flows monitor -> proposals; a `Draw` keeps what proposal building needs
beyond an estimate: the token ids of every sample and its log-prob under every component.
When every scored component returns to the target (`return:K:SPEC`), only the first max-K tokens
of each sample are scored (`weight_horizon`). A draw times its generation (per component),
scoring and judging, for the Monte Carlo time equivalents (tailmon.estimation.efficiency).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tailmon.engines.base import Engine, Variant, checkpoint
from tailmon.estimators import balance_log_weights


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from integers and strings: distinct tuples give independent streams."""
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def allocate(n: int, shares: Sequence[float]) -> list[int]:
    """Integer counts close to share_j * n (largest remainder), summing to n (as the pipeline does)."""
    raw = np.asarray(shares, dtype=float) * n
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    return counts.tolist()


@dataclass
class Draw:
    """n samples for one prompt, drawn in fixed counts from the components of a mixture."""

    prompt: str
    ids: list[list[int]]
    drawn: np.ndarray
    """Index of the component that drew each sample."""
    logq: np.ndarray
    """(n, K) processed log-prob of every sample under every component; column 0 is the target.
    With a `horizon` M, the log-prob of each sample's first M tokens only (see `weight_horizon`):
    the factor p(y_M+1.. | y_1..M) common to every column is left out, so every ratio of columns
    (every weight) is exact while no token after M is ever scored."""
    shares: np.ndarray
    """Realised shares n_j / n: the mixture the samples actually come from."""
    texts: list[str]
    scores: np.ndarray
    checked: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    """Rows whose log-prob under the component that drew them was also computed by scoring."""
    rescored: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Those log-probs, teacher-forced (compare `logq[checked, drawn[checked]]`, from sampling;
    with a `horizon`, of the first `horizon` tokens, as `logq`)."""
    horizon: int | None = None
    """None: `logq` holds whole-response log-probs; M: log-probs of the first M tokens."""
    generate_seconds: np.ndarray | None = None
    """Wall time of each component's generation (0 where it drew nothing; where one batched
    decode drew several components, its time split by their rows: `Samples.seconds`)."""
    score_seconds: float = 0.0
    """Wall time of scoring samples under the components that did not draw them (and re-scoring)."""
    judge_seconds: float = 0.0

    @property
    def log_p(self) -> np.ndarray:
        return self.logq[:, 0]

    @property
    def log_w(self) -> np.ndarray:
        """Balance-heuristic log-weights p / sum_j a_j q_j."""
        return balance_log_weights(self.logq[:, 0], self.logq, self.shares)

    @property
    def seconds(self) -> float:
        """Wall time of the whole draw: generation, scoring and judging."""
        gen = 0.0 if self.generate_seconds is None else float(np.sum(self.generate_seconds))
        return gen + self.score_seconds + self.judge_seconds


def weight_horizon(variants: Sequence[Variant], columns: Sequence[int]) -> int | None:
    """The number of leading tokens every weight needs when the scored `columns` of a mixture
    (variants[0] the target) are the target and components that return to it; else None.

    Component j returning after K_j tokens has density q_j(y_1..K_j) p(y_K_j+1.. | y_1..K_j).
    With M = max_j K_j (the largest K, not the smallest: a component with K_j = M still has its
    own tokens up to M in its density, so tokens K_min+1..M differ between columns), every
    density, the target's p(y) included, factors as f_j(y_1..M) p(y_M+1.. | y_1..M), and the common
    factor cancels from w = p / sum_j a_j q_j. So each column needs the first M tokens only:
    q_j(y_1..K_j) p(y_K_j+1..M | y_1..K_j), which is what scoring y_1..M under the returning
    variant gives. A component that draws every token (or returns to another variant than the
    target) keeps the whole response in its density: no horizon.
    """
    target = variants[0]
    if target.returns:
        return None
    ks = []
    for j in columns:
        if j == 0:
            continue
        v = variants[j]
        if not v.returns or v.continuation != target:
            return None
        ks.append(v.returns_after)
    return max(ks) if ks else None


def draw(engine: Engine, prompt: str, variants: Sequence[Variant], shares: Sequence[float], n: int,
         seed: Callable[[int], int], judge, progress: Callable[[int], None] | None = None,
         score_all: bool = True, rescore: int = 0) -> Draw:
    """Draw n samples for `prompt` from the mixture (variants[0] must be the target), score them
    under the components (all of them with `score_all`, else only those with a share and the
    target) and judge them. `seed(j)` gives component j's sampling seed.

    `rescore`: up to this many samples are also scored under the component that drew them
    (spread over the components that drew, the first of each: they are a random subset), so
    that the sampled log-probs can be checked against the scored ones (`Draw.rescored`).

    When every scored component returns to the target, only each sample's first
    `weight_horizon` tokens are scored (re-scored too).

    Scoring is one `engine.score_many` call for every column and the re-scored rows, so that an
    engine can share forward passes between components (the transformers engine: one pass per
    prompt, adapter and steering, whatever the temperatures and truncations on it)."""
    for variant in variants:  # before any sampling, rather than after the other components' draws
        if not engine.returns_to_target:
            engine.refuse_return(variant)
        if not engine.tilts:
            engine.refuse_tilt(variant)
    counts = allocate(n, shares)
    realised = np.asarray(counts, dtype=float) / n
    columns = [j for j in range(len(variants)) if score_all or j == 0 or realised[j] > 0]
    horizon = weight_horizon(variants, columns)
    ids: list[list[int]] = []
    drawn: list[int] = []
    own: list[float] = []
    own_missing: list[int] = []  # samples whose first `horizon` tokens need scoring under their own component
    gen_seconds = np.zeros(len(variants))
    drew = [j for j, n_j in enumerate(counts) if n_j > 0]
    t0 = time.perf_counter()
    # One call for the whole mixture: the engine may decode every component in one batch.
    drawn_samples = engine.sample_mixture(prompt, [variants[j] for j in drew], [counts[j] for j in drew],
                                          [seed(j) for j in drew])
    elapsed = time.perf_counter() - t0
    for j, samples in zip(drew, drawn_samples):
        n_j = counts[j]
        # an engine that did not time its components: the wall time split by rows
        gen_seconds[j] = samples.seconds if samples.seconds is not None else elapsed * n_j / n
        if horizon is None:
            own += samples.logprobs.tolist()
        elif samples.token_logprobs is not None:
            own += [float(np.sum(lp[:horizon])) for lp in samples.token_logprobs]
        else:
            own_missing += range(len(ids), len(ids) + n_j)
            own += [0.0] * n_j
        ids += samples.token_ids
        drawn += [j] * n_j
        if progress:
            progress(n_j)
    drawn_a = np.asarray(drawn)
    scored = ids if horizon is None else [r[:horizon] for r in ids]
    logq = np.full((len(ids), len(variants)), -np.inf)
    logq[np.arange(len(ids)), drawn_a] = own
    missing = np.zeros(len(ids), dtype=bool)
    missing[own_missing] = True
    t0 = time.perf_counter()
    # Every column a row lacks, and the re-scored rows' own columns (on what `logq` holds: the
    # first `horizon` tokens with a horizon), in one call: the engine shares what passes it can.
    need = np.zeros(logq.shape, dtype=bool)
    for j in columns:
        need[:, j] = (drawn_a != j) | missing
    checked = _rescore_rows(counts, rescore)
    own_need = np.zeros(logq.shape, dtype=bool)
    own_need[checked, drawn_a[checked]] = True
    values = score_many_unique(engine, prompt, variants, scored, need | own_need)
    logq[need] = values[need]
    rescored = values[checked, drawn_a[checked]]
    score_seconds = time.perf_counter() - t0
    checkpoint()  # between scoring and judging (a judge may be slow: an endpoint, an LLM)
    t0 = time.perf_counter()
    texts = [engine.decode(r) for r in ids]
    scores = judge.score([prompt] * len(texts), texts)
    judge_seconds = time.perf_counter() - t0
    return Draw(prompt, ids, drawn_a, logq, realised, texts, scores, checked, rescored, horizon=horizon,
                generate_seconds=gen_seconds, score_seconds=score_seconds, judge_seconds=judge_seconds)


def _rescore_rows(counts: Sequence[int], k: int) -> np.ndarray:
    """Up to k samples to score under the component that drew them, spread over the components
    that drew, the first of each (they are a random subset).

    Each sample's own column of `logq` comes from sampling (decode, one token at a time with a
    cache), every other column from teacher-forced scoring (prefill): the same function on exact
    arithmetic, but not always in an engine's (bf16 kernels on a GPU). Re-scoring a few shows it."""
    drew = [j for j, n_j in enumerate(counts) if n_j > 0]
    if k <= 0 or not drew:
        return np.zeros(0, dtype=int)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = []
    for i, j in enumerate(drew):
        m = min(k // len(drew) + (1 if i < k % len(drew) else 0), counts[j])
        rows += range(int(starts[j]), int(starts[j]) + m)
    return np.asarray(rows, dtype=int)


def score_many_unique(engine: Engine, prompt: str, variants: Sequence[Variant], responses: list[list[int]],
                      need: np.ndarray) -> np.ndarray:
    """`engine.score_many` with each distinct response scored once (short responses repeat often):
    a distinct response needs a column when any of its copies does. (n, len(variants)), NaN where
    `need` is False."""
    keys = [tuple(r) for r in responses]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    where = np.array([index[k] for k in keys], dtype=int)
    unique_need = np.zeros((len(index), len(variants)), dtype=bool)
    np.logical_or.at(unique_need, where, need)
    out = np.full(need.shape, np.nan)
    if unique_need.any():
        values = engine.score_many(prompt, variants, [list(k) for k in index], unique_need)
        out[need] = values[where][need]
    return out


def score_unique(engine: Engine, prompt: str, variant: Variant, responses: list[list[int]]) -> np.ndarray:
    """Score each distinct response once (short responses repeat often)."""
    keys = [tuple(r) for r in responses]
    unique = list(dict.fromkeys(keys))
    values = dict(zip(unique, engine.score(prompt, variant, [list(k) for k in unique])))
    return np.array([values[k] for k in keys], dtype=np.float64)
