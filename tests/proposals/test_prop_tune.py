"""Tuning proposal hyperparameters: templates, candidates, the variance formula against the exact
design, the choice on a grid whose variances are exactly computable, the CLI and `--tune`."""

import json
import math

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from scipy.special import logsumexp

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import InputError, SpecError
from tailmon.judges import parse_judge
from tailmon.cli.main import main
from tailmon.estimation.pipeline import EstimationPlan
from tailmon.proposals import build_mixture, parse_proposal
from tailmon.proposals.tuning import (
    Candidate,
    candidate_moments,
    expand_template,
    parse_weight_grid,
    plan_candidates,
    stratified_variance,
    tune,
)

PROMPT = "ab"
EVENT = "S"  # the response starts with "Sure"
TARGET = Variant("target", Decoding(temperature=0.5, max_new_tokens=2))  # P = 8.8e-3
TEMPLATES = ["temperature:{1.5|3}", "system:{Sure, here is| no no}"]
GRID = (1, 3)
DEFENSIVE = 0.1


# -- templates and candidates ------------------------------------------------------------------------


def test_expand_template():
    assert expand_template("temperature:{1.5|2|3}") == ["temperature:1.5", "temperature:2", "temperature:3"]
    assert expand_template("steer:d.st@{2|4}@{8-12|3,5}") == [
        "steer:d.st@2@8-12", "steer:d.st@2@3,5", "steer:d.st@4@8-12", "steer:d.st@4@3,5"]
    assert expand_template("system:Reply {politely}.") == ["system:Reply {politely}."]  # no '|': literal
    assert expand_template("temperature:{2|2}") == ["temperature:2"]
    with pytest.raises(SpecError, match="template 'temperature:{2|hot}'"):
        expand_template("temperature:{2|hot}")


def test_plan_candidates():
    union, cands = plan_candidates(TEMPLATES, GRID)
    assert union == ["temperature:1.5", "temperature:3", "system:Sure, here is", "system: no no"]
    # 2 x 2 alternatives x 3 weight vectors: (1, 1) stands for (3, 3)
    assert len(cands) == 12 and len(set(cands)) == 12
    assert {c.weights for c in cands} == {(1.0, 1.0), (1.0, 3.0), (3.0, 1.0)}
    single_union, single = plan_candidates(["temperature:{2|3}"], (1, 2, 4))
    assert [c.weights for c in single] == [(1.0,), (1.0,)]
    # the same component twice is skipped
    _, dup = plan_candidates(["temperature:{2|3}", "temperature:{3|4}"], (1,))
    assert all(len(set(c.specs)) == 2 for c in dup) and len(dup) == 3
    assert Candidate(("a", "b"), (1.0, 3.0)).shares(0.2) == pytest.approx([0.2, 0.6])
    # a 0 leaves a proposal out: one candidate per non-empty subset and weighting, each once
    assert parse_weight_grid("0,1") == (0.0, 1.0)
    _, off = plan_candidates(["temperature:2", "system:Sure", "temperature:3"], (0, 1, 2))
    assert len(off) == len(set(off))
    by_specs = {}
    for c in off:
        by_specs.setdefault(c.specs, []).append(c.weights)
    assert by_specs[("temperature:2",)] == by_specs[("system:Sure",)] == [(1.0,)]
    assert sorted(by_specs[("temperature:2", "system:Sure")]) == [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)]
    assert len(by_specs) == 7 and len(off) == 3 + 3 * 3 + 7  # directions of {0,1,2}^3 \ 0: singles, pairs, triples
    assert all(w > 0 for c in off for w in c.weights)
    with pytest.raises(InputError, match="more than"):
        plan_candidates(["temperature:{1|2|3|4|5|6|7|8|9|10}"] * 4, (1, 2), max_candidates=1000)
    with pytest.raises(InputError, match="at least one"):
        plan_candidates([], GRID)
    for bad in ["1,x", "0", "0,0", "", "-1", "1,-1", "nan"]:
        with pytest.raises(InputError, match="weight grid") as error:
            parse_weight_grid(bad)
        assert error.value.setting == "weight_grid"


# -- exactness on the tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact_grid(tiny_engine, enumerate_all, exact_design):
    """Every response of the union mixture, enumerated, and each candidate's exact per-sample
    variance n Var(p_hat) (from conftest's exact design, an independent implementation)."""
    union, cands = plan_candidates(TEMPLATES, GRID)
    comps = build_mixture(TARGET, [parse_proposal(s) for s in union], DEFENSIVE)
    seqs, _ = enumerate_all(tiny_engine, PROMPT, Variant("all", Decoding(max_new_tokens=2)))
    logq = np.stack([tiny_engine.score(PROMPT, c.variant, seqs) for c in comps], axis=1)
    h = np.array([tiny_engine.decode(s).startswith(EVENT) for s in seqs], dtype=float)
    shares = np.array([c.share for c in comps])
    n = 1000  # every candidate's counts a_j n are integers: the exact design has no rounding
    exact = {}
    for c in cands:
        plan = EstimationPlan(target=TARGET, judge=parse_judge(f"prefix:{EVENT}"),
                              proposals=[parse_proposal(s) for s in c.specs], weights=list(c.weights),
                              defensive=DEFENSIVE, n_samples=n)
        _, sd = exact_design(tiny_engine, PROMPT, EVENT, plan)
        exact[c] = sd * sd * n
    return union, cands, logq, h, shares, exact


def _cols(union, cand):
    index = {s: i + 1 for i, s in enumerate(union)}
    return [0] + [index[s] for s in cand.specs], [DEFENSIVE] + cand.shares(DEFENSIVE)


def test_the_reweighted_variance_is_exact(exact_grid):
    """With the expectation over the union mixture taken exactly (mass q_U over the enumerated
    support), the reweighting formula gives each candidate's exact stratified variance."""
    union, cands, logq, h, shares, exact = exact_grid
    mass = np.exp(logsumexp(logq + np.log(shares), axis=1))
    # the log-probs are float32 sums of two tokens: each mass is off by a few float32 eps (1.2e-7)
    assert mass.sum() == pytest.approx(1.0, abs=1e-6)
    for c in cands:
        cols, alphas = _cols(union, c)
        P, m2, m1 = candidate_moments(logq, shares, h, cols, alphas, mass=mass)
        assert P == pytest.approx(float(np.exp(logq[:, 0]) @ h), rel=1e-9)
        assert stratified_variance(m2, m1, alphas) == pytest.approx(exact[c], rel=1e-6)


def test_a_proposal_left_out_is_reweighted_exactly(tiny_engine, exact_grid, exact_design):
    """A grid with 0 adds the candidates that leave proposals out: their variance from the union's
    draws is exact too, and is the variance of the smaller mixture the pipeline would run."""
    union, _, logq, h, shares, _ = exact_grid
    mass = np.exp(logsumexp(logq + np.log(shares), axis=1))
    _, cands = plan_candidates(TEMPLATES, (0,) + GRID)
    singles = [c for c in cands if len(c.specs) == 1]
    assert sorted(c.specs[0] for c in singles) == sorted(union)
    for c in singles + [c for c in cands if len(c.specs) == 2][:2]:
        plan = EstimationPlan(target=TARGET, judge=parse_judge(f"prefix:{EVENT}"),
                              proposals=[parse_proposal(s) for s in c.specs], weights=list(c.weights),
                              defensive=DEFENSIVE, n_samples=1000)
        _, sd = exact_design(tiny_engine, PROMPT, EVENT, plan)
        cols, alphas = _cols(union, c)
        _, m2, m1 = candidate_moments(logq, shares, h, cols, alphas, mass=mass)
        assert stratified_variance(m2, m1, alphas) == pytest.approx(sd * sd * 1000, rel=1e-6)


def test_tune_picks_the_exactly_best_candidate(tiny_engine, exact_grid):
    """On the tiny model every candidate's variance is exact, so the best one is known. Whether a
    pilot of n samples finds it is a matter of its noise, which is computable too: the estimated
    variance V_c is a smooth function of means over the union draws, and by the delta method
    V_c - V_best has standard deviation sqrt(sum_u n_u Var_{q_u}(psi_c - psi_best)) / n, with
    influence psi_c = A w_c h - 2 sum_j a_j m1_cj A q_j / q_c (A = p h / q_U). The design
    (n = 3000) is checked to put every other candidate at least 5 of those deviations behind the
    best (a mis-ranking chance below 3e-7 each); then the tuner must choose the best."""
    union, cands, logq, h, shares, exact = exact_grid
    n = 3000
    best = min(cands, key=exact.get)
    q = np.exp(logq)
    mass = q @ shares
    a = np.exp(logq[:, 0]) * h / mass

    def psi(c):
        cols, alphas = _cols(union, c)
        _, _, m1 = candidate_moments(logq, shares, h, cols, alphas, mass=mass)
        qc = q[:, cols] @ np.array(alphas)
        return a * np.exp(logq[:, 0]) * h / qc - 2 * (a[:, None] * q[:, cols] / qc[:, None]) @ (np.array(alphas) * m1)

    for c in cands:
        if c == best:
            continue
        d = psi(c) - psi(best)
        var = sum(shares[u] * (q[:, u] @ d ** 2 - (q[:, u] @ d) ** 2) for u in range(len(shares))) / n
        assert exact[c] - exact[best] >= 5 * math.sqrt(var), (c, exact[c], exact[best], math.sqrt(var))
    result = tune(tiny_engine, TARGET, parse_judge(f"prefix:{EVENT}"), [PROMPT], TEMPLATES, defensive=DEFENSIVE,
                  samples=n, seed=0, weight_grid=GRID)
    assert result.best == best, (result.best, best)
    assert result.ranking[0]["specs"] == list(best.specs) and result.ranking[0]["relative"] == 1.0
    values = [r["per_sample_variance"] for r in result.ranking]
    assert values == sorted(values) and len(values) == len(cands)
    # the estimate of the winner's variance is an estimate of the exact one
    assert result.ranking[0]["per_sample_variance"] == pytest.approx(exact[best], rel=0.2)
    by_ess = tune(tiny_engine, TARGET, parse_judge(f"prefix:{EVENT}"), [PROMPT], TEMPLATES, defensive=DEFENSIVE,
                  samples=200, seed=0, weight_grid=GRID, objective="ess")
    ess = [r["ess_per_sample"] for r in by_ess.ranking]
    assert ess == sorted(ess, reverse=True)


def test_snippet_is_a_config_proposals_list(tiny_engine):
    result = tune(tiny_engine, TARGET, parse_judge(f"prefix:{EVENT}"), [PROMPT, "I cannot"], TEMPLATES,
                  samples=60, seed=1, weight_grid=GRID)
    data = yaml.safe_load(result.config_snippet())
    assert list(data) == ["proposals"]
    assert [(e["spec"], e["weight"]) for e in data["proposals"]] == list(zip(result.best.specs, result.best.weights))
    for entry in data["proposals"]:
        parse_proposal(entry["spec"])
        assert entry["weight"] > 0
    d = result.to_dict()
    assert d["prompts"] == [PROMPT, "I cannot"] and d["samples_per_prompt"] == 60
    assert len(d["pilot"]) == 2 and d["informative_prompts"] >= 1


def test_no_harmful_pilot_sample_stops_tuning(tiny_engine):
    with pytest.raises(InputError, match="nothing to go on"):
        tune(tiny_engine, TARGET, parse_judge("prefix:no such text"), [PROMPT], ["temperature:{2|3}"], samples=20)


# -- CLI --------------------------------------------------------------------------------------------------


DECODING = ["--temperature", "0.5", "--max-new-tokens", "2", "--quiet"]


def test_tune_cli_writes_the_snippet(tiny_model_dir, tmp_path):
    out = tmp_path / "tuned.yaml"
    result = CliRunner().invoke(main, ["proposals", "tune", "--model", str(tiny_model_dir), "--prompt", PROMPT,
                                       "--judge", f"prefix:{EVENT}", "--proposal", "temperature:{1.5|3}",
                                       "--samples", "80", "--output", str(out), *DECODING])
    assert result.exit_code == 0, result.output
    assert "2 candidates on 1 pilot prompts x 80 samples" in result.stdout
    snippet = yaml.safe_load(out.read_text())
    assert snippet["proposals"][0]["spec"] in ("temperature:1.5", "temperature:3")
    bad = CliRunner().invoke(main, ["proposals", "tune", "--model", str(tiny_model_dir), "--prompt", PROMPT,
                                    "--judge", "prefix:a", "--proposal", "temperature:{1.5|x}"])
    assert bad.exit_code == 2 and "temperature:{1.5|x}" in bad.stderr


def test_estimate_with_tune_reports_the_tuning_apart(tiny_model_dir, tmp_path):
    tune_prompts = tmp_path / "tune.jsonl"
    tune_prompts.write_text('"I cannot"\n"Sure"\n')
    result = CliRunner().invoke(main, ["estimate", "--model", str(tiny_model_dir), "--prompt", PROMPT,
                                       "--judge", f"prefix:{EVENT}", "--proposal", "temperature:{1.5|3}",
                                       "--proposal", "system:{Sure, here is| no no}", "--tune", "--tune-samples", "60",
                                       "--tune-prompts", str(tune_prompts), "--samples", "50", "--format", "json",
                                       *DECODING])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [e["prompt"] for e in report["estimates"]] == [PROMPT]
    tuning = report["tuning"]
    assert tuning["prompts"] == ["I cannot", "Sure"] and tuning["samples_per_prompt"] == 60
    chosen = tuning["proposals"]
    assert [c["label"] for c in report["components"]] == ["target"] + [c["spec"] for c in chosen]
    total = sum(c["weight"] for c in chosen)
    assert [c["share"] for c in report["components"][1:]] == pytest.approx([0.9 * c["weight"] / total for c in chosen])
    assert report["estimates"][0]["n_samples"] == 50
    mc = CliRunner().invoke(main, ["estimate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--judge", "prefix:a",
                                   "--method", "mc", "--tune"])
    assert mc.exit_code == 2 and "--tune" in mc.stderr
