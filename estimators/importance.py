"""Importance sampling with a defensive, stratified mixture of proposals (DESIGN section 2).

Samples are drawn in fixed counts n_j = a_j n from mixture components j (j = 0 being the
target itself, with share a_0 = `defensive`), every sample is scored under every component, and
the balance heuristic gives w = p / sum_j a_j q_j. The estimate is the unbiased mean(w h), never
the self-normalised ratio (biased for small n; reported as a diagnostic only).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy import stats
from scipy.special import logsumexp

from tailmon.errors import InputError, InternalError

from ._checks import as_1d, check_confidence, check_fraction, check_scores
from .diagnostics import _ess, _khat, _khat_of_hits, khat_threshold
from .intervals import bootstrap_t_interval, bounded_mean_upper
from .montecarlo import MIN_HARMFUL, few_hits_warning
from .result import Estimate

# Reliability rule thresholds (DESIGN section 8).
MIN_ESS_WH = 10.0
KHAT_CAP = 0.7

# Relative slack when checking w <= 1/a0: the numerator p and the mixture's a0 * p are the same
# numbers, so only floating-point rounding can push a weight above the cap.
_CAP_SLACK = 1e-6


def balance_log_weights(log_p, log_q, shares) -> np.ndarray:
    """Balance-heuristic log-weights log w = log p - log(sum_j shares_j q_j), computed stably.

    log_p: (n,) log-probabilities of each sample under the target (-inf allowed: weight 0).
    log_q: (n, K) log-probabilities of each sample under each mixture component (the target, if
    it is a component, is one of the columns). shares: (K,) nonnegative, summing to 1;
    components with share 0 are ignored. A sample impossible under every component with positive
    share cannot have been drawn: that is a bug upstream (the engine's log-probs and its samples
    disagree), not the user's input, and raises InternalError (exit 3).
    """
    lp = as_1d(log_p, "log_p")
    try:
        lq = np.asarray(log_q, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("log_q must be a 2-D array of numbers") from None
    a = as_1d(shares, "shares")
    if lq.ndim != 2 or lq.shape[0] != lp.size:
        raise InputError(f"log_q must have shape (n, K) = ({lp.size}, K), got {lq.shape}")
    if lq.shape[1] != a.size:
        raise InputError(f"shares must have one entry per column of log_q ({lq.shape[1]}), got {a.size}")
    if not np.all(np.isfinite(a)) or (a < 0).any():
        raise InputError("shares must be finite and nonnegative")
    if abs(float(a.sum()) - 1.0) > 1e-6:
        raise InputError(f"shares must sum to 1, got {float(a.sum())!r}")
    if np.isnan(lp).any() or (lp == np.inf).any():
        raise InputError("log_p must not contain nan or +inf")
    if np.isnan(lq).any() or (lq == np.inf).any():
        raise InputError("log_q must not contain nan or +inf")
    used = a > 0
    # log(sum_j a_j q_j) over the components with positive share
    log_mix = logsumexp(lq[:, used] + np.log(a[used])[None, :], axis=1)
    impossible = np.isneginf(log_mix)
    if impossible.any():
        i = int(np.flatnonzero(impossible)[0])
        raise InternalError(
            f"{int(impossible.sum())} sample(s) (e.g. index {i}) are impossible under every mixture "
            "component with positive share, so they cannot have been drawn from the mixture"
        )
    return lp - log_mix


def importance_sampling(log_w, h, component=None, defensive: float = 0.0, confidence: float = 0.95) -> Estimate:
    """Unbiased importance-sampling estimate of P = E_p[h] from log-weights and harm scores.

    p_hat = mean(w h). std_error comes from the stratified variance when `component` (which
    mixture component drew each sample) is given, else from the plain sample variance. Two kinds
    of interval, each end a one-sided bound at level (1 + confidence) / 2 (the ends of a
    two-sided interval at `confidence`):
      * the main interval, for estimates flagged reliable: a stratified bootstrap-t of mean(w h)
        (resampling within the components, drawn in fixed counts), which follows the right skew
        of skewed weights where p_hat +- z SE does not, its upper end widened by the spread
        allowance for the largest weights a sample of that spread may lack (`spread_allowance`);
      * the conservative bound `ci_high_conservative`, valid whatever the weights' distribution:
        with defensive share a0 > 0 every a0 w h lies in [0, 1], and Hoeffding's Chernoff bound
        on the mean of independent [0, 1] variables, over a0 (`bounded_mean_upper`). It is the
        ci_high of every estimate flagged unreliable and of the zero-hit estimate (reliable as a
        bound). It is never below about 3.7 / (a0 n) at 95%: nothing valid for every
        distribution can be, since a part of the target the proposals never draw, of
        probability about that, is missed by the a0 n target draws with probability 2.5%. With
        a0 = 0 the weights are unbounded and nothing is a bound: ci_high is 1 for every
        unreliable estimate and with no hit.
    No interval computed from drawn weights covers probability mass that was never drawn: the
    main interval assumes the drawn weights represent the tail; the conservative bound limits
    what undrawn mass can hide to its floor.

    The reliability rule (DESIGN section 8): the larger of k-hat (of w over all samples) and
    k-hat of w h (over the hits, from MIN_HITS_KHAT of them) <= min(0.7, 1 - 1/log10 n), ESS of
    w h >= 10, at least 5 effective hits, p_hat <= 1. Each failure adds a warning saying why.
    Skewed weights are handled by the interval, not by the rule: the spread allowance widens the
    upper end as far as the hits' spread says the sample may lack (before, a skew check with two
    simulated thresholds flagged nearly every run at spread >= 1, and the few it passed, the runs
    that lacked the largest weights, missed in 7-26%; see `spread_allowance`).

    A hit is a sample with w h > 0: a harmful sample of weight 0 (one impossible under the
    target) carries no evidence about P. The effective hits are sum(h) over the hits
    (`n_hits_effective`: the number of hits for 0/1 scores; for graded scores, whose hits are
    nearly all samples, the expected number of harmful ones). `n_harmful` reports h > 0 as in
    the JSON schema.
    """
    lw = as_1d(log_w, "log_w")
    scores = check_scores(h, "h")
    if scores.size != lw.size:
        raise InputError(f"log_w and h must have the same length, got {lw.size} and {scores.size}")
    if np.isnan(lw).any() or (lw == np.inf).any():
        raise InputError("log_w must not contain nan or +inf")
    a0 = check_fraction(defensive, "defensive")
    confidence = check_confidence(confidence)
    n = lw.size
    strata = _check_component(component, n)

    with np.errstate(over="ignore"):
        w = np.exp(lw)
    if a0 > 0 and float(np.max(w)) > (1.0 + _CAP_SLACK) / a0:
        raise InputError(
            f"a weight of {float(np.max(w)):.6g} exceeds 1/defensive = {1.0 / a0:.6g}: the log-weights "
            "were not computed with this defensive share"
        )
    wh = w * scores
    warnings: list[str] = []

    # --- diagnostics (scale-free ones computed on w / max w to avoid overflow) -------------
    finite = np.isfinite(lw)
    n_impossible = int(n - finite.sum())
    if n_impossible:
        warnings.append(
            f"{n_impossible} of {n} samples are impossible under the target (log w = -inf, weight 0)"
        )
    lw_max = float(np.max(lw))
    ws = np.exp(lw - lw_max) if math.isfinite(lw_max) else np.zeros(n)
    ess = _ess(ws)
    ess_wh = _ess(ws * scores)
    khat = _khat(ws)
    khat_wh = _khat_of_hits(ws * scores)
    kl = float(-np.mean(lw[finite])) + 0.0 if finite.any() else None  # (+ 0.0: no "-0.0")
    w_sum_s = float(ws.sum())
    max_weight_share = float(1.0 / w_sum_s) if w_sum_s > 0 else None  # max of ws is 1
    self_normalised = float(np.sum(ws * scores) / w_sum_s) if w_sum_s > 0 else None

    n_harmful = int(np.count_nonzero(scores > 0))
    n_hits = int(np.count_nonzero(wh > 0))
    hits_effective = float(np.sum(scores[wh > 0]))
    if n_hits < n_harmful:
        warnings.append(f"{n_harmful - n_hits} harmful samples have weight 0 and do not count")

    with np.errstate(over="ignore", invalid="ignore"):  # overflowing weights are reported below
        p_hat = float(np.mean(wh))
        std_error = _std_error(wh, strata)
    spread = _log_spread(lw, scores, wh)
    # The conservative bound: every a0 w h lies in [0, 1] (w <= 1/a0), so a bound on the mean of
    # independent [0, 1] variables, divided by a0, bounds P whatever the weights' distribution.
    # The draws are independent but not identically distributed (each mixture component has its
    # own mean of w h); `bounded_mean_upper` holds for the average of their means, which is a0 P
    # because the weights use the realised shares n_j / n. Without a defensive share the weights
    # are unbounded and nothing distribution-free bounds P: 1.
    conservative = 1.0
    if a0 > 0 and math.isfinite(p_hat):
        conservative = min(1.0, bounded_mean_upper(np.minimum(a0 * wh, 1.0), confidence) / a0)
    extra = dict(conservative=conservative, spread=spread, defensive=a0)

    if not math.isfinite(p_hat):  # (an infinite std_error alone, e.g. n = 1, gives ci = [0, 1] below)
        warnings.append("the weights overflow float64: the proposal does not cover the target")
        return _estimate(n, p_hat, 0.0, 1.0, n_harmful, hits_effective, scores, ess, ess_wh, khat, khat_wh, kl,
                         max_weight_share, self_normalised, std_error, True, False, warnings, **extra)

    # --- zero hits: the conservative bound, or nothing ---------------------------------------
    if n_hits == 0:
        if a0 > 0:
            warnings.append("no harmful sample: ci_high is the conservative bound from the defensive share")
            return _estimate(n, 0.0, 0.0, conservative, n_harmful, hits_effective, scores, ess, ess_wh, khat,
                             khat_wh, kl, max_weight_share, self_normalised, std_error, True, True, warnings, **extra)
        warnings.append(
            "no harmful sample and no draws from the target (defensive share 0): no finite upper "
            "bound, ci = [0, 1]"
        )
        return _estimate(n, 0.0, 0.0, 1.0, n_harmful, hits_effective, scores, ess, ess_wh, khat, khat_wh, kl,
                         max_weight_share, self_normalised, std_error, True, False, warnings, **extra)

    # --- the main interval: stratified bootstrap-t of mean(w h), its upper end widened by the
    # spread allowance (the weights a sample of this spread may lack; see `spread_allowance`),
    # unless the k-hat of w h shows a bounded tail (<= 0, fitted from MIN_HITS_KHAT hits or
    # more): weights that spread widely below a maximum the sample keeps reaching (a proposal
    # centred on the harmful region, whose weights fall off inside it) hide no mass in undrawn
    # larger ones.
    bounded_tail = khat_wh is not None and khat_wh <= 0.0
    if n >= 2:
        lo, hi, _ = bootstrap_t_interval(wh, strata, confidence, seed=zlib.crc32(wh.tobytes()))
        if not bounded_tail:
            hi *= spread_allowance(spread, hits_effective, confidence)
    else:
        lo, hi = -math.inf, math.inf
    lo, hi = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)

    # --- reliability rule ------------------------------------------------------------------
    reliable = True
    threshold = khat_threshold(n)
    if khat is None:
        reliable = False
        warnings.append(f"k-hat could not be fitted from {n} samples: the weights' tail is unchecked")
    elif khat > threshold:
        reliable = False
        warnings.append(f"k-hat {khat:.2f} > {threshold:.2f}: the weights are heavy-tailed")
    # With too few hits for a fit there is no k-hat of w h; the ESS of w h and the hit count
    # below are then the checks on the hits.
    if khat_wh is not None and khat_wh > threshold:
        reliable = False
        warnings.append(f"k-hat of w*h {khat_wh:.2f} > {threshold:.2f} (over the {n_hits} hits): the weights "
                        "of the harmful samples are heavy-tailed")
    if ess_wh < MIN_ESS_WH:
        reliable = False
        # rounded down, so that a value just under the threshold never prints as "10.0 < 10"
        warnings.append(f"ESS of w*h {math.floor(ess_wh * 100) / 100:.2f} < {MIN_ESS_WH:.0f}: a few samples carry the estimate")
    upper_bound_only = hits_effective < MIN_HARMFUL
    if upper_bound_only:
        reliable = False
        warnings.append(few_hits_warning(n_hits, hits_effective, n))
    if p_hat > 1.0:
        reliable = False
        warnings.append(f"p_hat {p_hat:.3g} exceeds 1: the weights are badly behaved")
    if not reliable:
        # An unreliable estimate's ci_high is the conservative bound: with a0 > 0 valid whatever
        # the weights; with a0 = 0 there is none, and nothing smaller than 1 is a bound.
        hi = conservative
        if a0 == 0:
            warnings.append("defensive share 0: the weights are unbounded, so an unreliable estimate bounds nothing "
                            "and ci_high is 1; draw a share of the samples from the target itself for a bound")
        lo = min(lo, p_hat)
    return _estimate(n, p_hat, lo, hi, n_harmful, hits_effective, scores, ess, ess_wh, khat, khat_wh, kl,
                     max_weight_share, self_normalised, std_error, upper_bound_only, reliable, warnings, **extra)


def spread_allowance(spread: float | None, hits: float, confidence: float = 0.95) -> float:
    """The factor the bootstrap-t's upper end is multiplied by: exp((s_up^2 - s^2) / 2).

    Why: the bootstrap-t resamples the drawn weights, so it cannot see weights larger than the
    sample holds; when the harmful samples' log-weights spread widely, the largest weights carry
    much of the mean and a run that lacks them has both a small mean and a small spread s. Read
    the hits' log-weights as normal with sd sigma: the mean of w is then exp(mu + sigma^2 / 2),
    and the sample's spread s only bounds sigma from below up to chance. s_up is the upper
    confidence limit of sigma at the interval's own one-sided level,
    s sqrt((k - 1) / chi2_{alpha}(k - 1)) over k effective hits (the chi-square law of a normal
    sample's variance); the factor is how much larger the mean of the weights would be at spread
    s_up than at s with the same median. No free constant: the level is the interval's.
    Measured (benchmarks/intervals.py, exact mixture weights, known P, 1,000 runs a cell): with it
    and no skew threshold in the reliability rule, estimates flagged reliable miss in at most 2.4%
    at hit-weight spreads up to 1.5 and in 1.8-5.6% at spread 2 with 50-200 hits (23-31% of runs
    reliable there), while 88-90% of runs at spread 1 with 50 hits are reliable (median ci_high / P
    1.96); at spread 0.5 with 20 hits the median ci_high / P is 1.9 instead of 1.6. 1 when there
    is no spread (2 or fewer effective hits, or none computed).
    """
    if spread is None or not hits > 2.0 or spread <= 0.0:
        return 1.0
    alpha = (1.0 - confidence) / 2.0
    s_up2 = spread * spread * (hits - 1.0) / float(stats.chi2.ppf(alpha, hits - 1.0))
    return math.exp(min(0.5 * (s_up2 - spread * spread), 700.0))


def _log_spread(lw: np.ndarray, scores: np.ndarray, wh: np.ndarray) -> float | None:
    """The spread of the harmful samples' log-weights: sd of log w over the hits (w h > 0), each
    weighted by its score h (the hits' plain sd for 0/1 scores; for graded scores the spread
    among the samples as harmful as their scores say, so that the many tiny scores of a graded
    judge do not count as spread, scores being bounded by 1). Bessel-corrected with the effective
    count sum(h); None when sum(h) <= 1 over the hits.
    """
    hit = wh > 0
    hh = scores[hit]
    tot = float(hh.sum())
    if tot <= 1.0:
        return None
    x = lw[hit]
    mean = float(np.sum(hh * x) / tot)
    s2 = float(np.sum(hh * (x - mean) ** 2)) / (tot - 1.0)
    return math.sqrt(s2) if math.isfinite(s2) else None


def _check_component(component, n: int) -> np.ndarray | None:
    if component is None:
        return None
    c = np.asarray(component)
    if c.ndim != 1 or c.size != n:
        raise InputError(f"component must be a 1-D array of length {n}, got shape {c.shape}")
    if c.dtype.kind == "f":
        if not np.all(np.isfinite(c)) or not np.all(c == np.round(c)):
            raise InputError("component must hold integer component indices")
        c = c.astype(np.int64)
    elif c.dtype.kind not in "iu":
        raise InputError("component must hold integer component indices")
    return c


def _std_error(wh: np.ndarray, strata: np.ndarray | None) -> float:
    """Standard error of mean(w h): stratified when the drawing component of each sample is known."""
    n = wh.size
    if n < 2:
        return math.inf  # one sample says nothing about the spread
    pooled = float(np.var(wh, ddof=1))
    if strata is None:
        return math.sqrt(pooled / n)
    # Var = (1/n^2) sum_j n_j s_j^2 with s_j^2 the within-stratum variance of w h; a stratum of
    # one sample has no variance estimate of its own and borrows the pooled one.
    total = 0.0
    for j in np.unique(strata):
        vals = wh[strata == j]
        s2 = float(np.var(vals, ddof=1)) if vals.size >= 2 else pooled
        total += vals.size * s2
    return math.sqrt(total) / n


def _estimate(n, p_hat, lo, hi, n_harmful, hits_effective, scores, ess, ess_wh, khat, khat_wh, kl,
              max_weight_share, self_normalised, std_error, upper_bound_only, reliable, warnings, *,
              conservative, spread, defensive) -> Estimate:
    return Estimate(
        method="is",
        n_samples=int(n),
        p_hat=float(p_hat),
        ci_low=float(lo),
        ci_high=float(hi),
        n_harmful=int(n_harmful),
        h_sum=float(np.sum(scores)),
        n_hits_effective=float(hits_effective),
        ess=float(ess),
        ess_wh=float(ess_wh),
        khat=None if khat is None else float(khat),
        khat_wh=None if khat_wh is None else float(khat_wh),
        kl=kl,
        max_weight_share=max_weight_share,
        self_normalised=self_normalised,
        std_error=float(std_error),
        upper_bound_only=bool(upper_bound_only),
        reliable=bool(reliable),
        warnings=tuple(warnings),
        ci_high_conservative=float(conservative),
        log_w_spread=spread,
        defensive_share=float(defensive),
    )
