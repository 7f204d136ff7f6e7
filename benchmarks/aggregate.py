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
so prompts with few or no hits (reported as upper bounds) and within-prompt noise are in. The m per-prompt estimates go
through the production `tailmon.estimators.aggregate` and three alternatives computed from the
same p_hat and standard errors: a Student t quantile, a percentile bootstrap over prompts, and a
bootstrap-t (studentized with the same variance rule as the production one).

Reported: P(ci_high < true mean), one-sided, nominal 2.5% (the upper end of a two-sided 95%
interval), per scenario and number of prompts m; with the binomial standard error of each rate.

    python benchmarks/aggregate.py [--reps 1000] [--boot 1000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
from scipy import stats

from common import Run, markdown_table

from tailmon.estimators import aggregate, importance_sampling

N = 300
BOOST = 1000.0
MAX_HIT_RATE = 0.5
DEFENSIVE = 0.1
CONFIDENCE = 0.95
SCENARIOS = ("ln1", "ln2", "mix", "pareto")
PROMPTS = (6, 20, 50, 100)
METHODS = ("production", "t", "percentile", "bootstrap_t")


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


def alternatives(p: np.ndarray, se: np.ndarray, rng: np.random.Generator, boot: int) -> dict[str, float]:
    m = p.size
    mean = float(p.mean())
    s = math.sqrt(max(float(p.var(ddof=1)), float((se * se).mean())) / m)
    alpha = (1 - CONFIDENCE) / 2
    out = {"t": mean + stats.t.ppf(1 - alpha, m - 1) * s}
    idx = rng.integers(0, m, (boot, m))
    pb, seb = p[idx], se[idx]
    means = pb.mean(axis=1)
    out["percentile"] = float(np.quantile(means, 1 - alpha))
    sb = np.sqrt(np.maximum(pb.var(axis=1, ddof=1), (seb * seb).mean(axis=1)) / m)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sb > 0, (means - mean) / sb, 0.0)
    out["bootstrap_t"] = mean - float(np.quantile(t, alpha)) * s
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=1000, help="simulated runs per cell")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per run")
    ap.add_argument("--seed", type=int, default=20261207)
    args = ap.parse_args()
    run = Run("aggregate", "coverage of the aggregate interval over prompts (known population mean)",
              seed=args.seed, settings={"reps": args.reps, "boot": args.boot, "n": N, "boost": BOOST, "max_hit_rate": MAX_HIT_RATE,
                                        "defensive": DEFENSIVE, "confidence": CONFIDENCE,
                                        "scenarios": SCENARIOS, "prompts": PROMPTS})
    rng = np.random.default_rng(args.seed)
    results = []
    for name in SCENARIOS:
        for m in PROMPTS:
            started = time.time()
            misses = dict.fromkeys(METHODS, 0)
            ratio = {k: [] for k in METHODS}
            for _ in range(args.reps):
                ps, true = population(name, m, rng)
                ests = [estimate(p, rng) for p in ps]
                highs = {"production": aggregate(ests, confidence=CONFIDENCE).ci_high}
                highs.update(alternatives(np.array([e.p_hat for e in ests]), np.array([e.std_error for e in ests]),
                                          rng, args.boot))
                for k, v in highs.items():
                    misses[k] += v < true
                    ratio[k].append(v / true)
            row = {"scenario": name, "prompts": m}
            for k in METHODS:
                rate = misses[k] / args.reps
                row[f"miss_{k}"] = rate
                row[f"se_{k}"] = math.sqrt(max(rate * (1 - rate), 1 / args.reps) / args.reps)
                row[f"median_high_over_P_{k}"] = float(np.median(ratio[k]))
            results.append(row)
            print(f"{name:7s} m={m:3d}  " + "  ".join(f"{k} {row[f'miss_{k}']:.3f}" for k in METHODS)
                  + f"  ({time.time() - started:.0f} s)", file=sys.stderr)
    summary = [{"scenario": r["scenario"], "prompts": r["prompts"],
                **{k: r[f"miss_{k}"] for k in METHODS}} for r in results]
    notes = ("P(ci_high < true mean) of the aggregate interval (nominal 0.025, one-sided end of a two-sided "
             "95% interval). production: tailmon.estimators.aggregate as it is (normal quantile, variance "
             "max(between, within)/m, no-hit prompts carry their bound). The binomial SE of each rate is in "
             "results (se_*); median_high_over_P_* is the median width of the upper end relative to the truth.")
    path = run.write(summary=summary, results=results, notes=notes)
    print(markdown_table(summary, ["scenario", "prompts", *METHODS], {k: ".3f" for k in METHODS}))
    print(f"written: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
