"""Evidence over runs (issue 20), the long grids: coverage of the pooled interval over series of
dependent runs with skewed weights, the change detector's false alarms and detection delay, and
the history baseline gate's false failures and power. Simulations with known answers, no model;
every figure comes from the product's own functions (`importance_sampling` per prompt, `pool`,
`aggregate`, `arm`/`detect`, `history_ratio_gate`).

The world. Per-prompt risk P(x) is log-normal over prompts (sd 1 in natural log around 1e-4, so
the population mean P_query = 1e-4 e^0.5 is known exactly). One prompt's run draws n = 300
samples in fixed counts, 30 from the target (defensive share a0 = 0.1) and 270 from a proposal
under which a response is harmful with probability Q = min(0.5, boost P(x)). Harmful outcomes are
indexed by z: the proposal draws z ~ N(0, 1), the target z ~ N(spread, 1), so the balance-heuristic
weight of a hit, P e / (a0 P e + (1 - a0) Q) with e = exp(spread z - spread^2 / 2), is exact and
log-normal with sd about `spread` among the proposal's hits (the skew of benchmarks/intervals.py);
harmless samples weigh (1 - P) / (a0 (1 - P) + (1 - a0)(1 - Q)). Every per-prompt estimate is
unbiased given its boost.

Runs are dependent as adaptive proposals make them: each run's boost aims at `target_hits` expected
hits at the level pooled over the runs before it (clipped to [100, 5000]), so a run that came out
low makes the next proposal more aggressive. Each run is unbiased given the past, which is what
the pooled interval rests on (estimators/pooling.py).

    coverage   per weight spread, series of 20 runs of 10 prompts; the pool of the first 5, 10
               and 20 runs (`pool`): P(ci_high < P_query), P(ci_low > P_query), P(bound_only),
               the pooled width over the median single run's (`aggregate` of one run), and the
               single runs' own miss rate.
    detector   a reference pooled from 4 runs of 20 prompts and armed as the daemon arms it
               (`arm`, factor 2); then 100 runs at unchanged risk (false alarms at alpha 0.01 and
               0.001 against the guarantee alpha T), and runs at 1.5x, 2x and 4x the risk
               (detection delay, runs after arming; undetected within 100 runs counts as > 100).
    gate       `history_ratio_gate` with the history pooled from 5 adaptive runs of 10 prompts
               and a candidate of 30 prompts at a true ratio R (its false failures, at most
               1 - confidence = 5%) and 2R (its power).

    python benchmarks/pooling.py [--series 30] [--detector-series 100] [--gate-checks 60]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from common import Run, markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pooling_support import A0 as _SUPPORT_A0, N_PER_PROMPT, skewed_draws  # noqa: E402  (the simulated world)

from tailmon.check.gate import history_ratio_gate, unreliable_estimates
from tailmon.estimators import aggregate, importance_sampling
from tailmon.estimators.pooling import arm, detect, pool

N = N_PER_PROMPT
A0 = _SUPPORT_A0
N0 = round(A0 * N)
N1 = N - N0
MU = math.log(1e-4)


def p_query(sd_p: float) -> float:
    """The population mean of a log-normal P(x) with median 1e-4 and log-sd `sd_p`."""
    return math.exp(MU + sd_p ** 2 / 2)


MAX_BOOST = 5000.0  # the best proposal: a 1e-4 prompt becomes a 50% hit rate (the cap on Q)
CONFIDENCE = 0.95
FACTOR = 2.0  # the detector's configured factor (HistorySettings' default)
REFERENCE_RUNS = 4
LOOKS = 100
ALPHAS = (0.01, 0.001)
RISES = (1.5, 2.0, 4.0)
# (weight spread, target hits a run's proposal aims at per prompt, log-sd of P(x) over prompts,
# cluster): the skews 0.5-2 at 40 hits (and 1 at 10) over prompts of sd 1, where most per-prompt
# estimates are flagged and the pool calibrates them (`pool`); equal-weight hits as a control;
# prompts of sd 0.5 at 150 hits, mostly reliable on their own; and half of P in a cluster of heavy
# weights the proposal draws 1, 0.1 or 0.02 times a run (the pool must then be a bound, unless
# the cluster was never drawn: mass never drawn is beyond any interval)
_NO = (0.0, 0.0)
COVERAGE_CELLS = ((0.0, 40.0, 1.0, _NO), (0.5, 40.0, 1.0, _NO), (1.0, 40.0, 1.0, _NO), (1.5, 40.0, 1.0, _NO),
                  (2.0, 40.0, 1.0, _NO), (1.0, 10.0, 1.0, _NO), (0.0, 150.0, 0.5, _NO), (0.5, 150.0, 0.5, _NO),
                  (1.0, 40.0, 1.0, (0.5, 1.0)), (1.0, 40.0, 1.0, (0.5, 0.1)), (1.0, 40.0, 1.0, (0.5, 0.02)))
# (weight spread, proposal boost, log-sd of P(x)) of the detector's reference and looks: skewed
# weights, and equal-weight hits (a reference that can be reliable, so the detector can bet)
DETECTOR_CELLS = ((0.5, MAX_BOOST, 0.5), (1.0, MAX_BOOST, 1.0), (0.0, MAX_BOOST, 0.5))
GATE_CELLS = ((0.5, 150.0, 0.5), (1.0, 40.0, 1.0), (0.0, 150.0, 0.5))
PREFIXES = (5, 10, 20)
MAX_RATIO = 1.5


def draw_prompts(p: np.ndarray, boost: float, spread: float, rng: np.random.Generator, cluster=(0.0, 0.0)):
    """log-weights and harm scores of one run over prompts with risks `p`: arrays of shape (m, N)
    (the module doc's world, drawn by the tests' `pooling_support.skewed_draws`). `cluster` =
    (share, draws): that share of each prompt's P sits in a cluster of harmful outcomes the
    proposal draws `draws` times per run on average (a mass of heavy weights it rarely finds)."""
    return skewed_draws(p, boost, spread, rng, cluster)


COMPONENT = np.r_[np.zeros(N0, dtype=np.int64), np.ones(N1, dtype=np.int64)]


def run_estimates(p, boost, spread, rng, cluster=(0.0, 0.0)):
    """One run's per-prompt estimates, through the production `importance_sampling`."""
    log_w, h = draw_prompts(np.asarray(p, dtype=np.float64), boost, spread, rng, cluster)
    return [importance_sampling(log_w[i], h[i], COMPONENT, defensive=A0, confidence=CONFIDENCE)
            for i in range(h.shape[0])]


def run_means(p, boost, spread, rng):
    """Run-level p_hat (mean over prompts of mean(w h)) for rows of prompts `p` (runs x m), the
    same figure `importance_sampling` gives, without its intervals: the detector reads nothing
    else of the runs it judges."""
    out = []
    for row in p:
        log_w, h = draw_prompts(row, boost, spread, rng)
        out.append(float(np.mean(np.exp(log_w) * h)))
    return np.array(out)


def prompts(rng, m, sd_p, mult=1.0):
    return np.exp(rng.normal(MU, sd_p, m)) * mult


def next_boost(level: float, target_hits: float) -> float:
    return float(np.clip(target_hits / (N1 * max(level, 1e-7)), 100.0, MAX_BOOST))


def adaptive_series(rng, runs, m, spread, target_hits, sd_p, mult=1.0, cluster=(0.0, 0.0)):
    """Runs whose proposal each aims at `target_hits` at the level pooled over the runs before it
    (the first at the population mean): dependent runs, each unbiased given the past."""
    out, boost = [], next_boost(p_query(sd_p), target_hits)
    for _ in range(runs):
        out.append(run_estimates(prompts(rng, m, sd_p, mult), boost, spread, rng, cluster))
        boost = next_boost(float(np.mean([e.p_hat for r in out for e in r])), target_hits)
    return out


def _rate(k: int, n: int) -> dict:
    r = k / n if n else math.nan
    return {"rate": r, "se": math.sqrt(max(r * (1 - r), 1 / n) / n) if n else math.nan}


def _finite(x) -> float | None:
    """None for a delay beyond the looks (JSON has no infinity)."""
    return float(x) if math.isfinite(x) else None


def coverage(spread: float, target_hits: float, sd_p: float, cluster, series: int, m: int, rng) -> list[dict]:
    truth = p_query(sd_p)
    acc = {t: {"high": 0, "low": 0, "bound": 0, "rel": 0, "high_rel": 0, "both_rel": 0, "width": [], "upper": []}
           for t in PREFIXES}
    single_miss = single_n = 0
    for _ in range(series):
        runs = adaptive_series(rng, max(PREFIXES), m, spread, target_hits, sd_p, cluster=cluster)
        singles = [aggregate(r, confidence=CONFIDENCE) for r in runs]
        single_miss += sum(a.ci_high < truth for a in singles)
        single_n += len(singles)
        for t in PREFIXES:
            pl = pool(runs[:t], CONFIDENCE)
            a = acc[t]
            a["high"] += pl.ci_high < truth
            a["low"] += pl.ci_low > truth
            a["bound"] += pl.bound_only
            if not pl.bound_only:
                a["rel"] += 1
                a["high_rel"] += pl.ci_high < truth
                a["both_rel"] += pl.ci_low <= truth <= pl.ci_high
            single_width = float(np.median([s.ci_high - s.ci_low for s in singles[:t]]))
            a["width"].append((pl.ci_high - pl.ci_low) / single_width)
            a["upper"].append(pl.ci_high / truth)
    rows = []
    for t in PREFIXES:
        a = acc[t]
        high, low = _rate(a["high"], series), _rate(a["low"], series)
        rows.append({"section": "coverage", "spread": spread, "target_hits": target_hits, "sd_p": sd_p,
                     "cluster": f"{cluster[0]:g} @ {cluster[1]:g}" if cluster[0] else "-", "runs": t,
                     "prompts": t * m, "series": series,
                     "miss_high": high["rate"], "se_miss_high": high["se"],
                     "miss_low": low["rate"], "se_miss_low": low["se"],
                     "miss_interval": (a["high"] + a["low"]) / series,
                     "bound_only": a["bound"] / series, "n_reliable": a["rel"],
                     "miss_high_reliable": a["high_rel"] / a["rel"] if a["rel"] else None,
                     "cover_reliable": a["both_rel"] / a["rel"] if a["rel"] else None,
                     "width_vs_single": float(np.median(a["width"])),
                     "upper_over_P": float(np.median(a["upper"])),
                     "single_run_miss_high": single_miss / single_n})
    return rows


def reference(rng, spread, boost, sd_p, m=20):
    """A reference armed as the daemon arms it (estimation/history._reference): the pool of its
    runs and their run-level p_hat, bet for a FACTOR-fold rise."""
    history = [run_estimates(prompts(rng, m, sd_p), boost, spread, rng) for _ in range(REFERENCE_RUNS)]
    return arm(pool(history, CONFIDENCE), [float(np.mean([e.p_hat for e in r])) for r in history], FACTOR)


def detector(spread: float, boost: float, sd_p: float, series: int, m: int, rng) -> list[dict]:
    false = {a: [] for a in ALPHAS}
    delays = {(k, a): [] for k in RISES for a in ALPHAS}
    covered, betting = 0, []
    for _ in range(series):
        ref = reference(rng, spread, boost, sd_p, m)
        covered += ref.upper >= p_query(sd_p)
        betting.append(ref.bet > 0.0)

        def make(a, b, ref=ref):  # re-arming is not measured: only the first alarm counts
            return ref
        null = run_means(prompts(rng, LOOKS * m, sd_p).reshape(LOOKS, m), boost, spread, rng)
        for alpha in ALPHAS:
            false[alpha].append(bool(detect(null, alpha, REFERENCE_RUNS, make, initial=ref).alarms))
        for k in RISES:
            risen = run_means(prompts(rng, LOOKS * m, sd_p, k).reshape(LOOKS, m), boost, spread, rng)
            for alpha in ALPHAS:
                d = detect(risen, alpha, REFERENCE_RUNS, make, initial=ref)
                delays[(k, alpha)].append(d.alarms[0] + 1 if d.alarms else math.inf)
    rows = []
    # a reference with bet 0 has e = 1 every run, so R_t = t and it alarms at run 1/alpha whatever
    # the data (see the README): the delays are also given among the references that bet
    bet = np.array(betting)
    for alpha in ALPHAS:
        fa = _rate(sum(false[alpha]), series)
        fa_bet = _rate(int(np.sum(np.array(false[alpha]) & bet)), int(bet.sum()))
        row = {"section": "detector", "spread": spread, "boost": boost, "sd_p": sd_p, "alpha": alpha,
               "series": series, "looks": LOOKS,
               "prompts_per_run": m, "false_alarm": fa["rate"], "se_false_alarm": fa["se"],
               "guarantee": min(1.0, alpha * LOOKS), "reference_covers": covered / series,
               "zero_bet": 1 - float(bet.mean()), "false_alarm_betting": fa_bet["rate"] if bet.any() else None}
        for k in RISES:
            tag = f"{k:g}x"
            for name, d in (("", np.array(delays[(k, alpha)])), ("betting_", np.array(delays[(k, alpha)])[bet])):
                row[f"{name}detected_{tag}"] = float(np.mean(np.isfinite(d))) if d.size else None
                row[f"{name}median_delay_{tag}"] = _finite(np.median(d)) if d.size else None
                row[f"{name}p90_delay_{tag}"] = _finite(np.quantile(d, 0.9, method="inverted_cdf")) if d.size else None
        rows.append(row)
    return rows


def gate(spread: float, target_hits: float, sd_p: float, checks: int, rng, hist_runs=5, hist_m=10,
         cand_m=30) -> list[dict]:
    verdicts = {MAX_RATIO: [], 2 * MAX_RATIO: []}
    for _ in range(checks):
        history = pool(adaptive_series(rng, hist_runs, hist_m, spread, target_hits, sd_p),
                       CONFIDENCE).to_dict()
        boost = next_boost(p_query(sd_p), target_hits)
        for ratio in verdicts:
            # the candidate's proposal keeps the expected hits of the history's first run
            cand = run_estimates(prompts(rng, cand_m, sd_p, ratio), boost / ratio, spread, rng)
            g = history_ratio_gate(aggregate(cand, confidence=CONFIDENCE).to_dict(),
                                   unreliable_estimates(cand, "candidate", CONFIDENCE), history, MAX_RATIO,
                                   CONFIDENCE)
            verdicts[ratio].append(g.verdict)
    rows = []
    for ratio, v in verdicts.items():
        fail = _rate(v.count("fail"), checks)
        rows.append({"section": "gate", "spread": spread, "target_hits": target_hits, "sd_p": sd_p,
                     "max_ratio": MAX_RATIO, "true_ratio": ratio,
                     "checks": checks, "history": f"{hist_runs} runs x {hist_m} prompts", "candidate_prompts": cand_m,
                     "fail": fail["rate"], "se_fail": fail["se"], "pass": v.count("pass") / checks,
                     "inconclusive": v.count("inconclusive") / checks,
                     "level": round(1 - CONFIDENCE, 6)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=30, help="series per coverage cell")
    ap.add_argument("--prompts", type=int, default=10, help="prompts per run (coverage)")
    ap.add_argument("--detector-series", type=int, default=100, help="armed references per detector cell")
    ap.add_argument("--gate-checks", type=int, default=60, help="histories per gate cell")
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--output", default=None, help="results file (default results/pooling.json)")
    args = ap.parse_args()
    settings = {"n": N, "defensive": A0, "median_p": 1e-4, "max_boost": MAX_BOOST,
                "confidence": CONFIDENCE, "coverage_cells": COVERAGE_CELLS, "prefixes": PREFIXES,
                "series": args.series, "prompts": args.prompts, "detector_series": args.detector_series,
                "detector_cells": DETECTOR_CELLS, "factor": FACTOR, "reference_runs": REFERENCE_RUNS,
                "looks": LOOKS, "alphas": ALPHAS, "rises": RISES, "gate_checks": args.gate_checks,
                "gate_cells": GATE_CELLS, "max_ratio": MAX_RATIO}
    run = Run("pooling", "pooled-interval coverage over dependent runs, change-detector false alarms and delay, "
              "history-gate false failures (known answers)", seed=args.seed, settings=settings)
    rng = np.random.default_rng(args.seed)
    cov, det, gat = [], [], []
    for s, hits, sd, cluster in COVERAGE_CELLS:
        started = time.time()
        cov += coverage(s, hits, sd, cluster, args.series, args.prompts, rng)
        print(f"coverage spread {s} hits {hits}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    for s, boost, sd in DETECTOR_CELLS:
        started = time.time()
        det += detector(s, boost, sd, args.detector_series, 20, rng)
        print(f"detector spread {s} boost {boost}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    for s, hits, sd in GATE_CELLS:
        started = time.time()
        gat += gate(s, hits, sd, args.gate_checks, rng)
        print(f"gate spread {s} hits {hits}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    cov_cols = ["spread", "target_hits", "sd_p", "cluster", "runs", "prompts", "miss_high", "miss_low", "bound_only", "n_reliable",
                "miss_high_reliable", "width_vs_single", "upper_over_P", "single_run_miss_high"]
    det_cols = ["spread", "boost", "sd_p", "alpha", "false_alarm", "guarantee", "reference_covers", "zero_bet",
                "false_alarm_betting",
                *[f"betting_{c}_{k:g}x" for k in RISES for c in ("detected", "median_delay", "p90_delay")]]
    gate_cols = ["spread", "target_hits", "sd_p", "max_ratio", "true_ratio", "fail", "pass", "inconclusive", "level"]
    summary = [{k: r[k] for k in cov_cols} | {"section": "coverage"} for r in cov]
    summary += [{k: r[k] for k in det_cols} | {"section": "detector"} for r in det]
    summary += [{k: r[k] for k in gate_cols} | {"section": "gate"} for r in gat]
    notes = ("coverage: series of adaptive runs (10 prompts each); miss_high = P(pooled ci_high < P_query), miss_low "
             "= P(ci_low > P_query), each nominal 0.025 (binomial SE in results: se_*); bound_only: share of pools "
             "reported as an upper bound only; miss_high_reliable: miss among the other pools (n_reliable); "
             "width_vs_single: median over series of the pooled width / the median single-run width; upper_over_P: "
             "median pooled ci_high / P_query; single_run_miss_high: one run's aggregate ci_high < P_query. "
             "detector: false_alarm = P(any alarm within 100 runs at unchanged risk), guarantee alpha*100 (on the "
             "event reference_covers, the share of references whose upper bound is >= P_query); zero_bet: share of "
             "references too uncertain to bet (bet 0: R_t = t, so they alarm at run 1/alpha whatever the data); "
             "false_alarm_betting and betting_*: among the references that bet; delays in runs after arming, "
             "null = not within 100. "
             "gate: verdict shares of history_ratio_gate, R = max_ratio; at true ratio R the fail share is the "
             "false-failure rate (level 0.05), at 2R it is the power.")
    path = run.write(summary=summary, results=cov + det + gat, notes=notes,
                     out=Path(args.output) if args.output else None)
    fmt = {c: ".3f" for c in ("miss_high", "miss_low", "bound_only", "miss_high_reliable", "single_run_miss_high",
                              "false_alarm", "reference_covers", "zero_bet", "false_alarm_betting", "fail", "pass",
                              "inconclusive")}
    fmt.update(width_vs_single=".2f", upper_over_P=".2f")
    print(markdown_table([r for r in summary if r["section"] == "coverage"], cov_cols, fmt))
    print(markdown_table([r for r in summary if r["section"] == "detector"], det_cols, fmt))
    print(markdown_table([r for r in summary if r["section"] == "gate"], gate_cols, fmt))
    print(f"written: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
