"""Allocation of a total sample budget over prompts (tailmon.estimation.budget): the Neyman rule
with a floor, why the pilot is discarded (exactly), unbiasedness on the tiny model, `--budget`."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import binom

from tailmon.engines.base import Decoding, Variant
from tailmon.engines.exact import prefix_probability
from tailmon.errors import InputError
from tailmon.judges import parse_judge
from tailmon.estimation.budget import estimate_with_budget, neyman_allocation, pilot_seed
from tailmon.cli.main import main
from tailmon.estimation.pipeline import EstimationPlan
from tailmon.estimation.prompts import PromptItem
from tailmon.proposals import parse_proposal


def objective(n, sigmas):
    return sum(s * s / k for s, k in zip(sigmas, n))


@pytest.mark.parametrize("total, sigmas, floor", [
    (100, [1.0, 2.0, 3.0, 4.0], 5),
    (100, [0.01, 0.01, 10.0], 10),       # two prompts pinned at the floor
    (57, [0.3, 0.0, 1.7, 0.9, 0.0], 3),  # zero sigmas: the floor
    (40, [0.0, 0.0, 0.0], 4),            # nothing seen anywhere: an even split
    (12, [1.0, 5.0, 2.0], 4),            # the floor takes everything
    (1000, [1e-6, 1.0, 1.0], 1),
])
def test_neyman_allocation_floor_sum_and_proportionality(total, sigmas, floor):
    n = neyman_allocation(total, sigmas, floor)
    s = np.array(sigmas)
    assert sum(n) == total and min(n) >= floor and all(isinstance(k, int) for k in n)
    if not s.any():
        assert max(n) - min(n) <= 1
        return
    free = [i for i in range(len(n)) if n[i] > floor]
    # KKT of min sum s^2/n, sum n = total, n >= floor: n_i = max(floor, lambda s_i) before rounding,
    # and rounding moves each n_i by less than 1
    for i in free:
        for j in free:
            assert abs(n[i] / s[i] - n[j] / s[j]) <= 1 / s[i] + 1 / s[j] + 1e-9
    for i in range(len(n)):
        if n[i] == floor:
            for j in free:
                assert s[i] * (n[j] - 1) / s[j] <= floor + 1e-9
    even = [total // len(n) + (1 if i < total % len(n) else 0) for i in range(len(n))]
    assert objective(n, s) <= objective(even, s) + 1e-12


def test_neyman_allocation_errors():
    with pytest.raises(InputError, match="cannot give 3 prompts 5 each"):
        neyman_allocation(14, [1, 1, 1], 5)
    with pytest.raises(InputError, match="sigmas"):
        neyman_allocation(10, [1, -1], 1)
    with pytest.raises(InputError, match="no prompts"):
        neyman_allocation(10, [], 1)


def test_pooling_the_pilot_would_be_biased_discarding_it_is_not():
    """Exactly, over every pilot outcome: two prompts, plain Bernoulli samples (w = 1), P = 0.3 and
    0.05, a pilot of 4 each, 20 more allocated with floor 2 from the pilot's sigma. Discarding the
    pilot, E[p_hat_i | pilot] = P_i for every outcome, so E[p_hat_i] = P_i. Pooling by sample
    size, E[(k0 + n_i P_i) / (n0 + n_i)] is not P_i, because n_i depends on k0."""
    P, n0, rest, floor = [0.3, 0.05], 4, 20, 2

    def sigma(k):
        return math.sqrt(k * (n0 - k) / (n0 * (n0 - 1)))

    pooled, discarded = [0.0, 0.0], [0.0, 0.0]
    for k1 in range(n0 + 1):
        for k2 in range(n0 + 1):
            prob = binom.pmf(k1, n0, P[0]) * binom.pmf(k2, n0, P[1])
            n = neyman_allocation(rest, [sigma(k1), sigma(k2)], floor)
            for i, (k, n_i) in enumerate(zip((k1, k2), n)):
                pooled[i] += prob * (k + n_i * P[i]) / (n0 + n_i)
                discarded[i] += prob * (n_i * P[i]) / n_i
    assert discarded == pytest.approx(P, abs=1e-12)
    # biased low by about 1e-2 each (a quarter of P for the rarer prompt)
    assert pooled[0] < P[0] - 5e-3 and pooled[1] < P[1] - 5e-3, pooled


# -- the whole procedure on the tiny model -------------------------------------------------------------

TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=1))
PROMPTS = [PromptItem("ab"), PromptItem("I cannot"), PromptItem("Sure")]
EVENT = ","


def plan(seed):
    return EstimationPlan(target=TARGET, judge=parse_judge(f"prefix:{EVENT}"),
                          proposals=[parse_proposal("temperature:2")], defensive=0.1, n_samples=1, seed=seed)


def test_budget_is_spent_exactly_and_the_pilot_stays_out(tiny_engine):
    rep = estimate_with_budget(tiny_engine, plan(0), PROMPTS, 150, pilot_share=0.2)
    d = rep.to_dict()["budget"]
    assert d["pilot_samples"] == 3 * 10 and d["pilot_samples"] + d["main_samples"] == 150
    assert [r.estimate.n_samples for r in rep.report.results] == [a["samples"] for a in d["prompts"]]
    assert min(a["samples"] for a in d["prompts"]) >= d["floor"] == 10
    assert pilot_seed(0) != 0 and pilot_seed(0) != pilot_seed(1)
    with pytest.raises(InputError, match="too small"):
        estimate_with_budget(tiny_engine, plan(0), PROMPTS, 10)  # pilot 3 x 2, floor 3 x 2
    with pytest.raises(InputError, match="pilot share") as bad:
        estimate_with_budget(tiny_engine, plan(0), PROMPTS, 150, pilot_share=1.0)
    assert bad.value.setting == "pilot_share"  # the CLI names its flag from this


def test_a_prompt_drawn_twice_in_a_budgeted_run_gets_independent_samples(tiny_engine):
    prompts = [PromptItem("ab"), PromptItem("Sure"), PromptItem("ab")]
    rep = estimate_with_budget(tiny_engine, plan(0), prompts, 150, pilot_share=0.2)
    first, _, second = rep.report.results
    assert first.responses[:10] != second.responses[:10]
    again = estimate_with_budget(tiny_engine, plan(0), prompts, 150, pilot_share=0.2)
    assert [r.responses for r in again.report.results] == [r.responses for r in rep.report.results]


def test_budgeted_estimates_are_unbiased(tiny_engine):
    """R = 100 seeded repeats of the whole procedure (pilot, allocation, main estimates) on three
    prompts whose P is exact (5.0e-2, 5.4e-2, 6.8e-2). The allocation varies with the pilot (each
    prompt got from 10 to 70 of the 90 main samples in a trial of 100 repeats); each
    per-prompt mean must still match P within 4 standard errors of the mean of R repeats (the
    spread measured from the repeats themselves; two-sided false alarm 6e-5 per prompt)."""
    P = np.array([prefix_probability(tiny_engine, p.text, TARGET, EVENT) for p in PROMPTS])
    R = 100
    runs = [estimate_with_budget(tiny_engine, plan(seed), PROMPTS, 120, pilot_share=0.25) for seed in range(R)]
    est = np.array([[r.estimate.p_hat for r in run.report.results] for run in runs])
    counts = np.array([[a.samples for a in run.allocation] for run in runs])
    assert (counts.sum(axis=1) == 90).all() and counts.std(axis=0).min() > 5  # the pilot does steer it
    for i in range(len(PROMPTS)):
        se = est[:, i].std(ddof=1) / math.sqrt(R)
        assert abs(est[:, i].mean() - P[i]) <= 4 * se, (PROMPTS[i].text, est[:, i].mean(), P[i], se)
    agg = est.mean(axis=1)
    assert abs(agg.mean() - P.mean()) <= 4 * agg.std(ddof=1) / math.sqrt(R)


def test_estimate_budget_cli(tiny_model_dir):
    result = CliRunner().invoke(main, ["estimate", "--model", str(tiny_model_dir), "--prompt", "ab", "--prompt", "b",
                                       "--judge", f"prefix:{EVENT}", "--proposal", "temperature:2", "--budget", "100",
                                       "--max-new-tokens", "1", "--temperature", "0.7", "--format", "json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    budget = report["budget"]
    assert budget["total"] == 100 and budget["pilot_samples"] + budget["main_samples"] == 100
    assert [e["n_samples"] for e in report["estimates"]] == [p["samples"] for p in budget["prompts"]]
    assert report["n_samples"] is None
    small = CliRunner().invoke(main, ["estimate", "--model", str(tiny_model_dir), "--prompt", "ab", "--judge", "prefix:a",
                                      "--proposal", "temperature:2", "--budget", "3"])
    assert small.exit_code == 2 and "too small" in small.stderr
