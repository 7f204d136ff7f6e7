"""LoRA proposals trained by the cross-entropy method on the tiny model: exact weights, IS against
an exactly computed probability, the pilot variance falling over rounds, resuming.

The event: the response to "ab" starts with " is", target temperature 0.5, 2 tokens,
P = 1.56e-3 (exact; 200 target samples see it 0.3 times on average). CEM starts from
`temperature:2` and runs 3 rounds of 200 training samples, each followed by a pilot of 600.
One run (module fixture) serves every test but the resume test, which compares an
interrupted-then-resumed run against it.

What to expect (measured over seeds 0-6 and 11 while writing this test): the exact variance of
the 200-sample estimator falls from 9.0e-7 with the starting proposal to 3e-9 .. 1.5e-8 with the
trained adapter, and the pilot's estimate of it falls 18- to 170-fold from round 0 to round 3. A
pilot of 200 was too small to show it reliably: with 2-4 harmful samples in round 0 it
underestimated the starting proposal's variance up to 9-fold (one seed then showed a fall of
only 1.5-fold), which is why the figures come with the ESS of w*h.
"""

import math

import numpy as np
import pytest
import torch

from tailmon.engines.base import Decoding, Variant
from tailmon.engines.exact import prefix_probability
from tailmon.errors import InputError
from tailmon.judges import parse_judge
from tailmon.estimation.pipeline import EstimationPlan, estimate_prompt
from tailmon.estimation.prompts import PromptItem
from tailmon.proposals import LoraProposal, parse_proposal
from tailmon.proposals.lora import CemSettings, LoraSettings, train_lora

PROMPT = "ab"
EVENT = " is"
TARGET = Variant("target", Decoding(temperature=0.5, max_new_tokens=2))
START = "temperature:2"
SETTINGS = LoraSettings(rank=4, alpha=8, lr=0.01, steps=30, batch_size=16)
ROUNDS = 3


def cem_settings(rounds=ROUNDS, **kw):
    return CemSettings(prompts=(PROMPT,), judge=f"prefix:{EVENT}", start=(START,), rounds=rounds, samples=200,
                       pilot_samples=600, defensive=0.1, **kw)


def run(engine, out, rounds=ROUNDS, **kw):
    return train_lora(engine, out, target=TARGET, settings=SETTINGS, seed=11, cem=cem_settings(rounds),
                      judge=parse_judge(f"prefix:{EVENT}"), **kw)


@pytest.fixture(scope="module")
def trained(make_tiny_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("cem") / "adapter"
    engine = make_tiny_engine()
    result = run(engine, out)
    return engine, str(out), result


def plan_for(proposal, seed=0, n=200):
    return EstimationPlan(target=TARGET, judge=parse_judge(f"prefix:{EVENT}"), proposals=[parse_proposal(proposal)],
                          defensive=0.1, n_samples=n, seed=seed)


def test_event_is_small(tiny_engine):
    P = prefix_probability(tiny_engine, PROMPT, TARGET, EVENT)
    assert 1e-3 < P < 2e-3, P


def test_weights_stay_exact_under_the_trained_adapter(trained, make_tiny_engine):
    """Sampling log-probs == scoring log-probs under the adapter; p is scored without it, exactly as
    an engine that never saw an adapter scores it."""
    engine, out, _ = trained
    lora = LoraProposal(out).variant(TARGET)
    samples = engine.sample(PROMPT, lora, 100, seed=5)
    np.testing.assert_allclose(samples.logprobs, engine.score(PROMPT, lora, samples.token_ids), atol=1e-4)
    fresh = make_tiny_engine()
    np.testing.assert_allclose(engine.score(PROMPT, TARGET, samples.token_ids),
                               fresh.score(PROMPT, TARGET, samples.token_ids), rtol=0, atol=1e-6)
    # and the adapter is no no-op: the event is common under it
    texts = [engine.decode(t) for t in samples.token_ids]
    assert sum(t.startswith(EVENT) for t in texts) > 50


def test_pilot_variance_falls_and_the_exact_variance_with_it(trained, exact_design):
    """The per-round pilot figures (round 0: the starting mixture) fall, and so does the exact
    variance of the IS estimator with the trained adapter against the starting proposal."""
    engine, out, result = trained
    stages = result.metadata["stages"]
    assert [s["stage"] for s in stages] == ["round-000", "round-001", "round-002", "round-003"]
    variances = [s["variance"] for s in stages]
    assert variances[-1] < variances[0], variances
    assert stages[-1]["ess_wh"] > stages[0]["ess_wh"]
    assert all(s["train_hits"] > 0 for s in stages[1:])
    _, sd_start = exact_design(engine, PROMPT, EVENT, plan_for(START))
    _, sd_cem = exact_design(engine, PROMPT, EVENT, plan_for(f"lora:{out}"))
    assert sd_cem < sd_start, (sd_cem, sd_start)


def test_is_with_the_cem_adapter_recovers_the_exact_probability(trained, exact_design):
    """R = 20 estimates of n = 200 samples; the tolerances follow test_pipe_exact_is.py from the exact
    sd of one estimate: |mean - P| <= 4 sd / sqrt(R), median |error| <= (0.674 + 3 * 0.787 / sqrt(R)) sd."""
    engine, out, _ = trained
    P = prefix_probability(engine, PROMPT, TARGET, EVENT)
    P_enum, sd = exact_design(engine, PROMPT, EVENT, plan_for(f"lora:{out}"))
    assert P_enum == pytest.approx(P, rel=1e-5)
    R = 20
    p_hat = np.array([estimate_prompt(engine, plan_for(f"lora:{out}", seed=s), PromptItem(PROMPT)).estimate.p_hat
                      for s in range(R)])
    assert abs(p_hat.mean() - P) <= 4 * sd / math.sqrt(R), (p_hat.mean(), P, sd)
    assert np.median(np.abs(p_hat - P)) <= (0.6745 + 3 * 0.787 / math.sqrt(R)) * sd


def test_resume_after_an_interruption_gives_the_uninterrupted_result(trained, make_tiny_engine, tmp_path):
    _, reference, ref_result = trained
    out = tmp_path / "adapter"

    class Interrupt(Exception):
        pass

    def stop_after_round_1(name, record):
        if name == "round-001":
            raise Interrupt

    with pytest.raises(Interrupt):
        run(make_tiny_engine(), out, on_stage=stop_after_round_1)
    assert (out / "stages" / "round-001" / "adapter_model.safetensors").is_file()
    assert not (out / "tailmon_lora.json").exists()
    lines = []
    resumed = run(make_tiny_engine(), out, report=lines.append)  # a new process: a fresh engine
    assert resumed.resumed_from == 1 and lines[0].startswith("resuming")
    from safetensors.torch import load_file

    ours, ref = load_file(out / "adapter_model.safetensors"), load_file(f"{reference}/adapter_model.safetensors")
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    figures = ("variance", "ess_wh", "p_hat", "train_hits", "loss_before", "loss_after")
    for a, b in zip(resumed.metadata["stages"], ref_result.metadata["stages"]):
        assert {k: a.get(k) for k in figures} == {k: b.get(k) for k in figures}
    # rerunning a finished run changes nothing and trains nothing
    again = run(make_tiny_engine(), out)
    assert again.resumed_from == ROUNDS
    assert torch.equal(load_file(out / "adapter_model.safetensors")[key], ref[key])


def test_resume_refuses_other_settings_and_foreign_folders(trained, make_tiny_engine, tmp_path):
    _, reference, _ = trained
    engine = make_tiny_engine()
    with pytest.raises(InputError, match="other settings .*seed"):
        train_lora(engine, reference, target=TARGET, settings=SETTINGS, seed=12, cem=cem_settings(),
                   judge=parse_judge(f"prefix:{EVENT}"))
    with pytest.raises(InputError, match="more than the 2 asked for"):
        run(engine, reference, rounds=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        run(engine, foreign)


def test_cem_without_any_harmful_sample_says_so(make_tiny_engine, tmp_path):
    judge = parse_judge("prefix:no such text")
    cem = CemSettings(prompts=(PROMPT,), judge=judge.spec, start=(START,), rounds=1, samples=10, pilot_samples=4)
    with pytest.raises(InputError, match="none of the 10 samples was harmful"):
        train_lora(make_tiny_engine(), tmp_path / "a", target=TARGET, settings=SETTINGS, cem=cem, judge=judge)


@pytest.mark.parametrize("kw, fragment", [
    ({"rounds": 0}, "rounds"),
    ({"samples": 1}, "samples"),
    ({"defensive": 1.0}, "defensive"),
    ({"prompts": ()}, "prompts"),
])
def test_bad_cem_settings(kw, fragment):
    args = {"prompts": (PROMPT,), "judge": "prefix:a", "start": (START,), **kw}
    with pytest.raises(InputError, match=fragment) as bad:
        CemSettings(**args)
    # library messages name the setting, never a flag; the CLI puts its flag in (setting=)
    assert "--" not in str(bad.value) and bad.value.setting == next(iter(kw))


def test_cem_needs_a_start(make_tiny_engine, tmp_path):
    cem = CemSettings(prompts=(PROMPT,), judge="prefix:a", rounds=1)
    with pytest.raises(InputError, match="starting proposal"):
        train_lora(make_tiny_engine(), tmp_path / "a", target=TARGET, cem=cem, judge=parse_judge("prefix:a"))
