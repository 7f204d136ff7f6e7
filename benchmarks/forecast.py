"""Coverage of the worst-query forecast (issue 16, item 4): how often its interval holds the true
largest per-query harm probability among V queries, where its tail model holds and where it does
not.

A simulation with a known answer, no model. The m prompts' P(x) come from a population whose
(1 - 1/V) quantile (the forecast's target: the harm probability the worst of V queries reaches)
is known exactly:

    exp        psi = -log(-log P) = -3 + Exponential(rate 5): the forecast's tail model holds
               exactly (log S linear in psi above any threshold)
    gumbel     psi ~ Gumbel(-3, 0.2): the model holds asymptotically (S(psi) ~ exp(-(psi+3)/0.2))
    lognormal  log10 P ~ N(-6, 1) (the issue's example): the model does not hold; the fit
               over-predicts (arXiv 2605.15134)

For each cell (scenario, m prompts, volume V) and repeat, `tailmon.estimators.worst_query_forecast`
runs on the exact P(x) of the prompts (no within-prompt noise: the tail model alone is tested).
Reported: the share of repeats where it reports a forecast at all (>= 10 points in the top
quarter), P(ci_high < truth) and P(ci_low > truth) (nominal 0.025 each, the ends of a two-sided
95% interval), the median of log10(forecast / truth), and the same median for the forecast before
issue 16 (least squares of log S on the top max(3, m/4) scores, no interval), for comparison.

    python benchmarks/forecast.py [--reps 2000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
from scipy import stats

from common import Run, markdown_table

from tailmon.estimators import worst_query_forecast

SCENARIOS = ("exp", "gumbel", "lognormal")
PROMPTS = (20, 40, 100, 400)
VOLUMES = (1e4, 1e6)
CONFIDENCE = 0.95


def population(name: str, m: int, rng: np.random.Generator) -> np.ndarray:
    if name == "exp":
        psi = -3.0 + rng.exponential(1 / 5.0, m)
    elif name == "gumbel":
        psi = rng.gumbel(-3.0, 0.2, m)
    elif name == "lognormal":
        return 10.0 ** rng.normal(-6.0, 1.0, m)
    else:
        raise ValueError(name)
    return np.exp(-np.exp(-psi))


def truth(name: str, volume: float) -> float:
    """The population's (1 - 1/volume) quantile of P."""
    if name == "exp":
        psi = -3.0 + math.log(volume) / 5.0
    elif name == "gumbel":
        psi = -3.0 - 0.2 * math.log(-math.log1p(-1.0 / volume))
    else:
        return 10.0 ** (-6.0 + stats.norm.isf(1.0 / volume))
    return math.exp(-math.exp(-psi))


def least_squares(p: np.ndarray, volume: float) -> float | None:
    """The forecast before issue 16: log S = a + b psi by least squares on the top max(3, m/4)."""
    m = p.size
    positive = np.sort(p[p > 0])[::-1]
    if positive.size < 3:
        return None
    k = min(positive.size, max(3, math.ceil(0.25 * m)))
    psi = -np.log(-np.log(np.minimum(positive[:k], np.nextafter(1.0, 0.0))))
    slope, intercept = np.polyfit(psi, np.log(np.arange(1, k + 1) / m), 1)
    if not slope < 0:
        return None
    return math.exp(-math.exp(-(math.log(1.0 / volume) - intercept) / slope))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2000, help="simulated runs per cell")
    ap.add_argument("--seed", type=int, default=20261207)
    args = ap.parse_args()
    run = Run("forecast", "coverage of the worst-query forecast (known tail quantile)", seed=args.seed,
              settings={"reps": args.reps, "scenarios": SCENARIOS, "prompts": PROMPTS, "volumes": VOLUMES,
                        "confidence": CONFIDENCE, "top_fraction": 0.25, "min_points": 10})
    rng = np.random.default_rng(args.seed)
    results = []
    for name in SCENARIOS:
        for v in VOLUMES:
            true = truth(name, v)
            for m in PROMPTS:
                started = time.time()
                fitted = high = low = 0
                err, err_old = [], []
                for _ in range(args.reps):
                    p = population(name, m, rng)
                    old = least_squares(p, v)
                    if old is not None and old > 0:
                        err_old.append(math.log10(old / true))
                    f = worst_query_forecast(p, v, confidence=CONFIDENCE)
                    if f is None:
                        continue
                    fitted += 1
                    high += f["ci_high"] < true
                    low += f["ci_low"] > true
                    err.append(math.log10(f["p"] / true) if f["p"] > 0 else -math.inf)
                row = {"scenario": name, "volume": v, "prompts": m, "true_log10": math.log10(true),
                       "fitted": fitted / args.reps,
                       "miss_high": high / fitted if fitted else None, "miss_low": low / fitted if fitted else None,
                       "median_log10_error": float(np.median(err)) if err else None,
                       "median_log10_error_before": float(np.median(err_old)) if err_old else None,
                       "p05_log10_error_before": float(np.quantile(err_old, 0.05)) if err_old else None,
                       "p95_log10_error_before": float(np.quantile(err_old, 0.95)) if err_old else None}
                results.append(row)
                print(f"{name:9s} V={v:.0e} m={m:3d} fitted {row['fitted']:.2f} high {row['miss_high']} "
                      f"low {row['miss_low']} err {row['median_log10_error']} before {row['median_log10_error_before']}"
                      f" ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    cols = ["scenario", "volume", "prompts", "true_log10", "fitted", "miss_high", "miss_low", "median_log10_error",
            "median_log10_error_before"]
    summary = [{c: r[c] for c in cols} for r in results]
    notes = ("miss_high = P(ci_high < true (1 - 1/V) quantile of P), miss_low = P(ci_low > truth), nominal 0.025 "
             "each, among the repeats with a forecast (fitted: their share; None below 10 points in the top "
             "quarter, i.e. m < 40). median_log10_error: median log10(forecast / truth); _before: the least-squares "
             "forecast before issue 16 (fitted from 3 points on), with its 5-95% range in results.")
    path = run.write(summary=summary, results=results, notes=notes)
    print(markdown_table(summary, cols, {"volume": ".0e", "true_log10": ".2f", "fitted": ".2f", "miss_high": ".3f",
                                         "miss_low": ".3f", "median_log10_error": ".2f",
                                         "median_log10_error_before": ".2f"}))
    print(f"written: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
