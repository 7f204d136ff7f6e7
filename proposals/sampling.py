"""Weighted draws from a defensive mixture: the sampling core of the estimation pipeline
(tailmon.estimation.pipeline) and of building proposals (CEM training, tuning).

Fixed counts per component by largest remainder, each sample scored under every other component
on the same token ids (its own log-prob comes from sampling), balance-heuristic weights with the
realised shares n_j / n. It lives here rather than in the monitor package because building a
proposal needs it and data flows monitor -> proposals; a `Draw` keeps what proposal building needs
beyond an estimate: the token ids of every sample and its log-prob under every component.
"""

from __future__ import annotations

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
    """(n, K) processed log-prob of every sample under every component; column 0 is the target."""
    shares: np.ndarray
    """Realised shares n_j / n: the mixture the samples actually come from."""
    texts: list[str]
    scores: np.ndarray
    checked: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    """Rows whose log-prob under the component that drew them was also computed by scoring."""
    rescored: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Those log-probs, teacher-forced (compare `logq[checked, drawn[checked]]`, from sampling)."""

    @property
    def log_p(self) -> np.ndarray:
        return self.logq[:, 0]

    @property
    def log_w(self) -> np.ndarray:
        """Balance-heuristic log-weights p / sum_j a_j q_j."""
        return balance_log_weights(self.logq[:, 0], self.logq, self.shares)


def draw(engine: Engine, prompt: str, variants: Sequence[Variant], shares: Sequence[float], n: int,
         seed: Callable[[int], int], judge, progress: Callable[[int], None] | None = None,
         score_all: bool = True, rescore: int = 0) -> Draw:
    """Draw n samples for `prompt` from the mixture (variants[0] must be the target), score them
    under the components (all of them with `score_all`, else only those with a share and the
    target) and judge them. `seed(j)` gives component j's sampling seed.

    `rescore`: up to this many samples are also scored under the component that drew them
    (spread over the components that drew, the first of each: they are a random subset), so
    that the sampled log-probs can be checked against the scored ones (`Draw.rescored`)."""
    counts = allocate(n, shares)
    ids: list[list[int]] = []
    drawn: list[int] = []
    own: list[float] = []
    for j, (variant, n_j) in enumerate(zip(variants, counts)):
        if n_j == 0:
            continue
        samples = engine.sample(prompt, variant, n_j, seed(j))
        ids += samples.token_ids
        own += samples.logprobs.tolist()
        drawn += [j] * n_j
        if progress:
            progress(n_j)
    drawn_a = np.asarray(drawn)
    logq = np.full((len(ids), len(variants)), -np.inf)
    logq[np.arange(len(ids)), drawn_a] = own
    realised = np.asarray(counts, dtype=float) / n
    for j, variant in enumerate(variants):
        if not (score_all or j == 0 or realised[j] > 0):
            continue
        rows = np.flatnonzero(drawn_a != j)
        if rows.size:
            logq[rows, j] = score_unique(engine, prompt, variant, [ids[i] for i in rows])
    checked, rescored = _rescore_own(engine, prompt, variants, counts, ids, rescore)
    checkpoint()  # between scoring and judging (a judge may be slow: an endpoint, an LLM)
    texts = [engine.decode(r) for r in ids]
    scores = judge.score([prompt] * len(texts), texts)
    return Draw(prompt, ids, drawn_a, logq, realised, texts, scores, checked, rescored)


def _rescore_own(engine: Engine, prompt: str, variants: Sequence[Variant], counts: Sequence[int],
                 ids: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Score up to k samples under the component that drew them: (rows, log-probs).

    Each sample's own column of `logq` comes from sampling (decode, one token at a time with a
    cache), every other column from teacher-forced scoring (prefill): the same function on exact
    arithmetic, but not always in an engine's (bf16 kernels on a GPU). Re-scoring a few shows it."""
    drew = [j for j, n_j in enumerate(counts) if n_j > 0]
    if k <= 0 or not drew:
        return np.zeros(0, dtype=int), np.zeros(0)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows, values = [], []
    for i, j in enumerate(drew):
        m = min(k // len(drew) + (1 if i < k % len(drew) else 0), counts[j])
        if m == 0:
            continue
        own = list(range(int(starts[j]), int(starts[j]) + m))
        rows += own
        values.append(score_unique(engine, prompt, variants[j], [ids[r] for r in own]))
    return np.asarray(rows, dtype=int), (np.concatenate(values) if values else np.zeros(0))


def score_unique(engine: Engine, prompt: str, variant: Variant, responses: list[list[int]]) -> np.ndarray:
    """Score each distinct response once (short responses repeat often)."""
    keys = [tuple(r) for r in responses]
    unique = list(dict.fromkeys(keys))
    values = dict(zip(unique, engine.score(prompt, variant, [list(k) for k in unique])))
    return np.array([values[k] for k in keys], dtype=np.float64)
