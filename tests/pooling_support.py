"""Simulated series of runs with a known answer, shared by the pooling, change-detector and
history-gate tests: per-prompt P(x) log-normal over prompts, each prompt estimated as an IS run
with equal-weight hits gives it (k ~ Binomial(n, q) hits at q = boost P, weight P / q), the boost
of each run chosen from the runs before it (as an adaptive proposal is).

Test modules import it as `pooling_support` (tests/ is on sys.path, as for daemon_support)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from tailmon.estimators.result import Estimate

N_PER_PROMPT = 300
MU, SPREAD = math.log(1e-4), 0.7
P_QUERY = math.exp(MU + SPREAD ** 2 / 2)  # the population mean of a log-normal P(x)


def run_estimates(p_true, boost, rng, n=N_PER_PROMPT):
    """One run's per-prompt estimates. Unbiased given the boost: E[k w / n] = q (P / q) = P. Fewer
    than 5 hits: upper-bound-only and unreliable, ci_high the 97.5% Poisson bound at the weight."""
    q = np.minimum(0.5, boost * np.asarray(p_true))
    k = rng.binomial(n, q)
    out = []
    for p, qi, ki in zip(p_true, q, k):
        w = p / qi
        p_hat = ki * w / n
        se = w * math.sqrt(ki * (1 - ki / n) / (n - 1) / n) if ki else 0.0
        few = ki < 5
        high = (stats.chi2.ppf(0.975, 2 * ki + 2) / 2) * w / n if few else p_hat + 1.96 * se
        out.append(Estimate(method="is", n_samples=n, p_hat=p_hat, ci_low=max(0.0, p_hat - 1.96 * se), ci_high=high,
                            n_harmful=int(ki), h_sum=float(ki), n_hits_effective=float(ki), ess=float(n),
                            ess_wh=float(ki), khat=None, khat_wh=None, kl=None, max_weight_share=None,
                            self_normalised=None, std_error=se, upper_bound_only=few, reliable=not few,
                            ci_high_conservative=high))
    return out


def adaptive_series(rng, runs=5, m=10, boost=1500.0, target_hits=40.0):
    """A series whose every run's proposal is chosen from the runs before it: the next boost aims
    at `target_hits` at the level pooled so far, so a run that came out low makes the next boost
    higher (the runs are dependent, each unbiased given the past)."""
    out = []
    for _ in range(runs):
        out.append(run_estimates(np.exp(rng.normal(MU, SPREAD, m)), boost, rng))
        level = np.mean([e.p_hat for r in out for e in r])
        boost = float(np.clip(target_hits / (N_PER_PROMPT * max(level, 1e-6)), 100.0, 5000.0))
    return out
