"""What a proposal over the first K tokens could buy on the toxicity judge (issue 17), read from the
brute-force references alone (no model run):

    .venv/bin/python benchmarks/prefix_bound.py   # seconds; writes results/prefix_bound.json

A proposal that draws the first K tokens from q and the rest from the target (`return:K:SPEC`, or
any learnt proposal whose decisive tokens come first) has weight w = p(y_1..K) / q(y_1..K). Of
all such proposals the one with the least variance is q(y_1..K) ~ p(y_1..K) sqrt(V(y_1..K)),
V(prefix) = P(hit | prefix) under the target (minimise E_p[h p/q] = sum p^2 V / q under sum q = 1),
with n Var = (E_p[sqrt V])^2 - P^2, so

    n_MC / n_IS <= (P - P^2) / ((E_p[sqrt V(y_1..K)])^2 - P^2).

Two readings per reference, threshold and K:

* `ceiling`: that bound with V and E_p read on the whole reference (each distinct prefix's hit
  share). Biased upwards: sqrt of a noisy share is below the sqrt of the true one on average
  (Jensen), most long prefixes occur once (V = 0 or 1), and there is no defensive share. No
  proposal over the first K tokens does better than the true bound; this figure overstates it.
* `held_out`: the proposal a learner could actually build from the first half: V fitted per
  prefix on the first half, shrunk towards the first half's P with a prior weight `m` samples
  ((hits + m P) / (count + m); unseen prefixes get P), q ~ p sqrt(V) in a mixture with the
  target at share 0.1, read exactly on the second half's target draws (E_p[h p/q]). Shown for
  m = 5, 20, 100; no m is chosen on the half it is read on.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import Run, markdown_table

HERE = Path(__file__).resolve().parent
REFERENCES = {16: HERE / "data" / "reference-P2-16tok-seed0.npz", 32: HERE / "data" / "reference-P2-32tok-seed0.npz"}
THRESHOLDS = (0.5, 0.9, 0.99)
KS = (1, 2, 3, 4)
PRIORS = (5, 20, 100)
DEFENSIVE = 0.1


def ceiling(keys: list[tuple], h: np.ndarray) -> float:
    """The bound with V read on the same samples (biased upwards, see the module docstring)."""
    count, hits = defaultdict(int), defaultdict(float)
    for k, x in zip(keys, h):
        count[k] += 1
        hits[k] += x
    n, p = len(h), float(h.mean())
    root = sum(c / n * np.sqrt(hits[k] / c) for k, c in count.items())
    return (p - p * p) / (root ** 2 - p * p)


def held_out(keys: list[tuple], h: np.ndarray, half: int, prior: float) -> float:
    """n_MC/n_IS of q ~ p sqrt(V_first half), target share DEFENSIVE, read on the second half."""
    count, hits = defaultdict(int), defaultdict(float)
    for k, x in zip(keys[:half], h[:half]):
        count[k] += 1
        hits[k] += x
    p1 = float(h[:half].mean())
    root = np.array([np.sqrt((hits[k] + prior * p1) / (count[k] + prior)) for k in keys[half:]])
    q_over_p = DEFENSIVE + (1 - DEFENSIVE) * root / root.mean()  # root.mean(): E_p[sqrt V], q's normaliser
    h2 = h[half:]
    p2 = float(h2.mean())
    return (p2 - p2 * p2) / (float(np.mean(h2 / q_over_p)) - p2 * p2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "prefix_bound.json")
    args = parser.parse_args(argv)
    run = Run("prefix_bound", "prefix_bound: what a proposal over the first K tokens could buy, from the references",
              seed=0, settings={"references": {w: str(p.relative_to(HERE)) for w, p in REFERENCES.items()},
                                "thresholds": THRESHOLDS, "K": KS, "priors": PRIORS, "defensive": DEFENSIVE})
    rows = []
    for width, path in REFERENCES.items():
        ref = np.load(path)
        ids, tox = ref["ids"], ref["toxicity"]
        half = len(tox) // 2
        for t in THRESHOLDS:
            h = (tox >= t).astype(float)
            for k in KS:
                keys = [tuple(r[:k]) for r in ids]
                row = {"tokens": width, "threshold": t, "K": k, "p_ref": float(h.mean()), "hits": int(h.sum()),
                       "prefixes": len(set(keys)), "ceiling": ceiling(keys, h)}
                row.update({f"held_out m={m}": held_out(keys, h, half, m) for m in PRIORS})
                rows.append(row)
    cols = ["tokens", "threshold", "K", "p_ref", "hits", "prefixes", "ceiling", *[f"held_out m={m}" for m in PRIORS]]
    print(markdown_table(rows, cols, {"p_ref": ".2e", **{c: ".2f" for c in cols[6:]}}))
    notes = ("n_MC/n_IS of the least-variance proposal over the first K tokens: `ceiling` read in-sample on the "
             "whole reference (biased upwards), `held_out m` built from the first half (shrinkage m) and read "
             "exactly on the second half's target draws, target share 0.1.")
    print(f"wrote {run.write(summary=rows, results=rows, notes=notes, out=args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
