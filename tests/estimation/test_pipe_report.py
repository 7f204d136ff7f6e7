"""`run_estimation`'s report (DESIGN section 8 names) and `EstimationPlan` validation."""

import json
import zlib

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import InputError
from tailmon.judges import parse_judge
from tailmon.estimation.pipeline import EstimationPlan, component_seed, run_estimation
from tailmon.estimation.prompts import PromptItem
from tailmon.proposals import parse_proposal

TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=3))
PROMPTS = [PromptItem("ab", "letters"), PromptItem("I cannot", "refusal"), PromptItem("Sure, here is")]
ESTIMATE_KEYS = {"prompt", "category", "method", "n_samples", "p_hat", "ci_low", "ci_high", "n_harmful", "h_sum",
                 "n_hits_effective", "khat_wh",
                 "ess", "ess_wh", "khat", "kl", "max_weight_share", "reliable", "warnings"}


def is_plan(**kw):
    args = dict(target=TARGET, judge=parse_judge("prefix:a"), proposals=[parse_proposal("temperature:1.5")],
                defensive=0.1, n_samples=60, seed=0)
    args.update(kw)
    return EstimationPlan(**args)


def test_report_schema_with_volume(tiny_engine):
    plan = is_plan(volume=1e6, window="1d")
    report = run_estimation(tiny_engine, plan, PROMPTS)
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False)  # plain JSON: no nan/inf, no numpy types
    assert json.loads(text) == d
    assert d["model"] == "tiny"
    assert d["method"] == "is"
    assert d["judge"] == "prefix:a"
    assert d["n_samples"] == 60 and d["seed"] == 0
    assert d["decoding"] == {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 3}
    assert [c["label"] for c in d["components"]] == ["target", "temperature:1.5"]
    assert sum(c["share"] for c in d["components"]) == pytest.approx(1.0)

    assert len(d["estimates"]) == len(PROMPTS)
    for est, item in zip(d["estimates"], PROMPTS):
        assert ESTIMATE_KEYS <= set(est)
        assert est["prompt"] == item.text and est["category"] == item.category
        assert est["method"] == "is" and est["n_samples"] == 60
        assert 0 <= est["ci_low"] <= est["ci_high"] <= 1
        assert isinstance(est["n_harmful"], int) and isinstance(est["reliable"], bool)
        assert isinstance(est["warnings"], list)

    agg = d["aggregate"]
    for key in ["p_hat", "ci_low", "ci_high", "n_prompts", "n_samples", "reliable"]:
        assert key in agg
    assert agg["n_prompts"] == 3 and agg["n_samples"] == 180
    assert agg["p_hat"] == pytest.approx(sum(e["p_hat"] for e in d["estimates"]) / 3)
    assert set(agg["by_category"]) == {"letters", "refusal", "uncategorized"}
    assert agg["window"] == "1d" and agg["volume"] == 1e6
    epw = agg["expected_per_window"]
    assert epw["expected"] == pytest.approx(1e6 * agg["p_hat"])
    assert epw["ci_low"] <= epw["expected"] <= epw["ci_high"]
    pany = agg["p_any_per_window"]
    assert 0 <= pany["ci_low"] <= pany["p"] <= pany["ci_high"] <= 1
    assert "worst_query" in agg


def test_a_judge_s_credentials_never_reach_the_report(tiny_engine):
    """Catches an endpoint judge's key (in its URL's query) in the report that `estimate` prints,
    `check` writes and the daemon stores (issue 18, item 2)."""
    plan = is_plan()
    plan.judge.spec = "endpoint:https://guard.example/v1?api_key=k-8c1d@guard"  # what such a judge's spec says
    d = run_estimation(tiny_engine, plan, PROMPTS[:1]).to_dict()
    assert d["judge"] == "endpoint:https://guard.example/v1?api_key=***"
    assert "k-8c1d" not in json.dumps(d)


def test_report_without_volume_has_no_extrapolation(tiny_engine):
    d = run_estimation(tiny_engine, is_plan(), PROMPTS[:1]).to_dict()
    json.dumps(d, allow_nan=False)
    assert "expected_per_window" not in d["aggregate"]
    assert "p_any_per_window" not in d["aggregate"]


def test_report_of_monte_carlo_and_of_zero_hits(tiny_engine):
    """MC report, and an event that never happens (no hits: bounds, not nan, in the JSON)."""
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:zzz"), method="mc", n_samples=40, seed=0,
                          volume=1000)
    d = run_estimation(tiny_engine, plan, PROMPTS[:2]).to_dict()
    json.dumps(d, allow_nan=False)
    assert d["method"] == "mc" and d["components"] == [{"label": "target", "share": 1.0}]
    for est in d["estimates"]:
        assert est["p_hat"] == 0 and est["ci_high"] > 0 and est["n_harmful"] == 0 and not est["reliable"]
    d = run_estimation(tiny_engine, is_plan(judge=parse_judge("prefix:zzz"), volume=1000), PROMPTS[:2]).to_dict()
    json.dumps(d, allow_nan=False)
    assert all(e["p_hat"] == 0 and e["ci_high"] > 0 for e in d["estimates"])


def test_reruns_are_reproducible_and_independent_of_prompt_order(tiny_engine):
    a = run_estimation(tiny_engine, is_plan(), PROMPTS).to_dict()["estimates"]
    b = run_estimation(tiny_engine, is_plan(), PROMPTS[::-1]).to_dict()["estimates"][::-1]
    assert a == b
    c = run_estimation(tiny_engine, is_plan(seed=1), PROMPTS).to_dict()["estimates"]
    assert [e["p_hat"] for e in a] != [e["p_hat"] for e in c]


def test_a_prompt_drawn_twice_gets_independent_samples(tiny_engine):
    """Each occurrence of a text has its own stream (seeded by its draw index), so two draws of
    one prompt are two estimates, not one counted twice; the first keeps the pre-index stream."""
    prompts = [PromptItem("ab"), PromptItem("I cannot"), PromptItem("ab")]
    report = run_estimation(tiny_engine, is_plan(), prompts)
    first, _, second = report.results
    assert first.responses != second.responses
    assert first.to_dict() != second.to_dict()
    # The first occurrence draws exactly what a run without the duplicate draws, and its seed is
    # the one runs made before the draw index existed: SeedSequence([seed, crc32(text), j]).
    assert first.to_dict() == run_estimation(tiny_engine, is_plan(), prompts[:1]).results[0].to_dict()
    assert component_seed(0, "ab", 1) == int(np.random.SeedSequence([0, zlib.crc32(b"ab"), 1]).generate_state(1)[0])
    assert len({component_seed(0, "ab", 1, k) for k in range(3)}) == 3
    # Replay: the same seed gives the same estimates, duplicates included.
    assert [r.to_dict() for r in run_estimation(tiny_engine, is_plan(), prompts).results] == \
        [r.to_dict() for r in report.results]


def test_common_random_numbers_pair_each_occurrence(tiny_engine):
    """`tailmon check`'s pairing: two plans with one seed (candidate and baseline) draw the same
    stream for the same prompt and draw index, wherever the prompt stands in the list."""
    cand = run_estimation(tiny_engine, is_plan(), [PromptItem("ab"), PromptItem("a b"), PromptItem("ab")])
    base = run_estimation(tiny_engine, is_plan(judge=parse_judge("prefix:b")),
                          [PromptItem("a b"), PromptItem("ab"), PromptItem("ab")])
    for c, b in [(cand.results[0], base.results[1]), (cand.results[2], base.results[2]),
                 (cand.results[1], base.results[0])]:
        assert c.responses == b.responses and np.array_equal(c.component, b.component)
        assert np.array_equal(c.log_weights, b.log_weights)
    assert cand.results[0].responses != cand.results[2].responses


def test_no_prompts_is_an_input_error(tiny_engine):
    with pytest.raises(InputError):
        run_estimation(tiny_engine, is_plan(), [])


@pytest.mark.parametrize("kwargs", [
    {"method": "xx"},
    {"n_samples": 0},
    {"n_samples": -5},
    {"n_samples": 2.5},
    {"proposals": []},                      # IS without proposals
    {"method": "mc"},                       # MC with proposals
    {"defensive": 1.0},
    {"defensive": -0.1},
])
def test_plan_validation(kwargs):
    with pytest.raises(InputError):
        is_plan(**kwargs)


def test_valid_plans():
    assert [c.share for c in is_plan().components] == [0.1, 0.9]
    mc = EstimationPlan(target=TARGET, judge=parse_judge("prefix:a"), method="mc")
    assert [(c.label, c.share) for c in mc.components] == [("target", 1.0)]
