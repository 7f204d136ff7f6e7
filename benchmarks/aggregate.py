"""Coverage of the aggregate interval over prompts (issue 16, item 2): how often `ci_high` of the
mean harm probability falls below the true population mean, when risk is uneven over prompts.

A simulation with a known answer, no model. Per-prompt probabilities P(x) are drawn from a
population whose mean is known exactly:

    ln1, ln2    log-normal, sd 1 or 2 in natural log (DESIGN's typical spreads)
    mix         two levels: 10% of prompts at 1e-3, 90% at 1e-5 (a parametric log-normal
                assumption does not hold)
    pareto      1e-5 * (1 + Pareto(2.5)): a heavier, power-law tail

Each prompt is then estimated as an importance-sampling run would: n = 300 draws from a proposal
under which a harmful response has probability q = min(0.5, 1000 P) (a good proposal: 1e-4 becomes
a 10% hit rate), k ~ Binomial(n, q) hits, each of weight P/q (so the estimate k P / (n q) is
unbiased), through the production `tailmon.estimators.importance_sampling` (defensive share 0.1),
so prompts with few or no hits (reported as upper bounds) and within-prompt noise are in. The m
per-prompt estimates then go through:

    normal       the interval before issue 16: mean +- z SE, SE^2 = max(between, within)/m,
                 without the carried bounds
    t            the same with a Student t quantile
    percentile   a percentile bootstrap over prompts
    bootstrap_t  the production bootstrap-t over prompts (`aggregate._bootstrap_t`)
    lognormal    the production log-normal profile likelihood (`aggregate._lognormal_profile`)
    union        the higher of the two (the bootstrap-t alone below 20 prompts, the normal
                 interval below 10): the production interval before the carried bounds
    shipped      `tailmon.estimators.aggregate` itself: the union, then at least the mean of the
                 unreliable prompts' ci_high and the other prompts' p_hat

Reported: P(ci_high < true mean), one-sided, nominal 2.5% (the upper end of a two-sided 95%
interval), per scenario and number of prompts m; with the binomial standard error of each rate,
the median ci_high / true mean, and how often the shipped aggregate was flagged reliable (and its
misses among those runs). `union` is the figure a user gets when every prompt is reliable;
`shipped` adds the conservative bounds of this simulation's unreliable (few-hit) prompts.

    python benchmarks/aggregate.py [--reps 1000] [--boot 1000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

from common import Run, markdown_table

from tailmon.estimators import aggregate, importance_sampling
from tailmon.estimators.aggregate import BOOTSTRAP_MIN_PROMPTS, MIN_PROMPTS, _bootstrap_t, _lognormal_profile

N = 300
BOOST = 1000.0
MAX_HIT_RATE = 0.5
DEFENSIVE = 0.1
CONFIDENCE = 0.95
SCENARIOS = ("ln1", "ln2", "mix", "pareto")
PROMPTS = (6, 20, 50, 100)
METHODS = ("normal", "t", "percentile", "bootstrap_t", "lognormal", "union", "shipped")


def population(name: str, m: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """m per-prompt probabilities and the population's exact mean."""
    if name in ("ln1", "ln2"):
        sd = float(name[2:])
        return np.exp(rng.normal(math.log(1e-4), sd, m)), 1e-4 * math.exp(sd * sd / 2)
    if name == "mix":
        return np.where(rng.random(m) < 0.1, 1e-3, 1e-5), 0.1 * 1e-3 + 0.9 * 1e-5
    if name == "pareto":
        a = 2.5
        return 1e-5 * (1 + rng.pareto(a, m)), 1e-5 * a / (a - 1)
    raise ValueError(name)


def estimate(p: float, rng: np.random.Generator):
    q = min(MAX_HIT_RATE, p * BOOST)
    k = int(rng.binomial(N, q))
    h = np.zeros(N)
    h[:k] = 1.0
    log_w = np.zeros(N)
    log_w[:k] = math.log(p / q)  # every hit weighs P/q: E[k/n * P/q] = P, unbiased
    return importance_sampling(log_w, h, defensive=DEFENSIVE, confidence=CONFIDENCE)


def alternatives(ests, rng: np.random.Generator, boot: int) -> dict[str, float]:
    p = np.array([e.p_hat for e in ests])
    se = np.array([e.std_error for e in ests])
    m = p.size
    mean = float(p.mean())
    s = math.sqrt(max(float(p.var(ddof=1)), float((se * se).mean())) / m)
    alpha = (1 - CONFIDENCE) / 2
    out = {"normal": mean + stats.norm.ppf(1 - alpha) * s, "t": mean + stats.t.ppf(1 - alpha, m - 1) * s}
    idx = rng.integers(0, m, (boot, m))
    out["percentile"] = float(np.quantile(p[idx].mean(axis=1), 1 - alpha))
    out["bootstrap_t"] = _bootstrap_t(p, se, CONFIDENCE)[1]
    fit = _lognormal_profile(ests, CONFIDENCE)
    out["lognormal"] = fit[1] if fit is not None else math.nan  # None: fewer than 3 prompts with a hit
    # the production union: the log-normal part only from MIN_PROMPTS prompts on
    sample = out["bootstrap_t"] if m >= BOOTSTRAP_MIN_PROMPTS else out["normal"]
    out["union"] = max(sample, fit[1] if fit is not None and m >= MIN_PROMPTS else -math.inf)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=1000, help="simulated runs per cell")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per run")
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS), help="numbers of prompts m")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS,
                    help="populations to simulate (a long replication of one cell: --scenarios pareto --prompts 50)")
    ap.add_argument("--output", default=None, help="results file (default results/aggregate.json)")
    args = ap.parse_args()
    run = Run("aggregate", "coverage of the aggregate interval over prompts (known population mean)",
              seed=args.seed, settings={"reps": args.reps, "boot": args.boot, "n": N, "boost": BOOST, "max_hit_rate": MAX_HIT_RATE,
                                        "defensive": DEFENSIVE, "confidence": CONFIDENCE,
                                        "scenarios": args.scenarios, "prompts": args.prompts})
    rng = np.random.default_rng(args.seed)
    results = []
    for name in args.scenarios:
        for m in args.prompts:
            started = time.time()
            misses = dict.fromkeys(METHODS, 0)
            ratio = {k: [] for k in METHODS}
            n_reliable = miss_reliable = n_top = n_fit = 0
            for _ in range(args.reps):
                ps, true = population(name, m, rng)
                ests = [estimate(p, rng) for p in ps]
                agg = aggregate(ests, confidence=CONFIDENCE)
                highs = {"shipped": agg.ci_high, **alternatives(ests, rng, args.boot)}
                n_fit += math.isfinite(highs["lognormal"])
                n_reliable += agg.reliable
                miss_reliable += agg.reliable and agg.ci_high < true
                n_top += agg.top_share is not None and agg.top_share > 0.5
                for k, v in highs.items():
                    if math.isnan(v):
                        continue
                    misses[k] += v < true
                    ratio[k].append(v / true)
            row = {"scenario": name, "prompts": m, "reliable": n_reliable / args.reps,
                   "miss_when_reliable": miss_reliable / n_reliable if n_reliable else None,
                   "top_share_over_half": n_top / args.reps, "lognormal_fitted": n_fit / args.reps}
            for k in METHODS:
                count = len(ratio[k])
                rate = misses[k] / count if count else math.nan
                row[f"miss_{k}"] = rate
                row[f"se_{k}"] = math.sqrt(max(rate * (1 - rate), 1 / count) / count) if count else math.nan
                row[f"median_high_over_P_{k}"] = float(np.median(ratio[k])) if count else math.nan
            results.append(row)
            print(f"{name:7s} m={m:3d}  " + "  ".join(f"{k} {row[f'miss_{k}']:.3f}" for k in METHODS)
                  + f"  reliable {row['reliable']:.2f} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    summary = [{"scenario": r["scenario"], "prompts": r["prompts"],
                **{k: r[f"miss_{k}"] for k in METHODS},
                "union_high_over_P": r["median_high_over_P_union"],
                "shipped_high_over_P": r["median_high_over_P_shipped"],
                "reliable": r["reliable"]} for r in results]
    notes = ("P(ci_high < true mean) of the aggregate interval (nominal 0.025, one-sided end of a two-sided "
             "95% interval). normal: the interval before issue 16 (normal quantile, variance max(between, "
             "within)/m) without the carried bounds; bootstrap_t and lognormal: the two halves of the production "
             "interval; union: their higher upper end (what the aggregate reports when every prompt is "
             "reliable); shipped: tailmon.estimators.aggregate itself, with the unreliable prompts' ci_high "
             "carried. *_high_over_P: median ci_high / true mean. reliable: share of runs the shipped "
             "aggregate flagged reliable (miss_when_reliable in results). The binomial SE of each rate is in "
             "results (se_*).")
    path = run.write(summary=summary, results=results, notes=notes,
                     out=Path(args.output) if args.output else None)
    print(markdown_table(summary, ["scenario", "prompts", *METHODS, "union_high_over_P", "shipped_high_over_P",
                                   "reliable"],
                         {**{k: ".3f" for k in METHODS}, "union_high_over_P": ".3g", "shipped_high_over_P": ".3g",
                          "reliable": ".2f"}))
    print(f"written: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
