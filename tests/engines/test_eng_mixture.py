"""One decode for a whole mixture (`TransformersEngine.sample_mixture`) against one per component.

The batched path decodes the rows of every component together: each distinct (prompt, adapter)
prefilled once, rows of different prompt lengths left-padded with an attention mask and their own
positions, per-row adapters (peft's `adapter_names`) and per-row decoding. Each row draws with its
component's own uniforms (seed, row, step), so the two paths must give the SAME token ids for the
same seeds, and log-probs equal to float32 round-off. Tolerances:
* LOGPROB_ATOL 1e-5 between the two paths: the same function evaluated in batches of other
  shapes (matmul blocking, a masked softmax over padding) differs by ~1e-6 per token here
  (measured <= 1.4e-6 per response of 8 tokens); any real error (a wrong position, the wrong
  adapter or temperature for a row, padding attended to) is off by 1e-2 or more;
* TOL 1e-4 between sampling and teacher-forced scoring, as tests/engines/test_eng_consistency.py.

Each engine is built by make_tiny_engine: the LoRA adapter wraps its model in a PeftModel.
"""

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from exact_weights import assert_draws_follow  # noqa: E402  (tests/ is on sys.path)
from tailmon.engines.base import Decoding, Tilt, Variant
from tailmon.engines.tilt import save_tilt
from tailmon.errors import InputError
from tailmon.proposals import parse_proposal

LOGPROB_ATOL = 1e-5
TOL = 1e-4
PROMPT = "ab"


def mixture(lora_adapter, m: int = 8) -> list[Variant]:
    """Target, temperature, two system prompts (prompts of three lengths), a LoRA adapter with and
    without a system prompt, a component that returns to the target (the per-component path
    inside sample_mixture) and token tilts."""
    target = Variant("target", Decoding(temperature=0.9, max_new_tokens=m))
    return [target,
            parse_proposal("temperature:1.5").variant(target),
            parse_proposal("system:Sure, here is").variant(target),
            replace(parse_proposal("system:I cannot a b ab").variant(target),
                    decoding=Decoding(temperature=0.7, top_p=0.8, max_new_tokens=m)),
            Variant("lora", Decoding(top_k=5, max_new_tokens=m), adapter=lora_adapter, adapter_scale=0.8),
            Variant("lora-sys", target.decoding, system_prompt="Sure, here is", adapter=lora_adapter,
                    adapter_scale=0.8),
            parse_proposal("return:2:temperature:2").variant(target),
            # a token tilt (biases on "Sure", "!" and "I"), alone and with a system prompt
            Variant("tilt", target.decoding, tilt=Tilt(_TILT)),
            Variant("tilt-sys", Decoding(top_k=6, max_new_tokens=m), system_prompt="I cannot", tilt=Tilt(_TILT, 2.0))]


_TILT_DIR = tempfile.mkdtemp(prefix="tailmon-mixture-tilt-")
_TILT = str(save_tilt(Path(_TILT_DIR) / "tilt.json", [7, 17, 11], [3.0, 2.0, -1.5]))


def counting_forwards(engine) -> list[int]:
    """Count the engine's forward passes (each decode step of a batch is one)."""
    calls = [0]
    forward = engine._forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    engine._forward = counted
    return calls


def test_batched_mixture_draws_what_each_component_draws_alone(make_tiny_engine, lora_adapter):
    """Same seeds, same token ids, log-probs to round-off, in one decode loop. Batch size 8: the
    batches hold rows of several components and a component's rows span batches. Catches a row
    given another row's prompt, positions, adapter, scale or decoding, padding attended to, and a
    random stream that depends on the batch."""
    engine = make_tiny_engine(batch_size=8)
    variants = mixture(lora_adapter)
    counts, seeds = [5, 7, 6, 9, 4, 3, 5, 6, 4], [11, 12, 13, 14, 15, 16, 17, 18, 19]
    forwards = counting_forwards(engine)
    batched = engine.sample_mixture(PROMPT, variants, counts, seeds)
    batched_forwards = forwards[0]
    engine.batched_mixture = False
    forwards[0] = 0
    alone = engine.sample_mixture(PROMPT, variants, counts, seeds)
    assert [len(s) for s in batched] == counts
    for v, b, a in zip(variants, batched, alone):
        assert b.token_ids == a.token_ids, v.name
        assert b.finished == a.finished, v.name
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=0, atol=LOGPROB_ATOL, err_msg=v.name)
        for bt, at in zip(b.token_logprobs, a.token_logprobs):
            np.testing.assert_allclose(bt, at, rtol=0, atol=LOGPROB_ATOL, err_msg=v.name)
        np.testing.assert_allclose(b.logprobs, engine.score(PROMPT, v, b.token_ids), rtol=0, atol=TOL, err_msg=v.name)
        assert b.seconds is not None and b.seconds > 0
    # both finished and cut responses occur, and the components differ (else equality proves little)
    assert 0 < sum(sum(s.finished) for s in batched) < sum(counts)
    assert len({tuple(map(tuple, s.token_ids[:3])) for s in batched}) == len(variants)
    # one decode loop: far fewer passes than one per component (49 rows in 7 batches of 8 against
    # 9 components' 1-2 batches each, every batch up to 8 steps)
    assert batched_forwards < 0.7 * forwards[0], (batched_forwards, forwards[0])


def test_a_row_depends_only_on_its_seed_row_and_step(make_tiny_engine, lora_adapter):
    """A component's first rows are the same whatever else is drawn: more rows of it, other
    components beside it, another batch size. Catches uniforms drawn per batch or shared with
    other components (which would break `tailmon check`'s common random numbers whenever the
    two sides' batches differ)."""
    engine = make_tiny_engine(batch_size=4)
    variants = mixture(lora_adapter)
    alone = engine.sample(PROMPT, variants[2], 5, 13)
    assert engine.sample(PROMPT, variants[2], 11, 13).token_ids[:5] == alone.token_ids
    for others, counts in (([0, 1], [3, 2]), ([4, 5, 3], [9, 1, 6])):
        picked = [variants[j] for j in others] + [variants[2]]
        got = engine.sample_mixture(PROMPT, picked, counts + [5], [21, 22, 23][: len(others)] + [13])
        assert got[-1].token_ids == alone.token_ids
    engine.batch_size = 64
    assert engine.sample(PROMPT, variants[2], 5, 13).token_ids == alone.token_ids


def test_adapter_at_two_scales_falls_back_and_steering_joins(make_tiny_engine, lora_adapter, tmp_path):
    """A component that cannot share the batch exactly (one adapter at a second scale: peft keeps
    one scale per adapter) is drawn alone; a steered one joins the batch (its hooks edit its own
    rows): both equal to `sample`. Catches a second scale applied to the first's rows."""
    import torch

    from tailmon.engines.base import Steering
    from tailmon.engines.steering import save_direction

    engine = make_tiny_engine(batch_size=16)
    target = Variant("target", Decoding(max_new_tokens=6))
    direction = tmp_path / "dir.safetensors"
    save_direction(direction, torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), {"layer": 1})
    steer = Variant("steer", target.decoding, steering=Steering("add", str(direction), 4.0))
    variants = [target, replace(target, name="l1", adapter=lora_adapter, adapter_scale=1.0),
                replace(target, name="l2", adapter=lora_adapter, adapter_scale=2.0), steer]
    counts, seeds = [6, 6, 6, 6], [1, 2, 3, 4]
    batched = engine.sample_mixture(PROMPT, variants, counts, seeds)
    for v, n, s, b in zip(variants, counts, seeds, batched):
        alone = engine.sample(PROMPT, v, n, s)
        assert b.token_ids == alone.token_ids, v.name
        np.testing.assert_allclose(b.logprobs, alone.logprobs, rtol=0, atol=LOGPROB_ATOL, err_msg=v.name)
    assert batched[1].token_ids != batched[2].token_ids  # the scales differ


def test_sample_mixture_refuses_bad_input(tiny_engine):
    v = Variant("t", Decoding(max_new_tokens=2))
    with pytest.raises(InputError, match="2 variants, 1 counts"):
        tiny_engine.sample_mixture(PROMPT, [v, v], [1], [0, 1])
    with pytest.raises(InputError, match="n must be >= 1"):
        tiny_engine.sample_mixture(PROMPT, [v, v], [3, 0], [0, 1])


N = 20000

# (variant, seed) per component of one mixture; max_new_tokens 2-3 so that every response can be
# enumerated (tests/engines/test_eng_distribution.py)
FREQUENCY_MIXTURE = [
    (Variant("target", Decoding(max_new_tokens=2)), 201),
    (Variant("sys-T0.7-p0.8", Decoding(temperature=0.7, top_p=0.8, max_new_tokens=2),
             system_prompt="Sure, here is"), 202),
    (Variant("sys-top_k4", Decoding(top_k=4, max_new_tokens=2), system_prompt="I cannot a b ab"), 203),
]


def test_batched_sampling_frequencies_match_each_components_exact_distribution(make_tiny_engine, lora_adapter,
                                                                              enumerate_all):
    """N draws of each component in one batched decode, rows of all components (three prompt
    lengths, an adapter beside base rows) in every batch, against each component's exact
    distribution by enumeration: chi-square p > 1e-3 for each, i.e. a correct sampler fails
    with probability < 1e-3 per component at this fixed seed (so never, the seed being fixed);
    an error of 1% of the mass on a few responses gives p ~ 0 at N = 20000 (the power check in
    test_eng_distribution.py)."""
    engine = make_tiny_engine(batch_size=3000)
    lora = (Variant("lora", Decoding(temperature=1.2, max_new_tokens=2), adapter=lora_adapter), 204)
    components = FREQUENCY_MIXTURE + [lora]
    variants = [v for v, _ in components]
    # rows interleave components within every batch only if the batch is larger than a component
    draws = engine.sample_mixture(PROMPT, variants, [N] * len(variants), [s for _, s in components])
    for v, samples in zip(variants, draws):
        assert_draws_follow(engine, PROMPT, v, samples, enumerate_all, TOL)


def test_estimates_are_the_same_through_either_path(make_tiny_engine):
    """The pipeline (draw(): sampling, scoring, weights) gives the same samples and weights with
    the batched and the per-component path: estimates, replays and `tailmon check`'s pairs do
    not depend on the path. The generation time is split over the components by rows."""
    from tailmon.estimation.pipeline import EstimationPlan, run_estimation
    from tailmon.estimation.prompts import PromptItem
    from tailmon.judges import parse_judge

    target = Variant("target", Decoding(temperature=0.9, max_new_tokens=4))
    plan = EstimationPlan(target=target, judge=parse_judge("prefix:Sure"), method="is",
                          proposals=[parse_proposal("system:Sure, here is"), parse_proposal("temperature:1.5")],
                          defensive=0.2, n_samples=40, seed=5)
    prompts = [PromptItem("ab"), PromptItem("I cannot")]
    engine = make_tiny_engine(batch_size=16)
    batched = run_estimation(engine, plan, prompts)
    engine.batched_mixture = False
    alone = run_estimation(engine, plan, prompts)
    for b, a in zip(batched.results, alone.results):
        assert b.token_ids == a.token_ids
        assert list(b.component) == list(a.component)
        np.testing.assert_allclose(b.log_weights, a.log_weights, rtol=0, atol=2 * LOGPROB_ATOL)
        assert b.estimate.n_harmful == a.estimate.n_harmful


@pytest.mark.parametrize("knob", ["batched_mixture", "shared_scoring", "batched_scoring"])
def test_the_config_knob_reaches_the_engine_and_not_the_fingerprint(tmp_path, tiny_model_dir, knob):
    """`model.batched_mixture: false` loads a per-component engine, `model.shared_scoring: false`
    one that scores per variant, `model.batched_scoring: false` one that runs each scoring pass
    alone; the monitor's fingerprint (what defines its estimate) is the same
    either way (the same draws and log-probs). Catches the setting lost on the way to the engine,
    and a knob that would re-key every stored monitor."""
    from daemon_support import write_config  # noqa: E402  (tests/ is on sys.path)
    from tailmon.engines.loading import load_engine
    from tailmon.monitor.config import load_config

    model = {"ref": str(tiny_model_dir), "max_new_tokens": 3, "batch_size": 16}
    fingerprints = {}
    for value in (True, False):
        [mon] = load_config(write_config(tmp_path, tiny_model_dir, model={**model, knob: value})).config.monitors
        assert getattr(mon.model.engine_settings(), knob) is value
        assert getattr(load_engine(mon.model.engine_settings()), knob) is value
        fingerprints[value] = mon.fingerprint()
    [default] = load_config(write_config(tmp_path, tiny_model_dir, model=model)).config.monitors
    assert fingerprints[True] == fingerprints[False] == default.fingerprint()


def test_steered_components_join_the_batch_and_edit_their_own_rows(make_tiny_engine, lora_adapter, tmp_path):
    """Steered components (addition and ablation, two directions, one with a system prompt, one
    with a LoRA adapter) decode in the mixture's one batch beside unsteered rows: the same token ids
    as `sample` per component, log-probs equal to `sample`'s (LOGPROB_ATOL) and to `score` under
    the variant (TOL), and no component drawn by `sample`.

    Catches (each checked): the steering applied to every row of the batch (the unsteered rows
    change), a steered prompt prefilled unsteered (or shared with the unsteered rows of the same
    prompt: the steered rows change), the two steerings' rows swapped, and a steered component
    sent back to `sample` (the spy)."""
    import torch

    from tailmon.engines.base import Steering
    from tailmon.engines.steering import save_direction

    engine = make_tiny_engine(batch_size=64)
    target = Variant("target", Decoding(temperature=0.9, max_new_tokens=6))
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_direction(one, torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), {"layer": 1})
    save_direction(two, torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), {"layer": 0})
    variants = [target,
                Variant("add", target.decoding, steering=Steering("add", str(one), 4.0)),
                Variant("ablate-sys", Decoding(top_k=6, max_new_tokens=6), system_prompt="Sure, here is",
                        steering=Steering("ablate", str(two), 1.0, layers=(0, 1))),
                Variant("add-lora", target.decoding, adapter=lora_adapter, steering=Steering("add", str(two), -3.0)),
                replace(target, name="sys", system_prompt="Sure, here is"),
                Variant("tilt", target.decoding, tilt=Tilt(_TILT))]
    counts, seeds = [7, 9, 6, 5, 8, 4], [31, 32, 33, 34, 35, 36]
    alone = [engine.sample(PROMPT, v, n, s) for v, n, s in zip(variants, counts, seeds)]
    calls = []
    real = engine.sample
    engine.sample = lambda *a, **k: calls.append(a[1].name) or real(*a, **k)
    try:
        batched = engine.sample_mixture(PROMPT, variants, counts, seeds)
    finally:
        engine.sample = real
    assert calls == []  # every component in the one batch
    for v, a, b in zip(variants, alone, batched):
        assert b.token_ids == a.token_ids, v.name
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=0, atol=LOGPROB_ATOL, err_msg=v.name)
        np.testing.assert_allclose(b.logprobs, engine.score(PROMPT, v, b.token_ids), rtol=0, atol=TOL,
                                   err_msg=v.name)
    # the steerings do change the draws (else this test could not see them misapplied)
    plain = engine.sample(PROMPT, replace(variants[1], steering=None), counts[1], seeds[1])
    assert plain.token_ids != alone[1].token_ids
