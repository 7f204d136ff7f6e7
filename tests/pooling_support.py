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


# --- IS runs through the product's `importance_sampling`, with skewed hit weights -------------
A0 = 0.1  # the defensive share: 30 of 300 samples from the target
_N0 = round(A0 * N_PER_PROMPT)
_COMPONENT = np.r_[np.zeros(_N0, dtype=np.int64), np.ones(N_PER_PROMPT - _N0, dtype=np.int64)]


def skewed_draws(p, boost, spread, rng, cluster=(0.0, 0.0)):
    """Log-weights and harm scores, arrays (m, N_PER_PROMPT), of one run over prompts with risks
    `p` (the first A0 share of each row drawn from the target, the rest from a proposal), with
    exact balance-heuristic weights. Harmful outcomes are indexed by z: the proposal draws
    z ~ N(0, 1) at rate Q = min(0.5, boost P'), the target z ~ N(spread, 1) at rate P', so a hit
    weighs P' e / (a0 P' e + (1 - a0) Q), e = exp(spread z - spread^2 / 2): log-normal with sd
    about `spread`. `cluster` = (share, draws): that share of each prompt's P sits in a cluster
    the proposal draws `draws` times per run on average (a mass of heavy weights it rarely
    finds), P' = (1 - share) P the rest. Every weight is exact, so every estimate is unbiased.
    benchmarks/pooling.py draws its world with this too."""
    c_share, c_draws = cluster
    m, n1 = len(p), N_PER_PROMPT - _N0
    P = np.asarray(p, dtype=np.float64)[:, None]
    Pl, Pc = P * (1.0 - c_share), P * c_share
    Q, Qc = np.minimum(0.5, boost * Pl), np.full_like(P, c_draws / n1)
    u = np.concatenate([rng.random((m, _N0)), rng.random((m, n1))], axis=1)
    rate = np.concatenate([np.repeat(Pl, _N0, 1), np.repeat(Q, n1, 1)], axis=1)
    crate = np.concatenate([np.repeat(Pc, _N0, 1), np.repeat(Qc, n1, 1)], axis=1)
    hit, clus = u < rate, (u >= rate) & (u < rate + crate)
    z = np.concatenate([rng.normal(spread, 1.0, (m, _N0)), rng.normal(0.0, 1.0, (m, n1))], axis=1)
    e = np.exp(spread * z - spread ** 2 / 2)
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 where a prompt has no cluster; never picked
        log_hit = np.log(Pl * e) - np.log(A0 * Pl * e + (1 - A0) * Q)
        log_clus = np.log(Pc) - np.log(A0 * Pc + (1 - A0) * Qc)
    log_miss = np.log1p(-P) - np.log(A0 * (1 - P) + (1 - A0) * (1 - Q - Qc))
    log_w = np.where(hit, log_hit, np.where(clus, log_clus, log_miss))
    return log_w, (hit | clus).astype(np.float64)


def skewed_run(p, boost, spread, rng, cluster_share=0.0, cluster_draws=0.0):
    """One run's per-prompt estimates over `skewed_draws`, by the product's `importance_sampling`."""
    from tailmon.estimators import importance_sampling

    log_w, h = skewed_draws(p, boost, spread, rng, (cluster_share, cluster_draws))
    return [importance_sampling(log_w[i], h[i], _COMPONENT, defensive=A0) for i in range(len(p))]


def skewed_series(rng, runs=5, m=10, spread=1.0, target_hits=40.0, sd_p=1.0, **cluster):
    """`runs` dependent runs as in `adaptive_series` (each boost aims at `target_hits` at the
    level pooled so far), per-prompt P log-normal with median 1e-4 and log-sd `sd_p`."""
    out, level = [], math.exp(MU + sd_p ** 2 / 2)
    for _ in range(runs):
        boost = float(np.clip(target_hits / ((N_PER_PROMPT - _N0) * max(level, 1e-7)), 100.0, 5000.0))
        out.append(skewed_run(np.exp(rng.normal(MU, sd_p, m)), boost, spread, rng, **cluster))
        level = float(np.mean([e.p_hat for r in out for e in r]))
    return out
