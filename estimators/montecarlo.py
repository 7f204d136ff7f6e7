"""Plain Monte Carlo: n samples from the target, harm scores h in [0, 1]."""

from __future__ import annotations

import math

import numpy as np

from tailmon.errors import InputError

from ._checks import check_confidence, check_scores
from .intervals import bounded_mean_upper, clopper_pearson_interval, wilson_interval
from .result import Estimate

# Fewer effective hits than this and an estimate is reported as an upper bound (DESIGN section 8).
# Hits are counted as sum(h) (over samples of positive weight, for IS), not as the number of
# scores > 0: a graded judge's score is almost never exactly 0, so that number would be about n
# whatever the harm, while sum(h) is the expected number of harmful samples if each were harmful
# with probability h, and is the plain count for 0/1 scores.
MIN_HARMFUL = 5

_INTERVALS = ("wilson", "clopper-pearson")


def monte_carlo(h, confidence: float = 0.95, interval: str = "wilson") -> Estimate:
    """Monte Carlo estimate of P = E_p[h] from scores `h` of n samples drawn from the target.

    p_hat = mean(h); the interval treats k = sum(h) as a binomial count: "wilson" accepts graded
    scores (non-integer k), "clopper-pearson" requires 0/1 scores. Treating graded scores as
    binomial is conservative, since Var(h) <= P (1 - P) for any h in [0, 1] with mean P; the
    reported std_error is the binomial sqrt(p_hat (1 - p_hat) / n) for the same reason.
    With fewer than 5 effective hits (sum(h), the count of harmful samples for 0/1 scores) the
    estimate is unreliable and ci_high is the figure to use; `ci_high_conservative` is the bound
    valid for any scores in [0, 1] (for 0/1 scores at k = 0, the Clopper-Pearson bound), which
    the gates fall back on.
    """
    scores = check_scores(h, "h")
    confidence = check_confidence(confidence)
    if interval not in _INTERVALS:
        raise InputError(f"interval must be one of {', '.join(_INTERVALS)}, got {interval!r}")
    n = scores.size
    k = float(scores.sum())
    # guard against a sum that rounds a hair above n
    k = min(k, float(n))
    n_harmful = int(np.count_nonzero(scores > 0))
    if interval == "wilson":
        lo, hi = wilson_interval(k, n, confidence)
    else:
        if not np.all((scores == 0) | (scores == 1)):
            raise InputError("the Clopper-Pearson interval needs 0/1 scores; use interval='wilson' for graded scores")
        lo, hi = clopper_pearson_interval(int(round(k)), n, confidence)
    p_hat = k / n
    std_error = math.sqrt(p_hat * (1.0 - p_hat) / n)
    sq = float(np.sum(scores * scores))
    ess_wh = k * k / sq if sq > 0 else 0.0

    warnings: list[str] = []
    # the bound valid for any scores in [0, 1] (for 0/1 scores at k = 0 it equals Clopper-Pearson)
    conservative = bounded_mean_upper(scores, confidence)
    upper_bound_only = k < MIN_HARMFUL
    if upper_bound_only:
        warnings.append(few_hits_warning(n_harmful, k, n))
    return Estimate(
        method="mc",
        n_samples=n,
        p_hat=float(p_hat),
        ci_low=lo,
        ci_high=hi,
        n_harmful=n_harmful,
        h_sum=k,
        n_hits_effective=k,
        ess=float(n),
        ess_wh=float(ess_wh),
        khat=None,
        khat_wh=None,
        kl=None,
        max_weight_share=None,
        self_normalised=None,
        std_error=float(std_error),
        upper_bound_only=upper_bound_only,
        reliable=not upper_bound_only,
        warnings=tuple(warnings),
        ci_high_conservative=float(conservative),
        defensive_share=1.0,
    )


def few_hits_warning(n_harmful: int, hits: float, n: int) -> str:
    """The warning of an estimate with fewer than MIN_HARMFUL effective hits."""
    if hits == n_harmful:  # 0/1 scores: the count says it all
        return f"only {n_harmful} of {n} samples were harmful: ci_high is an upper bound"
    return (f"the scores of the {n_harmful} samples scored above 0 (of {n}) add up to {hits:.3g} expected "
            f"harmful samples, fewer than {MIN_HARMFUL}: ci_high is an upper bound")
