"""What importance sampling buys: the Monte Carlo samples (and time) that would give the same
standard error, reported with every reliable estimate and with nothing else.

For one prompt, plain Monte Carlo with n samples has variance p(1-p)/n, so the samples MC needs for
the standard error SE an estimate reached are

    n_MC = p_hat (1 - p_hat) / SE^2,

and `mc_sample_ratio` = n_MC / n says how many MC samples each drawn sample was worth (> 1: IS
drew fewer). A sample of IS costs more than one of MC (every component's generation, a scoring
pass per other component, the judge), so the time ratio compares the estimate's own wall time
(generation, scoring and judging of all its samples) with n_MC samples of plain generation and
judging, timed on the same prompt in the same run:

    mc_time_ratio = n_MC * (g + t_judge / n) / t_draw,

t_judge the judge's time for all n samples and g the generation time of one plain sample: the
smaller of the target stratum's time per sample (the defensive share: the deployed model's own
samples, exactly what MC draws) and the whole draw's generation time per sample (every
component, in batches as large as MC's would be). Assumption, stated: MC generates at that
speed. Taking the smaller keeps either measure from flattering IS: a small target stratum pays a
batch's fixed costs for few samples (on the tiny test model, 30 target samples took as long per
sample as a run's whole IS sample with scoring), and slower proposal generation (an adapter, the
second prefill of a component that returns to the target) makes the whole draw's per-sample time
more than plain generation's. Both are wall times on a shared machine: the time ratio is a
measurement, and varies between runs where the sample ratio does not.

None, never a number, for an estimate that is unreliable (its SE does not mean what it says, and
a ratio from it would flatter), zero (a zero-hit bound has no SE to match), or 1 or more. The
run's figures (the aggregate's) sum over its prompts, n_MC over n and MC time over IS time, and
exist only when every prompt has its own: a run with one unreliable prompt reports none.
"""

from __future__ import annotations

import math
from typing import Sequence

from tailmon.estimators import Estimate

FIELDS = ("mc_equivalent_samples", "mc_sample_ratio", "mc_time_ratio")


def mc_equivalent_samples(estimate: Estimate) -> float | None:
    """p_hat (1 - p_hat) / SE^2 for a reliable estimate with 0 < p_hat < 1 and SE > 0, else None."""
    p, se = estimate.p_hat, estimate.std_error
    if not estimate.reliable or estimate.upper_bound_only:
        return None
    if not (math.isfinite(p) and math.isfinite(se)) or not (0 < p < 1) or se <= 0:
        return None
    return p * (1 - p) / se ** 2


def prompt_efficiency(estimate: Estimate, seconds: float | None, plain_seconds_per_sample: float | None) -> dict:
    """The three figures of one prompt's estimate (each None where it is not reported)."""
    n_mc = mc_equivalent_samples(estimate)
    if n_mc is None:
        return dict.fromkeys(FIELDS)
    time_ratio = None
    if plain_seconds_per_sample is not None and seconds is not None and seconds > 0:
        time_ratio = n_mc * plain_seconds_per_sample / seconds
    return {"mc_equivalent_samples": n_mc, "mc_sample_ratio": n_mc / estimate.n_samples, "mc_time_ratio": time_ratio}


def run_efficiency(per_prompt: Sequence[dict], n_samples: Sequence[int], seconds: Sequence[float | None],
                   plain_seconds_per_sample: Sequence[float | None]) -> dict:
    """The run's figures from its prompts' (`prompt_efficiency`): all None unless every prompt has
    its MC-equivalent count; the time ratio only when every prompt has its time ratio too."""
    if not per_prompt or any(e["mc_equivalent_samples"] is None for e in per_prompt):
        return dict.fromkeys(FIELDS)
    n_mc = sum(e["mc_equivalent_samples"] for e in per_prompt)
    out = {"mc_equivalent_samples": n_mc, "mc_sample_ratio": n_mc / sum(n_samples), "mc_time_ratio": None}
    if all(e["mc_time_ratio"] is not None for e in per_prompt):
        mc_time = sum(e["mc_equivalent_samples"] * t for e, t in zip(per_prompt, plain_seconds_per_sample))
        out["mc_time_ratio"] = mc_time / sum(seconds)
    return out
