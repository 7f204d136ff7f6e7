"""Coverage and width of the per-prompt importance-sampling interval (issue 16, item 1): how often
`ci_high` falls below the true P when the harmful samples' weights are skewed.

A simulation with a known answer, no model, and real balance-heuristic weights. The space is
discrete: 4,000 harmful outcomes and 2,000 harmless ones. The target p gives the harmful ones
probabilities P * exp(spread * Z_i) / sum (Z_i standard normal, drawn once per cell), in all P =
1e-4, and the harmless ones the rest; the proposal q spreads a mass Q evenly over the harmful
outcomes (Q set so that the expected number of hits is `hits`) and 1 - Q over the harmless ones.
A run draws n = 300 samples in fixed counts, round(a0 n) from p and the rest from q, and every
weight is computed exactly, w = p / (a0 p + (1 - a0) q) (a0 the realised share), so the hits'
log-weights spread by about `spread` (sd) and no weight exceeds 1/a0. The estimator sees what the
pipeline gives it: log w, h in {0, 1} and the drawing component.

    heavy cluster   as above with spread 0.5, plus 5 harmful outcomes carrying 70% of P that the
                    proposal draws with probability 1/n per draw in all: most of P sits in weights
                    a run draws about once (0 times in about 40% of runs).

Per cell (spread x hits x defensive share, R runs): P(ci_high < P) over all runs (the conservative
bound counting where the estimate is flagged unreliable), the share of runs flagged reliable, the
miss rate among those, the median ci_high / P, and the same for the interval tailmon reported
before issue 16 item 1 (p_hat + z SE; Clopper-Pearson on sum(a0 w h) with 1-4 hits), on the same
draws.

    python benchmarks/intervals.py [--reps 1000] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import stats

N = 300
P_TRUE = 1e-4
HARMFUL = 4000
HARMLESS = 2000
CONFIDENCE = 0.95
SPREADS = (0.5, 1.0, 1.5, 2.0)
HITS = (5, 20, 50, 200)
DEFENSIVE = (0.05, 0.1, 0.3)
CLUSTER_HITS = (20, 50, 200)


@dataclass(frozen=True)
class World:
    """A target p and a proposal q over a discrete space, the mixture's exact weights, and P."""

    p: np.ndarray
    q: np.ndarray
    h: np.ndarray
    log_w: np.ndarray
    defensive: float
    n: int
    P: float


def make_world(spread: float, hits: float, defensive: float, n: int = N, *, P: float = P_TRUE,
               cluster: bool = False, seed: int = 12345) -> World:
    """The discrete problem of one cell (see the module docstring). `defensive` is rounded to the
    realised share round(a0 n) / n, which is what the weights must use."""
    g = np.random.default_rng(seed)
    n0 = round(defensive * n)
    a0 = n0 / n
    n1 = n - n0
    mass = min(hits / n1, 0.98)  # proposal's probability of a harmful outcome
    ph = np.exp(spread * g.standard_normal(HARMFUL))
    ph /= ph.sum()
    qh = np.full(HARMFUL, 1.0 / HARMFUL)
    if cluster:
        # 70% of P on 5 outcomes the proposal draws with probability 1/n per draw in all
        ph = np.r_[0.3 * P * ph, np.full(5, 0.7 * P / 5)]
        qh = np.r_[(mass - 1.0 / n) * qh, np.full(5, 1.0 / n / 5)]
    else:
        ph, qh = P * ph, mass * qh
    pb = np.full(HARMLESS, (1.0 - P) / HARMLESS)
    qb = np.exp(0.5 * g.standard_normal(HARMLESS))
    qb *= (1.0 - mass) / qb.sum()
    p, q = np.r_[ph, pb], np.r_[qh, qb]
    h = np.r_[np.ones(ph.size), np.zeros(HARMLESS)]
    log_w = np.log(p) - np.log(a0 * p + (1.0 - a0) * q)
    return World(p, q, h, log_w, a0, n, float(ph.sum()))


def draw(world: World, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One run: round(a0 n) draws from p, the rest from q; (log w, h, component)."""
    n0 = round(world.defensive * world.n)
    n1 = world.n - n0
    idx = np.r_[_sample(world.p, n0, rng), _sample(world.q, n1, rng)]
    comp = np.r_[np.zeros(n0, dtype=np.int64), np.ones(n1, dtype=np.int64)]
    return world.log_w[idx], world.h[idx], comp


def _sample(prob: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    c = np.cumsum(prob)
    return np.minimum(np.searchsorted(c, rng.random(k) * c[-1], side="right"), prob.size - 1)


def old_ci_high(log_w, h, comp, a0: float, confidence: float = CONFIDENCE) -> float:
    """tailmon's per-prompt ci_high before issue 16 item 1, for the width comparison: p_hat + z SE
    (stratified SE); zero hits: Clopper-Pearson's upper end from the round(a0 n) target draws;
    fewer than 5 hits: at least Clopper-Pearson on sum(a0 w h) out of n, over a0."""
    wh = np.exp(log_w) * h
    n = wh.size
    tail = (1.0 - confidence) / 2.0
    if not (wh > 0).any():
        n0 = round(a0 * n)
        return float(-math.expm1(math.log(tail) / n0)) if n0 else 1.0
    se2 = 0.0
    for j in np.unique(comp):
        v = wh[comp == j]
        se2 += v.size * (float(np.var(v, ddof=1)) if v.size > 1 else float(np.var(wh, ddof=1)))
    hi = min(1.0, float(wh.mean()) + stats.norm.ppf(1 - tail) * math.sqrt(se2) / n)
    if float(h[wh > 0].sum()) < 5:
        if a0 == 0:
            return 1.0
        s = min(float(np.sum(a0 * wh)), float(n))
        hi = max(hi, min(1.0, float(stats.beta.ppf(1 - tail, s + 1, n - s)) / a0 if s < n else 1.0))
    return hi


def run_cell(world: World, reps: int, rng: np.random.Generator, *, old: bool = True) -> dict:
    """R runs of `importance_sampling` on one world: miss rates, reliability, widths."""
    from tailmon.estimators import importance_sampling

    P = world.P
    miss = rel = miss_rel = 0
    high, high_rel, high_old, cons = [], [], [], []
    miss_old = 0
    for _ in range(reps):
        log_w, h, comp = draw(world, rng)
        e = importance_sampling(log_w, h, comp, defensive=world.defensive, confidence=CONFIDENCE)
        miss += e.ci_high < P
        high.append(e.ci_high / P)
        cons.append(e.ci_high_conservative / P)
        if e.reliable:
            rel += 1
            miss_rel += e.ci_high < P
            high_rel.append(e.ci_high / P)
        if old:
            o = old_ci_high(log_w, h, comp, world.defensive)
            miss_old += o < P
            high_old.append(o / P)
    row = {"P": P, "reps": reps, "miss": miss / reps, "reliable": rel / reps,
           "miss_reliable": (miss_rel / rel) if rel else None, "n_reliable": rel,
           "miss_and_reliable": miss_rel / reps,
           "median_high_over_P": float(np.median(high)),
           "median_high_over_P_reliable": float(np.median(high_rel)) if high_rel else None,
           "median_conservative_over_P": float(np.median(cons))}
    if old:
        row.update(miss_old=miss_old / reps, median_high_over_P_old=float(np.median(high_old)))
    return row


def cells(quick: bool) -> list[dict]:
    out = [{"spread": s, "hits": k, "defensive": a0, "cluster": False}
           for s in SPREADS for k in HITS for a0 in DEFENSIVE]
    out += [{"spread": 0.5, "hits": k, "defensive": 0.1, "cluster": True} for k in CLUSTER_HITS]
    if quick:
        out = [c for c in out if c["defensive"] == 0.1]
    return out


def main() -> int:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from common import Run, markdown_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=1000, help="simulated runs per cell")
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--quick", action="store_true", help="defensive share 0.1 only")
    args = ap.parse_args()
    grid = cells(args.quick)
    run = Run("intervals", "coverage and width of the per-prompt IS interval under skewed weights (known P)",
              seed=args.seed, settings={"reps": args.reps, "n": N, "P": P_TRUE, "harmful_outcomes": HARMFUL,
                                        "confidence": CONFIDENCE, "cells": grid})
    results = []
    for i, c in enumerate(grid):
        started = time.time()
        world = make_world(c["spread"], c["hits"], c["defensive"], cluster=c["cluster"])
        row = {**c, **run_cell(world, args.reps, np.random.default_rng(args.seed + i))}
        row["se_miss"] = math.sqrt(max(row["miss"] * (1 - row["miss"]), 1 / args.reps) / args.reps)
        results.append(row)
        print(f"spread {c['spread']} hits {c['hits']} a0 {c['defensive']} cluster {c['cluster']}: miss {row['miss']:.3f} "
              f"reliable {row['reliable']:.2f} miss|reliable {row['miss_reliable']} old miss {row['miss_old']:.3f} "
              f"({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    cols = ["spread", "hits", "defensive", "cluster", "miss", "reliable", "miss_reliable", "n_reliable",
            "median_high_over_P_reliable", "median_conservative_over_P", "miss_old", "median_high_over_P_old",
            "median_high_over_P"]
    summary = [{k: r[k] for k in cols} for r in results]
    notes = ("miss: P(ci_high < P) over all runs (nominal 0.025; the conservative bound counts where the estimate "
             "is flagged unreliable); reliable: share of runs flagged reliable; miss_reliable: the miss rate among "
             "them (n_reliable runs); median_high_over_P_reliable: median ci_high/P among reliable runs; "
             "median_conservative_over_P: median of the conservative bound over P; miss_old and "
             "median_high_over_P_old: the interval before issue 16 item 1 on the same draws; "
             "median_high_over_P: median ci_high/P over all runs (unreliable ones at their conservative bound). "
             "se_miss in results: the binomial standard error of miss.")
    path = run.write(summary=summary, results=results, notes=notes)
    print(markdown_table(summary, cols, {"miss": ".3f", "reliable": ".2f", "miss_reliable": ".3f",
                                         "median_high_over_P_reliable": ".2f", "median_conservative_over_P": ".3g",
                                         "miss_old": ".3f", "median_high_over_P_old": ".2f",
                                         "median_high_over_P": ".3g"}))
    print(f"written: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
