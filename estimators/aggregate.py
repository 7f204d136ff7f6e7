"""Aggregation of per-prompt estimates into P_query = E_x~D[P(x)] (DESIGN section 2).

Risk is uneven over prompts: a few prompts usually carry most of the mean, so the mean of the
per-prompt estimates is right-skewed and `mean +- z SE` misses on the high side far more often
than its label says (issue 16, item 2; `benchmarks/aggregate.py` measures it). The interval here
is the union of two intervals, each able to see what the other cannot (see `aggregate`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

from tailmon.errors import InputError

from ._checks import check_confidence
from .intervals import normal_interval
from .result import Aggregate, Estimate

UNCATEGORIZED = "uncategorized"

TOP_SHARE_WARN = 0.5
"""Above this share of the summed p_hat on one prompt, the aggregate warns: one prompt carries
most of the mean, and a fresh sample of prompts could give a very different figure."""

MIN_PROMPTS = 20
"""Fewer prompts than this: the aggregate is flagged unreliable. Measured (benchmarks/aggregate.py,
README "what the figures mean"): at m = 6 the interval's upper end falls below the population mean
in 13-52% of draws depending on how uneven the risk is (at 20: 2-5%, but 13% on two levels of
risk); no interval computed from 6 prompts can see a level that 10% of prompts have (absent from
53% of such samples)."""

MAX_LOG_SPREAD = 1.5
"""Fitted spread (sd of ln P over prompts) above which the interval rests on the log-normal tail
model, not on the sample: the aggregate is flagged unreliable (measured at sd 2: every interval
computed from the sample itself misses 13-30% at m >= 50; the log-normal profile holds only where
its tail shape is right, which 50 prompts cannot check)."""

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_MIN_PROMPTS = 10
"""Below this many prompts the bootstrap-t has too few distinct resamples to be stable (its ends
jump to 0 or 1): the interval is mean +- z SE instead (the aggregate is unreliable there)."""
_BOOTSTRAP_SEED = 20261207  # fixed: the same estimates always give the same interval
_MIN_LOG_SD = 1e-3  # floor on the fitted spread: identical p_hat without noise have no spread to fit
_NORMAL_HITS = 10.0  # from this many equivalent hits on, ln p_hat is close enough to normal
_GRID = np.linspace(-6.5, 6.5, 161)  # standard-normal grid for the Poisson-log-normal integral


def aggregate(
    estimates: Sequence[Estimate],
    categories: Sequence[str | None] | None = None,
    confidence: float = 0.95,
    weights: Sequence[float] | None = None,
) -> Aggregate:
    """Mean of per-prompt estimates over a sample of prompts, with an interval that allows for
    uneven risk over prompts.

    The point estimate is the mean of the p_hat_i: the prompts are a sample from D and each p_hat
    is unbiased for its P(x_i), so the mean is unbiased for P_query, zero-hit prompts (p_hat 0)
    included. `std_error` is sqrt(max(s2, w) / m) with s2 the sample variance of the p_hat_i
    (between- plus within-prompt) and w = mean(std_error_i^2), which keeps the within part when
    the estimates happen to agree; with one prompt, its own standard error.

    The interval (each end a one-sided bound at (1 + confidence) / 2) is the union of:

    * a **bootstrap-t** over prompts: resample the m prompts, studentize the resampled mean with
      the same standard error rule, and read the ends off the t statistic's quantiles. It follows
      whatever shape the sample shows (two levels of risk, a power-law tail) and corrects the
      skew that a symmetric normal or t interval ignores; it cannot see a part of D absent from
      the sample. Measured (benchmarks/aggregate.py): 4-7% misses of the upper end at m >= 50
      for log-normal spread 1 and a Pareto tail, 13-14% at spread 2.
    * a **log-normal profile likelihood** for ln P_query = mu + s^2/2, with ln P(x) ~ N(mu, s^2)
      over prompts. Each prompt with enough hits enters with its within-prompt noise (ln p_hat_i
      ~ N(mu, s^2 + tau_i^2), tau_i^2 = ln(1 + (SE_i/p_hat_i)^2)); a prompt with few or no hits
      through a Poisson-log-normal term (see `_lognormal_profile`), so that it still says "low"
      without a made-up value and without the selection of being seen only when lucky. It is
      a model for the spread over prompts, not for any prompt's bound: unreliable prompts' bounds
      are carried below. The ends are where twice the log-likelihood
      drops by t_{m_obs-2}^2 of the confidence (the chi^2_1 threshold with a small-sample
      allowance for the two fitted parameters). It extrapolates the tail the sample has not
      reached, which a resampling method cannot (spread 2: half the mean comes from prompts
      rarer than 1 in 44), and is exact where the tail is log-normal; where it is not (two
      levels) it can be too low, which the bootstrap-t covers.

    The union (the lower of the lower ends, the higher of the upper ends) misses only when both
    do; `interval` says which method set ci_high. Below BOOTSTRAP_MIN_PROMPTS (10) prompts the
    bootstrap-t is replaced by mean +- z SE. Below MIN_PROMPTS (20) prompts the log-normal
    part is left out: with two parameters fitted from a handful of prompts its upper end is near
    1 and decides nothing, so the bootstrap-t stands alone and the aggregate is flagged
    unreliable with the measured miss rates in its warning.

    Then, as the estimates' own bounds demand,
    ci_high is at least the mean over prompts of each unreliable (or upper-bound-only) prompt's
    ci_high and every other prompt's p_hat: an unreliable prompt enters the upper end with its
    conservative bound, not with a p_hat its diagnostics do not stand behind (`interval` is
    "bounds" when that decides). This makes the figure wide when many prompts are unreliable;
    it is the price of not trusting them.

    `top_share` is the largest prompt's share of the summed p_hat: above 0.5 one prompt carries
    most of the mean and a warning says so. `reliable` needs every per-prompt estimate reliable,
    at least MIN_PROMPTS prompts and a fitted log-spread at most MAX_LOG_SPREAD (beyond those the
    measured misses exceed 5%: the warnings say which held).

    `weights` (one per estimate, positive, fixed before the estimates were seen: the pooled
    estimate over runs weights each prompt by its sample count, `estimators.pooling`) make the
    point estimate sum(w p_hat) / sum(w), still unbiased whatever the weights as long as they do
    not depend on the estimates. The standard error, the bootstrap-t (which resamples the
    (estimate, weight) pairs) and the carried bounds follow the weights; the log-normal part
    estimates the population mean itself, which the weights do not change. Equal weights (the
    default) give exactly the unweighted figures.

    Categories (None -> "uncategorized") give one Aggregate per category in `by_category`. The
    overall figure stays the plain mean over prompts: the prompts were drawn from D, so each
    category appears in its share of D (proportional allocation), and since categories are
    observed after drawing, the unstratified variance is the right one.
    """
    confidence = check_confidence(confidence)
    ests = list(estimates)
    if not ests:
        raise InputError("estimates must not be empty")
    for e in ests:
        if not isinstance(e, Estimate):
            raise InputError(f"estimates must be Estimate objects, got {type(e).__name__}")
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(ests),) or not np.all(np.isfinite(w)) or (w <= 0).any():
            raise InputError(f"weights must be {len(ests)} positive numbers, one per estimate")
    by_category: dict[str, Aggregate] = {}
    if categories is not None:
        cats = [UNCATEGORIZED if c is None else str(c) for c in categories]
        if len(cats) != len(ests):
            raise InputError(
                f"categories must have one entry per estimate ({len(ests)}), got {len(cats)}"
            )
        for name in sorted(set(cats)):
            idx = [i for i, c in enumerate(cats) if c == name]
            by_category[name] = _aggregate([ests[i] for i in idx], confidence, {},
                                           None if w is None else w[idx])
    return _aggregate(ests, confidence, by_category, w)


def _aggregate(ests: list[Estimate], confidence: float, by_category: dict, w: np.ndarray | None = None) -> Aggregate:
    m = len(ests)
    p = np.array([e.p_hat for e in ests], dtype=np.float64)
    se = np.array([e.std_error for e in ests], dtype=np.float64)
    # normalised weights (equal by default): every figure below is the weighted one, which for
    # equal weights is exactly the plain mean, var(p, ddof=1) / m and mean(se^2) / m
    u = np.full(m, 1.0 / m) if w is None else w / w.sum()
    p_hat = float(np.mean(p)) if w is None else float(np.sum(u * p))
    warnings: list[str] = []
    reliable = True
    if m >= 2:
        var = max(float(np.var(p, ddof=1)), float(np.mean(se * se))) / m if w is None else _weighted_var(p, se, u)
    else:
        var = float(se[0] ** 2)
        warnings.append("one prompt only: the between-prompt variance is not estimated")
    std_error = math.sqrt(var) if math.isfinite(var) else math.inf
    lo, hi = normal_interval(p_hat, std_error, confidence)
    interval = "normal"
    log_spread = None
    if m >= BOOTSTRAP_MIN_PROMPTS and math.isfinite(std_error):
        lo, hi = _bootstrap_t(p, se, confidence, None if w is None else u)
        interval = "bootstrap-t"
    # else: too few prompts for resampling (3 prompts have 10 distinct resamples): the normal
    # interval above stands, and the aggregate is flagged unreliable below (fewer than
    # MIN_PROMPTS), its warning giving the measured misses. (A Student t quantile misses a little
    # less at 6 prompts, 5-52% against 13-52%, but at 3-4 prompts its lower end is 0 and no ratio
    # gate could be decided by the bounds.)
    if m >= 2 and math.isfinite(std_error):
        # below MIN_PROMPTS the log-normal fit has too few prompts to say anything useful (its
        # upper end is then near 1); the aggregate is flagged unreliable there instead
        fit = _lognormal_profile(ests, confidence) if m >= MIN_PROMPTS else None
        if fit is not None:
            f_lo, f_hi, log_spread = fit
            lo = min(lo, f_lo)
            if f_hi > hi:
                hi, interval = f_hi, "log-normal"
    lo, hi = max(0.0, float(lo)), min(1.0, float(hi))
    # unreliable prompts (and prompts reported as upper bounds) carry their ci_high, the
    # conservative bound, into the upper end instead of a p_hat their diagnostics do not back
    bounds = np.array([e.ci_high if (e.upper_bound_only or not e.reliable) else e.p_hat for e in ests])
    carried = float(np.mean(bounds)) if w is None else float(np.sum(u * bounds))
    if carried > hi:
        hi, interval = min(1.0, carried), "bounds"
    hi = max(hi, p_hat) if p_hat <= 1.0 else 1.0
    shares = np.clip(p, 0.0, None) * (1.0 if w is None else u)
    total = float(np.sum(shares))
    top_share = float(np.max(shares) / total) if total > 0 else None

    n_unreliable = sum(1 for e in ests if not e.reliable)
    if n_unreliable:
        reliable = False
        warnings.append(f"{n_unreliable} of {m} per-prompt estimates are unreliable: each enters the upper "
                        "end with its ci_high")
    if top_share is not None and top_share > TOP_SHARE_WARN and m >= 2:
        warnings.append(f"one prompt carries {top_share:.0%} of the mean: the figure rests on it, and a "
                        "fresh sample of prompts could give a very different one")
    if m < MIN_PROMPTS:
        reliable = False
        if m >= 2:
            warnings.append(f"{m} prompts (< {MIN_PROMPTS}): with uneven risk over prompts the interval misses "
                            "the population mean far more often than its label says (measured 13-52% at 6 "
                            "prompts); estimate more prompts")
    if log_spread is not None and log_spread > MAX_LOG_SPREAD:
        reliable = False
        warnings.append(f"risk is very uneven over prompts (fitted sd of ln P {log_spread:.2f} > "
                        f"{MAX_LOG_SPREAD}): most of the mean comes from prompts rarer than the sample "
                        "shows, so ci_high rests on the log-normal tail model")
    return Aggregate(
        n_prompts=m,
        n_samples=int(sum(e.n_samples for e in ests)),
        p_hat=p_hat,
        ci_low=lo,
        ci_high=float(hi),
        std_error=float(std_error),
        n_harmful=int(sum(e.n_harmful for e in ests)),
        reliable=reliable,
        n_unreliable=n_unreliable,
        top_share=top_share,
        log_spread=log_spread,
        interval=interval,
        by_category=by_category,
        warnings=tuple(warnings),
    )


def _weighted_var(p: np.ndarray, se: np.ndarray, u: np.ndarray) -> float:
    """Variance of sum(u p) for independent terms (or martingale differences) with a common mean:
    the larger of the between part m/(m-1) sum(u^2 (p - mean)^2) and the within part
    sum(u^2 se^2). For u = 1/m: max(var(p, ddof=1), mean(se^2)) / m."""
    m = p.size
    mean = float(np.sum(u * p))
    between = float(np.sum(u * u * (p - mean) ** 2)) * m / (m - 1)
    return max(between, float(np.sum(u * u * se * se)))


def _bootstrap_t(p: np.ndarray, se: np.ndarray, confidence: float,
                 u: np.ndarray | None = None) -> tuple[float, float]:
    """Bootstrap-t interval for the (weighted) mean of p over prompts (studentized by the
    aggregate's SE rule); with weights `u` the (estimate, weight) pairs are resampled together.

    Resamples with zero standard error (all resampled prompts identical and exact) carry no
    t statistic and are dropped; if none is left, the normal interval stands in.
    """
    m = p.size
    if u is None:
        mean = float(p.mean())
        s = math.sqrt(max(float(p.var(ddof=1)), float(np.mean(se * se))) / m)
    else:
        mean = float(np.sum(u * p))
        s = math.sqrt(_weighted_var(p, se, u))
    if s == 0.0:
        return mean, mean
    rng = np.random.default_rng(_BOOTSTRAP_SEED)
    idx = rng.integers(0, m, (BOOTSTRAP_RESAMPLES, m))
    pb, seb = p[idx], se[idx]
    if u is None:
        means = pb.mean(axis=1)
        sb = np.sqrt(np.maximum(pb.var(axis=1, ddof=1), (seb * seb).mean(axis=1)) / m)
    else:
        ub = u[idx]
        ub = ub / ub.sum(axis=1, keepdims=True)
        means = np.sum(ub * pb, axis=1)
        between = np.sum(ub * ub * (pb - means[:, None]) ** 2, axis=1) * m / (m - 1)
        sb = np.sqrt(np.maximum(between, np.sum(ub * ub * seb * seb, axis=1)))
    ok = sb > 0
    if not ok.any():
        return normal_interval(mean, s, confidence)
    t = (means[ok] - mean) / sb[ok]
    alpha = (1.0 - confidence) / 2.0
    t_lo, t_hi = np.quantile(t, [alpha, 1.0 - alpha])
    return mean - float(t_hi) * s, mean - float(t_lo) * s


def _lognormal_profile(ests: list[Estimate], confidence: float) -> tuple[float, float, float] | None:
    """Profile-likelihood interval for P_query = exp(mu + s^2/2) under ln P(x) ~ N(mu, s^2).

    Each prompt's evidence is summarised as an equivalent Poisson count: k_i = (p_hat_i/SE_i)^2
    hits at an exposure E_i = k_i/p_hat_i (exact for k equal-weight hits, and for Monte Carlo up
    to 1 - p), so that k_i ~ Poisson(E_i P(x_i)). A prompt with at least 10 such hits enters as
    ln p_hat_i ~ N(mu, s^2 + tau_i^2), tau_i^2 = ln(1 + (SE_i/p_hat_i)^2) (its within-prompt noise
    on the log scale); a prompt with fewer, or none, through the Poisson-log-normal likelihood
    itself, integrated over ln P on a grid: near the detection limit a prompt is seen only when it
    was lucky, and the log-normal noise model would then overstate it and shrink the fitted
    spread. A prompt without a hit has no weight to say how strongly its proposal boosted the
    event; its exposure is n_i times the median boost k_j/(n_j p_hat_j) of the prompts with hits
    (1 for Monte Carlo): the assumption is that its proposal works like the others'. Returns
    (low, high, fitted s), or None with fewer than 3 prompts with a hit (two parameters and no
    degree of freedom left to judge them).
    """
    x, tau2, few_k, few_e, boosts, zero_n = [], [], [], [], [], []
    for e in ests:
        if e.p_hat > 0 and math.isfinite(e.std_error):
            pe = min(e.p_hat, 1.0)
            k = (pe / e.std_error) ** 2 if e.std_error > 0 else math.inf
            if k >= _NORMAL_HITS:
                x.append(math.log(pe))
                tau2.append(math.log1p((e.std_error / pe) ** 2))
            else:
                few_k.append(k)
                few_e.append(k / pe)
            if math.isfinite(k):
                boosts.append(k / (e.n_samples * pe))
        elif e.p_hat == 0 and e.n_samples > 0:
            zero_n.append(e.n_samples)
    if len(x) + len(few_k) < 3:
        return None
    boost = float(np.median(boosts)) if boosts else 1.0
    x_arr, t_arr = np.array(x), np.array(tau2)
    k_arr = np.array(few_k + [0.0] * len(zero_n))
    log_e = np.log(np.array(few_e + [n * boost for n in zero_n]))
    const = special.gammaln(k_arr + 1.0)
    z = _GRID
    log_phi = -0.5 * z * z - 0.5 * math.log(2.0 * math.pi) + math.log(z[1] - z[0])

    def loglik(mu: float, log_s: float) -> float:
        s = math.exp(log_s)
        v = s * s + t_arr
        ll = -0.5 * float(np.sum((x_arr - mu) ** 2 / v + np.log(v)))
        if k_arr.size:
            log_lam = log_e[:, None] + mu + s * z[None, :]
            terms = k_arr[:, None] * log_lam - np.exp(log_lam) + log_phi[None, :]
            top = terms.max(axis=1)  # log-sum-exp by hand: scipy's costs more than the sum here
            ll += float(np.sum(top + np.log(np.exp(terms - top[:, None]).sum(axis=1)) - const))
        return ll

    lo_s = math.log(_MIN_LOG_SD)
    hi_s = math.log(20.0)
    # MLE: start from the moments of the prompts with hits, then Nelder-Mead on (mu, ln s)
    seen = np.concatenate([x_arr, np.log(np.array(few_k) / np.array(few_e))])  # ln p_hat of the prompts with hits
    sd0 = max(float(np.std(seen)), 0.1)
    res = optimize.minimize(lambda v: -loglik(v[0], min(max(v[1], lo_s), hi_s)),
                            x0=[float(np.mean(seen)), math.log(sd0)], method="Nelder-Mead",
                            options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
    mu_hat, ls_hat = float(res.x[0]), min(max(float(res.x[1]), lo_s), hi_s)
    l_max = loglik(mu_hat, ls_hat)
    s_hat = math.exp(ls_hat)
    theta_hat = mu_hat + s_hat * s_hat / 2.0

    def profile(theta: float) -> float:
        # max over s of loglik(theta - s^2/2, ln s)
        r = optimize.minimize_scalar(lambda ls: -loglik(theta - math.exp(2.0 * ls) / 2.0, ls),
                                     bounds=(lo_s, hi_s), method="bounded", options={"xatol": 1e-4})
        return -float(r.fun)

    df = max(len(x) + len(few_k) - 2, 1)
    q = float(stats.t.ppf(0.5 + confidence / 2.0, df))
    drop = q * q / 2.0

    def gap(theta: float) -> float:
        return l_max - profile(theta) - drop

    width = max(1.0, 3.0 * s_hat)
    ends = []
    for sign in (-1.0, 1.0):
        step = width
        far = theta_hat + sign * step
        for _ in range(60):
            if gap(far) > 0:
                break
            step *= 2.0
            far = theta_hat + sign * step
        else:
            ends.append(-math.inf if sign < 0 else math.inf)
            continue
        ends.append(optimize.brentq(gap, min(theta_hat, far), max(theta_hat, far), xtol=1e-4)
                    if gap(theta_hat) < 0 else theta_hat)
    low = math.exp(ends[0]) if math.isfinite(ends[0]) else 0.0
    high = math.exp(min(ends[1], 0.0)) if math.isfinite(ends[1]) else 1.0
    return low, high, s_hat


__all__ = ["BOOTSTRAP_MIN_PROMPTS", "BOOTSTRAP_RESAMPLES", "MAX_LOG_SPREAD", "MIN_PROMPTS", "TOP_SHARE_WARN", "aggregate"]
