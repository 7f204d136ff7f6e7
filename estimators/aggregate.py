"""Aggregation of per-prompt estimates into P_query = E_x~D[P(x)] (DESIGN section 2)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tailmon.errors import InputError

from ._checks import check_confidence
from .intervals import normal_interval
from .result import Aggregate, Estimate

UNCATEGORIZED = "uncategorized"


def aggregate(
    estimates: Sequence[Estimate],
    categories: Sequence[str | None] | None = None,
    confidence: float = 0.95,
) -> Aggregate:
    """Mean of per-prompt estimates, with between- and within-prompt variance.

    The prompts are a sample from the prompt distribution D, so P_query is estimated by the mean
    of the per-prompt p_hat_i. With m >= 2 prompts, the sample variance s2 of the p_hat_i
    (ddof=1) estimates between-prompt plus average within-prompt variance; Var = max(s2, w) / m
    with w = mean(std_error_i^2) keeps the within part when the per-prompt estimates happen to
    agree. With one prompt, Var = std_error^2. The interval is normal, clipped to [0, 1], and
    ci_high is at least mean_i(ci_high_i if upper_bound_only_i else p_hat_i), so that prompts
    with no harmful sample carry their upper bound into the aggregate instead of a zero.

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
    by_category: dict[str, Aggregate] = {}
    if categories is not None:
        cats = [UNCATEGORIZED if c is None else str(c) for c in categories]
        if len(cats) != len(ests):
            raise InputError(
                f"categories must have one entry per estimate ({len(ests)}), got {len(cats)}"
            )
        for name in sorted(set(cats)):
            members = [e for e, c in zip(ests, cats) if c == name]
            by_category[name] = _aggregate(members, confidence, {})
    return _aggregate(ests, confidence, by_category)


def _aggregate(ests: list[Estimate], confidence: float, by_category: dict) -> Aggregate:
    m = len(ests)
    p = np.array([e.p_hat for e in ests], dtype=np.float64)
    se = np.array([e.std_error for e in ests], dtype=np.float64)
    p_hat = float(np.mean(p))
    warnings: list[str] = []
    within = float(np.mean(se * se))
    if m >= 2:
        between = float(np.var(p, ddof=1))
        var = max(between, within) / m
    else:
        var = within
        warnings.append("one prompt only: the between-prompt variance is not estimated")
    std_error = math.sqrt(var) if math.isfinite(var) else math.inf
    lo, hi = normal_interval(p_hat, std_error, confidence)
    # prompts reported as upper bounds contribute their bound, not their (near-)zero p_hat
    carried = np.mean([e.ci_high if e.upper_bound_only else e.p_hat for e in ests])
    hi = float(min(1.0, max(hi, float(carried))))
    n_unreliable = sum(1 for e in ests if not e.reliable)
    if n_unreliable:
        warnings.append(f"{n_unreliable} of {m} per-prompt estimates are unreliable")
    return Aggregate(
        n_prompts=m,
        n_samples=int(sum(e.n_samples for e in ests)),
        p_hat=p_hat,
        ci_low=float(lo),
        ci_high=hi,
        std_error=float(std_error),
        n_harmful=int(sum(e.n_harmful for e in ests)),
        reliable=n_unreliable == 0,
        n_unreliable=n_unreliable,
        by_category=by_category,
        warnings=tuple(warnings),
    )
