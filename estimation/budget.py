"""Spending a total sample budget over a set of prompts where it reduces the variance most.

**Procedure** (`estimate_with_budget`): m prompts, a budget of B samples in all.
1. Pilot: n0 = floor(pilot_share B / m) samples per prompt (at least 2), drawn with seeds of
   their own. Each prompt's pilot estimate gives sigma_i, the estimated standard deviation of one
   sample's contribution (sqrt(n0) times its stratified standard error).
2. Main: the remaining B - m n0 samples go where they reduce the variance of the mean over
   prompts, Var = (1/m^2) sum_i sigma_i^2 / n_i, most. Minimising it subject to sum n_i = rest
   and n_i >= floor gives n_i = max(floor, lambda sigma_i) (Neyman allocation with a floor; the
   KKT conditions of a convex problem), found by water-filling: allocate in proportion to sigma,
   pin the prompts that fall below the floor at the floor, repeat with what is left. Counts are
   rounded by largest remainder so that they sum to the rest exactly and respect the floor.
3. Each prompt is then estimated from its n_i main samples alone, by the one estimation path
   (`estimate_prompt`) with fresh seeds.

**Why the pilot samples are discarded.** Given the pilot, n_i is fixed and the main samples are
drawn independently of it, so E[p_hat_i | pilot] = P_i and p_hat_i is unbiased. Pooling the pilot
with the main samples by sample size, (n0 p0_i + n_i p_main_i) / (n0 + n_i), is not: n_i depends
on the pilot's own samples through sigma_i, and sigma_i and p0_i rise together (a large w h
raises both), so a high pilot estimate is diluted by a larger n_i more often than a low one and
the pooled estimate is biased low (tests/proposals/test_prop_allocation.py computes that bias
exactly in a small case). An unbiased pooling would need weights fixed before the pilot, which
wastes the main samples when n_i turns out large; discarding the pilot is the simple correct
choice and costs only the pilot share.

A prompt whose pilot saw no harmful sample has sigma_i = 0 and gets the floor: the floor is what
protects prompts whose risk the pilot could not see, so choose it with that in mind.

This reduces the sampling (within-prompt) variance of the mean over these prompts; the
between-prompt part of the aggregate's variance depends on which prompts were drawn, not on
how samples are spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from tailmon.engines.base import Engine
from tailmon.errors import InputError
from tailmon.estimation.pipeline import (
    MAX_SAMPLES,
    EstimationPlan,
    EstimationReport,
    check_prompts,
    estimate_prompt,
    occurrences,
    with_samples,
)
from tailmon.estimation.prompts import PromptItem

DEFAULT_PILOT_SHARE = 0.2
MIN_PILOT = 2  # a standard error needs two samples


def neyman_allocation(total: int, sigmas: Sequence[float], floor: int) -> list[int]:
    """Integer n_i >= floor summing to `total` that minimise sum_i sigma_i^2 / n_i (n_i ~ sigma_i
    above the floor). Prompts with sigma 0 get the floor; when every sigma is 0, an even split."""
    sig = np.asarray(sigmas, dtype=float)
    m = sig.size
    if m == 0:
        raise InputError("no prompts to allocate samples to")
    if not np.all(np.isfinite(sig)) or (sig < 0).any():
        raise InputError("sigmas must be finite and >= 0")
    if int(floor) != floor or floor < 0:
        raise InputError(f"the floor must be an integer >= 0, got {floor}")
    if int(total) != total or total < m * floor:
        raise InputError(f"a budget of {total} samples cannot give {m} prompts {floor} each")
    pinned = np.zeros(m, dtype=bool)
    while True:
        free = ~pinned
        rest = total - floor * pinned.sum()
        s = sig[free].sum()
        x = np.full(m, float(floor))
        x[free] = rest * sig[free] / s if s > 0 else rest / free.sum()
        low = free & (x < floor)
        if not low.any():
            break
        pinned |= low
    counts = np.floor(x + 1e-9).astype(int)  # (+1e-9: a share that is exactly an integer stays it)
    counts = np.maximum(counts, floor)
    short = total - int(counts.sum())
    order = np.argsort(-(x - counts), kind="stable")
    for i in order[:max(short, 0)]:
        counts[i] += 1
    assert counts.sum() == total and (counts >= floor).all()
    return counts.tolist()


@dataclass
class PromptAllocation:
    prompt: str
    pilot_samples: int
    pilot_p_hat: float
    pilot_n_harmful: int
    sigma: float
    samples: int
    """Main samples, the only ones in the estimate."""

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "pilot_samples": self.pilot_samples, "pilot_p_hat": self.pilot_p_hat,
                "pilot_n_harmful": self.pilot_n_harmful, "sigma": self.sigma, "samples": self.samples}


@dataclass
class BudgetReport:
    report: EstimationReport
    budget: int
    pilot_share: float
    floor: int
    allocation: list[PromptAllocation]

    def to_dict(self) -> dict:
        data = self.report.to_dict()
        data["n_samples"] = None  # per prompt: see each estimate's n_samples and `budget`
        data["budget"] = {
            "total": self.budget,
            "pilot_share": self.pilot_share,
            "pilot_samples": sum(a.pilot_samples for a in self.allocation),
            "main_samples": sum(a.samples for a in self.allocation),
            "floor": self.floor,
            "rule": "pilot evenly, then n_i = max(floor, lambda sigma_i); pilot samples are not in the estimates",
            "prompts": [a.to_dict() for a in self.allocation],
        }
        return data


def pilot_seed(seed: int) -> int:
    """The pilot's base seed: its draws are independent of the main draws (which use `seed`)."""
    return int(np.random.SeedSequence([int(seed), 0x70696C6F]).generate_state(1)[0])


def estimate_with_budget(engine: Engine, plan: EstimationPlan, prompts: Sequence[PromptItem], budget: int, *,
                         pilot_share: float = DEFAULT_PILOT_SHARE, floor: int | None = None,
                         progress: Callable[[int], None] | None = None) -> BudgetReport:
    """Estimate every prompt with `budget` samples in all, spread by a pilot (see the module doc).

    `plan.n_samples` is ignored; `floor` (main samples per prompt at least) defaults to the pilot
    size. Every sample drawn, pilot included, counts against the budget.
    """
    if not prompts:
        raise InputError("no prompts to estimate")
    m = len(prompts)
    if not (0 < pilot_share < 1):
        raise InputError(f"pilot share must be in (0, 1), got {pilot_share}", setting="pilot_share")
    if int(budget) != budget or budget < 1:
        raise InputError(f"budget must be an integer >= 1, got {budget}", setting="budget")
    if budget > MAX_SAMPLES * m:
        raise InputError(f"budget must be at most {MAX_SAMPLES} samples per prompt ({MAX_SAMPLES * m} for {m} "
                         f"prompts), got {budget}", setting="budget")
    n0 = max(MIN_PILOT, int(math.floor(pilot_share * budget / m)))
    floor = n0 if floor is None else floor
    if int(floor) != floor or floor < 1:
        raise InputError(f"floor must be an integer >= 1, got {floor}", setting="floor")
    rest = budget - m * n0
    if rest < m * floor:
        raise InputError(f"a budget of {budget} is too small for {m} prompts: the pilot takes {m} x {n0} and the "
                         f"floor needs {m} x {floor} more (at least {m * (n0 + floor)})")
    check_prompts(engine, plan, prompts)
    pilot_plan = with_samples(plan, n0, pilot_seed(plan.seed))
    draws = occurrences(prompts)  # a prompt drawn twice gets independent pilot and main samples
    pilots = [estimate_prompt(engine, pilot_plan, p, progress, k) for p, k in zip(prompts, draws)]
    sigmas = [math.sqrt(n0) * r.estimate.std_error if math.isfinite(r.estimate.std_error) else 0.0 for r in pilots]
    counts = neyman_allocation(rest, sigmas, floor)
    results = [estimate_prompt(engine, with_samples(plan, n), p, progress, k)
               for p, n, k in zip(prompts, counts, draws)]
    allocation = [PromptAllocation(p.text, n0, r.estimate.p_hat, r.estimate.n_harmful, s, n)
                  for p, r, s, n in zip(prompts, pilots, sigmas, counts)]
    return BudgetReport(EstimationReport(engine.model_id, plan, results, engine.name), int(budget), float(pilot_share),
                        int(floor), allocation)
