"""`return:K:SPEC`: parsing, the variant it makes, and its place in a mixture."""

import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import SpecError
from tailmon.proposals import ReturnProposal, SystemPromptProposal, TemperatureProposal, build_mixture, parse_proposal

TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=8), system_prompt="deployed")
TRUNCATED = Variant("target", Decoding(temperature=0.7, top_p=0.8, max_new_tokens=8))


def test_parse_keeps_the_inner_spec_whole(lora_adapter):
    """K is the digits before the first colon, the inner spec everything after (colons, '@' and
    all). Catches a parser that splits the inner spec."""
    r = parse_proposal("return:4:system:Reply: yes: always")
    assert isinstance(r, ReturnProposal) and r.k == 4
    assert isinstance(r.inner, SystemPromptProposal) and r.inner.text == "Reply: yes: always"
    assert r.spec == "return:4:system:Reply: yes: always"
    assert parse_proposal(r.spec) == r  # the spec round-trips
    t = parse_proposal("return:12:temperature:1.5")
    assert isinstance(t.inner, TemperatureProposal) and t.k == 12 and t.spec == "return:12:temperature:1.5"
    lo = parse_proposal(f"return:2:lora:{lora_adapter}@0.5")
    assert lo.inner.path == lora_adapter and lo.inner.scale == 0.5


@pytest.mark.parametrize("spec, message", [
    ("return:", "needs an argument"),
    ("return:4", "needs a token count and a proposal"),
    ("return:x:system:a", "needs a token count and a proposal"),
    ("return:-1:system:a", "needs a token count and a proposal"),
    ("return:0:system:a", "K must be >= 1"),
    ("return:2:return:1:system:a", "returns to the target once"),
    ("return:2:bogus:1", "unknown proposal 'bogus:1'"),
    ("return:2:temperature:abc", "must be a number"),
])
def test_bad_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_proposal(spec)


def test_variant_returns_to_the_deployed_target():
    """The head is the inner proposal's variant, cut at K; the continuation is the target itself
    (its system prompt and decoding). Catches a continuation built from the proposal."""
    v = parse_proposal("return:3:system:Sure").variant(TARGET)
    assert v.returns and v.returns_after == 3 and v.continuation == TARGET
    assert v.name == "return:3:system:Sure" and v.system_prompt == "Sure"
    assert v.head.decoding.max_new_tokens == 3 and not v.head.returns and v.head.system_prompt == "Sure"
    assert v.decoding.max_new_tokens == 8


def test_truncation_rule_is_the_inner_proposals():
    """A head that could not cover the target's nucleus samples untruncated (as its inner proposal
    would), a hotter temperature keeps it; the continuation keeps the target's truncation."""
    sys_v = parse_proposal("return:2:system:Sure").variant(TRUNCATED)
    assert not sys_v.decoding.truncates and sys_v.continuation.decoding.top_p == 0.8
    hot = parse_proposal("return:2:temperature:2").variant(TRUNCATED)
    assert hot.decoding.top_p == 0.8


def test_in_a_mixture():
    comps = build_mixture(TARGET, [parse_proposal("return:2:system:Sure"), parse_proposal("temperature:2")], 0.2)
    assert [c.label for c in comps] == ["target", "return:2:system:Sure", "temperature:2"]
    assert comps[1].variant.returns and not comps[2].variant.returns
    assert [c.share for c in comps] == pytest.approx([0.2, 0.4, 0.4])


def test_listed_with_the_other_kinds():
    from tailmon.proposals import PROPOSALS

    entry = PROPOSALS.get("return")
    assert entry.syntax == "return:K:SPEC"


def test_an_adaptive_monitor_does_not_learn_from_a_returning_mixture(tiny_engine, tmp_path):
    """A run whose every component returns to the target keeps log-probs of the first tokens only;
    an adapter's whole-response density cannot join them, so the learner records why and keeps
    its state. Catches an update fitted on mismatched columns (weights off by the later tokens)."""
    from tailmon.estimation.pipeline import EstimationPlan, run_estimation
    from tailmon.estimation.prompts import PromptItem
    from tailmon.judges import parse_judge
    from tailmon.proposals.adaptive import AdaptiveLearner, AdaptiveSettings

    target = Variant("target", Decoding(temperature=0.7, max_new_tokens=3))
    plan = EstimationPlan(target=target, judge=parse_judge("prefix:a"), proposals=[parse_proposal("return:1:temperature:2")],
                          defensive=0.1, n_samples=60, seed=0)
    report = run_estimation(tiny_engine, plan, [PromptItem("ab")])
    assert report.results[0].horizon == 1
    learner = AdaptiveLearner(tmp_path / "state", AdaptiveSettings(steps=2, lr=0.01, rank=4, alpha=8, batch_size=16))
    record = learner.update(tiny_engine, target, plan.components, report.results, seed=0, judge="prefix:a")
    assert not record["adopted"] and "return to the target" in record["reason"]
    assert learner.generation == 0
