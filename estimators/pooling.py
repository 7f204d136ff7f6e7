"""Evidence that accumulates (issue 20): one estimate from a series of runs, and an e-detector
for a rise in risk.

**Pooling.** A series is one monitor's estimand (model version, judge, deployed decoding, system
prompt, chat template, prompt source) measured again and again. Its runs pool into one estimate
over all their prompts: the mean of every prompt's p_hat, each weighted by its sample count.
The weights are fixed before anything is drawn (the config sets the counts), never taken from
the estimates' own variances: a run that missed the heavy weights has both a low p_hat and a
low standard error, so inverse-variance weights would favour exactly the runs that are low, and
the pooled figure would be biased low.

Why the aggregate's interval holds for the pool. Order the prompts run by run. Given everything
before a run (F), the run's mixture is fixed (an adaptive proposal is learnt from earlier runs
only) and its prompts are fresh draws from the source, so each prompt's p_hat has conditional
mean P_query: the terms d_i = u_i (p_hat_i - P_query) are martingale differences, not
independent ones (adaptive proposals make later runs depend on earlier ones). Then
E[(sum d_i)^2] = sum E[d_i^2] (the cross terms vanish by the tower rule) and
sum u_i^2 (p_hat_i - mean)^2 m / (m - 1) is unbiased for it as for independent terms; this sum
holds both the between-prompt part (the prompts differ) and the within-prompt part (each p_hat
is noisy), whatever the proposals did. The martingale central limit theorem gives the normal
limit, the bootstrap-t over the pooled prompts corrects the skew of uneven risk, and the
log-normal profile likelihood is a product of per-prompt terms, which is the likelihood of
adaptively collected data too (a design chosen from past data only leaves the likelihood's
dependence on the parameters unchanged). So `aggregate` with these weights is the pooled figure,
under issue 16's rules, except for prompts flagged unreliable on their own: over many prompts
their noise averages out, and `pool` says when they may enter with their p_hat and how the rest
is bounded. A pool that fails its checks is to be read as an upper bound only (`bound_only`),
never as a point with an interval.

**Change detection** (`e_value`, `shiryaev_roberts`, `choose_bet`). Against a reference (the
series' pooled history, or the previous model version's) with upper bound U (its ci_high, which
covers the reference's own uncertainty), each new run gives the e-value

    e_t = 1 - c + c p_hat_t / U,          0 <= c <= MAX_BET,

with the bet c fixed when the detector is armed. A run's p_hat is non-negative and unbiased
given the past (see above), so while the risk P has not risen above U, E[e_t | F] =
1 - c + c P / U <= 1: e_t is an e-value for "no rise", exactly, whatever the weights' skew and
without any normal approximation. The e-detector (Shin, Ramdas and Rinaldo, 2023) is
Shiryaev-Roberts' R_t = e_t (R_{t-1} + 1), R_0 = 0, with an alarm when R_t >= 1/alpha. R_t - t
is a supermartingale, so by optional stopping, at unchanged risk,

    E[runs to a false alarm] >= 1/alpha       and   P(false alarm within T runs) <= alpha T,

on the event that the reference's bound holds (P <= U; probability at least (1 + confidence)/2
at the reference's confidence). The bet c maximises the mean of log(1 - c + c k p_j / U) over the
reference's runs p_j (k the configured factor): the growth rate R would have if the risk were k
times the reference's, with each run as noisy as the reference's were. A reference too
uncertain to show a k-fold rise (k p_j / U mostly below 1) gets c = 0: the detector then never
fires, and says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tailmon.errors import InputError

from ._checks import check_confidence
from .aggregate import TOP_SHARE_WARN, aggregate
from .importance import MIN_ESS_WH
from .intervals import chernoff_upper
from .result import Estimate, _jsonable

MAX_BET = 0.9
"""The largest bet: a run with p_hat 0 (one that missed every hit, common at rare risk) then
divides the evidence by 10 instead of wiping it out."""
# The largest pooled skew H / ESS^1.5 a pool calibrated by its prompts is trusted with (see `pool`):
# the log-normal skewness of a mean, exp(1.5 s^2) / sqrt(H), at the level the per-prompt rule
# used before its spread allowance replaced it; measured in benchmarks/pooling.py.
MAX_MEAN_SKEW = 0.5
_BET_GRID = np.linspace(0.0, MAX_BET, 91)


POOL_MIN_PROMPTS = 50
"""From this many pooled prompts on, per-prompt estimates flagged unreliable for noise (few hits,
skewed or uneven weights) can enter the pooled mean with their p_hat, when the pooled checks
hold (`pool`)."""


@dataclass(frozen=True)
class Pooled:
    """A series' pooled estimate over its runs within the horizon."""

    n_runs: int
    n_prompts: int
    n_samples: int
    p_hat: float
    ci_low: float
    ci_high: float
    """Upper end of the interval at `confidence` (a one-sided bound at (1 + confidence) / 2). When
    the pool is not reliable, an upper bound with the unreliable prompts' part bounded
    conservatively, and the only figure to read (`bound_only`)."""
    std_error: float
    reliable: bool
    bound_only: bool
    """True when not reliable: report ci_high as an upper bound, not p_hat with an interval."""
    n_unreliable: int
    """Per-prompt estimates flagged unreliable (a reliable pool may hold some: see `pool`)."""
    interval: str
    """Which method set ci_high: the aggregate's ("bootstrap-t", "log-normal", "normal") or
    "bounds" (the conservative bound on the unreliable prompts' part)."""
    confidence: float
    log_spread: float | None = None
    top_share: float | None = None
    hits: float | None = None
    """Effective hits over every pooled prompt (the sum of their `n_hits_effective`)."""
    ess_wh: float | None = None
    """Effective sample size of the pooled mean's per-sample terms u_i w h / n_i over all hits."""
    skew: float | None = None
    """hits / ess_wh^1.5: the skewness of the pooled mean a log-normal spread of those terms would
    give (see `pool`); None without hits."""
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def pool(runs: Sequence[Sequence[Estimate]], confidence: float = 0.95) -> Pooled:
    """Pool the per-prompt estimates of several runs of one series (each run a sequence of
    `Estimate`) into one estimate, each prompt weighted by its sample count (see the module doc).

    The point estimate and the interval are `aggregate`'s over all pooled prompts. What differs
    from one run's aggregate is how per-prompt estimates flagged unreliable enter. One run's
    aggregate carries each one's conservative bound (at least about 3.7 / (a0 n) whatever was
    seen), so a run with many such prompts is an upper bound far above the risk, and pooling
    such runs would never narrow it. Over many prompts, two things change:

    * **The noise of one prompt averages out.** A prompt is flagged when its own mean(w h) is too
      skewed for a calibrated interval (few hits, weights spread widely). The pooled mean is a sum
      over all prompts' samples, whose skewness falls as the hits grow; the bootstrap-t and the
      log-normal profile over prompts then calibrate it from the prompts' p_hat (unbiased,
      flagged or not). So from POOL_MIN_PROMPTS prompts on, the flagged prompts enter with their
      p_hat and the pool is reliable when the pooled checks hold: every flagged prompt has
      bounded weights (defensive share > 0, p_hat <= 1), no prompt carries most of the mean
      (top share <= 0.5), the aggregate's own rule holds (at least 20 prompts, fitted spread over
      prompts <= 1.5), the effective sample size of the pooled terms u_i w h / n_i is at least 10
      (as one prompt's ESS of w h), and their skew, H / ESS^1.5 with H the pooled effective hits,
      is at most 0.5: the log-normal skewness of a mean, exp(1.5 s^2) / sqrt(H), with the
      log-normal spread s read from the second moment, e^(s^2) = H / ESS, which is driven by the
      largest terms where the sample sd of log w is not. A mass of heavy weights drawn only a
      few times in the whole pool (most of P where the proposal rarely goes) makes ESS small
      against H and fails it. Measured in benchmarks/pooling.py.
    * **The conservative part is bounded jointly.** When the pool is not reliable, the flagged
      prompts' part is bounded over all their samples together: with a = the smallest defensive
      share among them, every a w h lies in [0, 1], and Hoeffding's Chernoff bound (the one each
      prompt's own conservative bound uses, valid for independent variables with different means,
      and given the past for adaptive runs) on their pooled mean bounds sum_i n_i P(x_i) / sum_i
      n_i over them: a floor of about 3.7 / (a N) with N all their samples, which more runs
      shrink. ci_high is then the larger of the aggregate's upper end (every p_hat as it is) and
      sum over reliable prompts of u_i p_hat_i plus that bound times the flagged prompts' share;
      prompts whose defensive share is unknown (older reports) carry their own ci_high. Prompts
      without a hit (reliable as bounds) count as flagged here. A pool without any unreliable
      prompt is the aggregate under the per-prompt rules, zero-hit prompts carrying their bounds.

    No interval computed from drawn weights covers probability mass never drawn in the pool.
    """
    confidence = check_confidence(confidence)
    runs = [list(r) for r in runs]
    if not runs or any(not r for r in runs):
        raise InputError("pool needs at least one run, each with at least one estimate")
    flat = [e for r in runs for e in r]
    n = np.array([float(e.n_samples) for e in flat])
    u = n / n.sum()
    n_unreliable = sum(not e.reliable for e in flat)
    hits, ess, skew = _pooled_tail(flat, u)

    def pooled(agg, ci_high, reliable, interval, warnings):
        return Pooled(n_runs=len(runs), n_prompts=agg.n_prompts, n_samples=agg.n_samples, p_hat=agg.p_hat,
                      ci_low=agg.ci_low, ci_high=ci_high, std_error=agg.std_error, reliable=reliable,
                      bound_only=not reliable, n_unreliable=n_unreliable, interval=interval, confidence=confidence,
                      log_spread=agg.log_spread, top_share=agg.top_share, hits=hits, ess_wh=ess, skew=skew,
                      warnings=tuple(warnings) + (() if reliable else
                                                  ("the pooled figure is an upper bound only: read ci_high, not p_hat",)))

    if not n_unreliable:  # the aggregate under the per-prompt rules (zero-hit prompts carry their bound)
        agg = aggregate(flat, confidence=confidence, weights=n)
        return pooled(agg, agg.ci_high, agg.reliable, agg.interval, agg.warnings)
    # Every p_hat as it is: the flagged prompts (unreliable, or bounds only) relieved of their bounds.
    flagged = [not e.reliable or e.upper_bound_only for e in flat]
    calibrated = aggregate([dataclasses.replace(e, reliable=True, upper_bound_only=False) if f else e
                            for e, f in zip(flat, flagged)], confidence=confidence, weights=n)
    warnings = list(calibrated.warnings)
    failed = _pooled_checks(flat, flagged, calibrated, hits, ess, skew)
    if calibrated.reliable and not failed:
        warnings.append(f"{n_unreliable} of {len(flat)} per-prompt estimates are unreliable on their own; pooled "
                        f"over {len(flat)} prompts their noise averages out (effective sample size {ess:.0f}, "
                        f"skew {skew:.2f}), so they enter with their p_hat")
        return pooled(calibrated, calibrated.ci_high, True, calibrated.interval, warnings)
    hi, interval = calibrated.ci_high, calibrated.interval
    carried = _carried_bound(flat, flagged, u, confidence)
    if carried > hi:
        hi, interval = min(1.0, carried), "bounds"
    warnings.extend(failed)
    warnings.append(f"{n_unreliable} of {len(flat)} per-prompt estimates are unreliable: their part, and that of "
                    "the prompts without a hit, enters the upper end with a conservative bound over their samples")
    return pooled(calibrated, hi, False, interval, warnings)


def _pooled_tail(flat: Sequence[Estimate], u: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """(H, ESS, H / ESS^1.5) of the pooled mean's terms u_i w h / n_i: prompt i's terms sum to
    u_i p_hat_i and their squares to u_i^2 p_hat_i^2 / ess_wh_i (its ESS of w h), so both come
    from the stored estimates."""
    p = np.array([e.p_hat for e in flat])
    e_wh = np.array([e.ess_wh for e in flat])
    hit = (p > 0) & (e_wh > 0)
    hits = float(sum(e.n_hits_effective for e in flat))
    if not hit.any():
        return hits, None, None
    total = float(np.sum(u[hit] * p[hit]))
    squares = float(np.sum((u[hit] * p[hit]) ** 2 / e_wh[hit]))
    ess = total * total / squares
    return hits, ess, hits / ess ** 1.5


def _pooled_checks(flat, flagged, calibrated, hits, ess, skew) -> list[str]:
    """Why a pool with unreliable prompts cannot take their p_hat (empty when it can; `pool`)."""
    failed = []
    m = len(flat)
    if m < POOL_MIN_PROMPTS:
        failed.append(f"{m} pooled prompts (< {POOL_MIN_PROMPTS}): too few for the unreliable prompts' noise to "
                      "average out")
    unbounded = sum(1 for e, f in zip(flat, flagged) if f and not (e.defensive_share or 0) > 0)
    if unbounded:
        failed.append(f"{unbounded} unreliable prompt(s) without a known defensive share: their weights are "
                      "not bounded")
    if any(e.p_hat > 1.0 for e in flat):
        failed.append("a prompt's p_hat exceeds 1: its weights are badly behaved")
    if calibrated.top_share is not None and calibrated.top_share > TOP_SHARE_WARN:
        failed.append(f"one prompt carries {calibrated.top_share:.0%} of the pooled mean")
    if ess is None or ess < MIN_ESS_WH:
        failed.append(f"effective sample size of the pooled terms {0.0 if ess is None else ess:.1f} < "
                      f"{MIN_ESS_WH:.0f}: a few samples carry the pooled mean")
    elif skew > MAX_MEAN_SKEW:
        failed.append(f"pooled skew {skew:.2f} > {MAX_MEAN_SKEW}: the pooled mean rests on a few heavy weights "
                      f"(effective sample size {ess:.0f} for {hits:.0f} effective hits)")
    return failed


def _carried_bound(flat, flagged, u: np.ndarray, confidence: float) -> float:
    """sum of u_i p_hat_i over reliable prompts, plus the flagged prompts' share times the joint
    conservative bound over their samples (`pool`); flagged prompts without a known defensive
    share carry their own ci_high."""
    carried = 0.0
    joint = {i for i, (e, f) in enumerate(zip(flat, flagged)) if f and (e.defensive_share or 0) > 0}
    for i, (e, f) in enumerate(zip(flat, flagged)):
        if not f:
            carried += u[i] * e.p_hat
        elif i not in joint:
            carried += u[i] * e.ci_high
    if joint:
        a = min(flat[i].defensive_share for i in joint)
        n = sum(flat[i].n_samples for i in joint)
        mean = a * sum(flat[i].n_samples * flat[i].p_hat for i in joint) / n
        bound = min(1.0, chernoff_upper(min(mean, 1.0), n, confidence) / a)
        carried += float(sum(u[i] for i in joint)) * bound
    return carried


def _check_positive(value: float, name: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def choose_bet(reference_p: Sequence[float], upper: float, factor: float) -> float:
    """The bet c in [0, MAX_BET] maximising mean log(1 - c + c factor p_j / upper) over the
    reference's run estimates p_j (fixed before the runs it will judge: see the module doc)."""
    upper = _check_positive(upper, "upper")
    factor = _check_positive(factor, "factor")
    p = np.asarray(reference_p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.all(np.isfinite(p)) or (p < 0).any():
        raise InputError("reference_p must be a non-empty list of non-negative run estimates")
    ratio = factor * p / upper
    growth = np.mean(np.log1p(_BET_GRID[:, None] * (ratio[None, :] - 1.0)), axis=1)
    return float(_BET_GRID[int(np.argmax(growth))])


def e_value(p_run: float, upper: float, bet: float) -> float:
    """1 - bet + bet p_run / upper: an e-value for "the risk is at most `upper`" (module doc)."""
    p_run = float(p_run)
    if not (math.isfinite(p_run) and p_run >= 0):
        raise InputError(f"p_run must be a non-negative number, got {p_run!r}")
    upper = _check_positive(upper, "upper")
    if not 0.0 <= bet <= 1.0:
        raise InputError(f"bet must be in [0, 1], got {bet!r}")
    return 1.0 - bet + bet * p_run / upper


def shiryaev_roberts(previous: float, e: float) -> float:
    """The e-detector's next statistic: e (previous + 1), starting from previous = 0."""
    return e * (previous + 1.0)


@dataclass(frozen=True)
class Reference:
    """What an armed detector compares new runs with: a pooled history's upper bound and the bet."""

    p_hat: float
    upper: float
    """The history's ci_high: the level "no rise" is tested against, its uncertainty included."""
    bet: float
    n_runs: int
    bound_only: bool

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def arm(pooled: Pooled, run_p: Sequence[float], factor: float) -> Reference:
    """A reference from a pooled history and its runs' own estimates (which set the bet)."""
    if not (pooled.ci_high > 0):  # nothing to bet against: a detector that never fires
        return Reference(pooled.p_hat, 1.0, 0.0, pooled.n_runs, pooled.bound_only)
    return Reference(pooled.p_hat, pooled.ci_high, choose_bet(run_p, pooled.ci_high, factor), pooled.n_runs,
                     pooled.bound_only)


@dataclass(frozen=True)
class Detection:
    """The e-detector after the last of a series' runs (`detect`)."""

    status: str
    """"calibrating" (collecting the runs of a new reference), "armed", or "alarm" (the last run
    raised one; the detector then re-arms on the next `reference_runs` runs)."""
    evidence: float | None
    """R_t after the last run (0 at the run that armed it); None while calibrating."""
    threshold: float
    """1 / alpha: an alarm when evidence reaches it."""
    reference: Reference | None
    """The reference the last run was judged against (None while calibrating)."""
    runs_since_armed: int
    alarms: tuple[int, ...]
    """Indices (into the runs given) of every run that raised an alarm."""

    def to_dict(self) -> dict:
        return {"status": self.status, "evidence": _jsonable(self.evidence), "threshold": self.threshold,
                "reference": None if self.reference is None else self.reference.to_dict(),
                "runs_since_armed": self.runs_since_armed, "alarms": list(self.alarms)}


def detect(run_p: Sequence[float], alpha: float, reference_runs: int,
           make_reference: Callable[[int, int], Reference], initial: Reference | None = None) -> Detection:
    """Replay the e-detector over a series' run estimates (oldest first).

    `initial` is the reference the series starts armed with (the previous model version's pooled
    history); without one, the first `reference_runs` runs are pooled into it
    (`make_reference(start, stop)` pools runs start..stop-1). After an alarm the detector re-arms
    the same way on the next `reference_runs` runs: the new level becomes the reference, so the
    next alarm needs a further rise, and the guarantee (module doc) holds afresh from each arming.
    The replay is deterministic, so a restarted daemon carries on exactly.
    """
    if not 0.0 < float(alpha) < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha!r}")
    if int(reference_runs) < 1:
        raise InputError(f"reference_runs must be >= 1, got {reference_runs!r}")
    threshold = 1.0 / float(alpha)
    ref, start, r, since = initial, 0, 0.0, 0
    status, evidence, judged_by, alarms = "calibrating", None, None, []
    for t, p in enumerate(run_p):
        if ref is None:
            if t + 1 - start >= reference_runs:
                ref = make_reference(start, t + 1)
                r, since, status, evidence, judged_by = 0.0, 0, "armed", 0.0, ref
            else:
                status, evidence, judged_by = "calibrating", None, None
            continue
        # A reference without a bet gives e = 1 at every run: no evidence either way. The
        # Shiryaev-Roberts statistic would still count the runs (R_t = t) and "alarm" at run
        # 1 / alpha whatever the data; such a detector stays at 0 and never fires.
        r = shiryaev_roberts(r, e_value(p, ref.upper, ref.bet)) if ref.bet > 0 else 0.0
        since += 1
        judged_by, evidence = ref, r
        if r >= threshold:
            alarms.append(t)
            status, ref, start = "alarm", None, t + 1
        else:
            status = "armed"
    return Detection(status, evidence, threshold, judged_by, since, tuple(alarms))


__all__ = ["MAX_BET", "POOL_MIN_PROMPTS", "Detection", "Pooled", "Reference", "arm", "choose_bet", "detect", "e_value",
           "pool", "shiryaev_roberts"]
