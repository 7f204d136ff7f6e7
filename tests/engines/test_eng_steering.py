"""Activation-steering variants in the transformers engine (DESIGN section 3).

The failure this file exists for: research code whose steering hook, through a batch-index
slice, never touched the sequences it was meant to, so q == p and every weight was 1, silently.
So every check here can see a hook that misses rows, positions, batch sizes or code paths:
  * the edit changes the log-probs of every row, in batches of 1, 2, 3 and 7 and across
    sampling batches (5 sequences with batch size 2), and a row's steered log-prob is the same
    in a batch as alone;
  * sampled log-probs under a steered variant equal teacher-forced scores under it;
  * ablation with alpha 1 leaves the residual orthogonal to r at every position and row;
    addition with coefficient 0 is the target bit for bit;
  * the hooks are gone after every call, after an exception inside the forward pass too;
  * importance sampling with a steered proposal recovers exactly computable probabilities.

The direction comes from `compute_direction` on two tiny prompt sets (the same code path as
`tailmon proposals steer`): positive prompts that start like an affirmative answer, negative
ones that start like a refusal. On the tiny model, `steer:@4` moves the first response token
"Sure" from 3% to 24% at temperature 1 (measured), so the edit is large against every tolerance.

TOL = 1e-5 for log-probs of the same sequence from two code paths (batched vs alone, cached
sampling vs padded scoring): float32 logits differ by ~1e-6 per token between such paths
(test_eng_consistency.py), over at most 6 tokens here; a steering hook that misses a row or a
position changes a log-prob by 1e-2 or more (MIN_CHANGE, asserted for every row).
"""

import math

import numpy as np
import pytest
import torch

from tailmon.engines.base import Decoding, Steering, Variant
from tailmon.engines.exact import prefix_probability
from tailmon.engines.steering import compute_direction, decoder_layers, load_direction, save_direction
from tailmon.errors import InputError, RuntimeFailure

TOL = 1e-5
MIN_CHANGE = 1e-2
PROMPT = "ab"
POSITIVE = ["Sure, here is", "Sure", "Sure, here is ab", "here is a"]
NEGATIVE = ["I cannot", "I cannot no", "no no", "I no"]
TARGET = Variant("target", Decoding(max_new_tokens=6))


@pytest.fixture(scope="module")
def direction(tiny_engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("steer") / "tiny.safetensors"
    directions, meta = compute_direction(tiny_engine, POSITIVE, NEGATIVE)
    save_direction(path, directions, meta)
    return str(path)


def steered(path, kind="add", coef=4.0, layers=None, decoding=TARGET.decoding):
    return Variant(f"{kind}{coef}", decoding, steering=Steering(kind, path, coef, layers))


def engine_hooks(engine) -> int:
    return sum(len(layer._forward_hooks) for layer in decoder_layers(engine.model))


# -- (a) every row of every batch size --------------------------------------------------------------


@pytest.mark.parametrize("batch_size, n", [(1, 1), (2, 2), (3, 3), (7, 7), (2, 5)])
def test_hook_changes_every_row_in_every_batch_size(make_tiny_engine, direction, batch_size, n):
    engine = make_tiny_engine(batch_size=batch_size)
    variant = steered(direction)
    samples = engine.sample(PROMPT, variant, n, seed=batch_size * 10 + n)
    seqs = samples.token_ids
    assert len(seqs) == n
    alone = np.array([engine.score(PROMPT, variant, [s])[0] for s in seqs])
    target_alone = np.array([engine.score(PROMPT, TARGET, [s])[0] for s in seqs])
    # sampled in batches of batch_size (prefill once, then one token per step for all rows)
    np.testing.assert_allclose(samples.logprobs, alone, rtol=0, atol=TOL)
    # teacher-forced: all n rows in one padded batch
    together = engine.score(PROMPT, variant, seqs)
    np.testing.assert_allclose(together, alone, rtol=0, atol=TOL)
    # the edit reaches every row, and by the same amount as when the row is alone
    change = together - engine.score(PROMPT, TARGET, seqs)
    np.testing.assert_allclose(change, alone - target_alone, rtol=0, atol=2 * TOL)
    assert np.all(np.abs(change) > MIN_CHANGE), change
    # next-token distributions: every prefix of the batch is steered, equally
    prefixes = [s[:-1] for s in seqs]
    rows = engine.next_token_logprobs(PROMPT, variant, prefixes)
    rows_alone = np.concatenate([engine.next_token_logprobs(PROMPT, variant, [p]) for p in prefixes])
    np.testing.assert_allclose(rows, rows_alone, rtol=0, atol=TOL)
    plain = engine.next_token_logprobs(PROMPT, TARGET, prefixes)
    assert np.all(np.max(np.abs(rows - plain), axis=1) > MIN_CHANGE)


def test_fixed_sequences_of_mixed_lengths_in_one_batch(tiny_engine, direction):
    """Right padding with mixed lengths: the padded tail of a short row must not change the
    steered log-prob of any row (the hook edits padding positions too, harmlessly)."""
    ids = tiny_engine.tokenizer.convert_tokens_to_ids
    seqs = [[ids("Sure")], [ids("Sure"), ids(","), ids(" here")], [ids("I"), ids(" cannot"), 1],
            [ids("ab"), ids("!")], [1], [ids("a"), ids("b"), ids("a"), ids("b"), ids("!"), 1], [ids("\n")]]
    for kind, coef in [("add", 4.0), ("ablate", 1.0)]:
        variant = steered(direction, kind, coef, layers=(0, 1))
        together = tiny_engine.score(PROMPT, variant, seqs)
        alone = np.array([tiny_engine.score(PROMPT, variant, [s])[0] for s in seqs])
        np.testing.assert_allclose(together, alone, rtol=0, atol=TOL)
        assert np.all(np.abs(together - tiny_engine.score(PROMPT, TARGET, seqs)) > MIN_CHANGE)


# -- (b) sampling equals scoring ----------------------------------------------------------------


@pytest.mark.parametrize("kind, coef, layers, decoding", [
    ("add", 4.0, None, Decoding(max_new_tokens=6)),
    ("add", -3.0, (0, 1), Decoding(temperature=0.7, max_new_tokens=6)),
    ("ablate", 1.0, (0, 1), Decoding(temperature=1.3, max_new_tokens=6)),
    # a steered proposal under a truncating target samples untruncated (proposals.variants), but
    # the engine must honour truncation for any variant: checked here directly
    ("add", 4.0, (1,), Decoding(temperature=0.7, top_p=0.8, top_k=6, max_new_tokens=6)),
])
def test_sample_logprobs_equal_score_under_steering(tiny_engine, direction, kind, coef, layers, decoding):
    variant = steered(direction, kind, coef, layers, decoding)
    samples = tiny_engine.sample(PROMPT, variant, 150, seed=3)  # three sampling batches of <= 64
    assert 0 < sum(samples.finished) < 150
    np.testing.assert_allclose(samples.logprobs, tiny_engine.score(PROMPT, variant, samples.token_ids), rtol=0, atol=TOL)
    # q != p: the weights of these samples are not all 1
    plain = tiny_engine.score(PROMPT, Variant("t", decoding), samples.token_ids)
    assert np.median(np.abs(samples.logprobs - plain)) > MIN_CHANGE


# -- (c) what the edit does to the residual stream -------------------------------------------


def capture_residuals(engine, layer_index):
    """The residual stream after decoder layer `layer_index` as the next module receives it
    (after every hook on that layer): a pre-hook on the next layer, or on the final norm."""
    layers = decoder_layers(engine.model)
    nxt = layers[layer_index + 1] if layer_index + 1 < len(layers) else engine.model.model.norm
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    return seen, nxt.register_forward_pre_hook(grab, with_kwargs=True)


def test_ablation_makes_the_residual_orthogonal_at_every_position(tiny_engine, direction):
    """|x . r| / |x| after ablation with alpha 1 is float32 round-off: x . r sums 32 products
    (relative error ~32 * 6e-8 = 2e-6 of |x|), so 1e-5 of |x|. Unablated, the same residuals
    have |cos(x, r)| up to 0.1 or more (asserted), so the bound can fail."""
    r = load_direction(direction).direction
    r = r / r.norm()
    seqs = tiny_engine.sample(PROMPT, TARGET, 5, seed=8).token_ids
    for layer in (0, 1):
        for variant, expect_orthogonal in [(TARGET, False), (steered(direction, "ablate", 1.0, (0, 1)), True)]:
            seen, handle = capture_residuals(tiny_engine, layer)
            try:
                tiny_engine.score(PROMPT, variant, seqs)  # prefill (1 row) and the 5 padded responses
                tiny_engine.sample(PROMPT, variant, 3, seed=1)  # prefill and one-token decode steps
            finally:
                handle.remove()
            assert len(seen) >= 4
            x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
            cos = (x @ r).abs() / x.norm(dim=1)
            if expect_orthogonal:
                assert float(cos.max()) < 1e-5, (layer, float(cos.max()))
            else:
                assert float(cos.max()) > 0.05, (layer, float(cos.max()))


def test_partial_ablation_scales_the_component(tiny_engine, direction):
    """alpha 0.25 leaves 0.75 of the component along r, at every position of every row."""
    r = load_direction(direction).direction
    r = r / r.norm()
    seqs = tiny_engine.sample(PROMPT, TARGET, 4, seed=9).token_ids
    before, handle = capture_residuals(tiny_engine, 1)
    tiny_engine.score(PROMPT, TARGET, seqs)
    handle.remove()
    after, handle = capture_residuals(tiny_engine, 1)
    tiny_engine.score(PROMPT, steered(direction, "ablate", 0.25, (1,)), seqs)
    handle.remove()
    # Ablating layer 1 only: its input is the target's, so the residual differs by the projection.
    for b, a in zip(before, after):
        np.testing.assert_allclose((a @ r).numpy(), 0.75 * (b @ r).numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose((a - b).numpy(), (-0.25 * (b @ r)[..., None] * r).numpy(), rtol=0, atol=1e-5)


def test_addition_with_coefficient_zero_is_the_target_exactly(tiny_engine, direction):
    zero = steered(direction, "add", 0.0, (0, 1))
    a = tiny_engine.sample(PROMPT, TARGET, 40, seed=4)
    b = tiny_engine.sample(PROMPT, zero, 40, seed=4)
    assert a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.logprobs, b.logprobs)  # x + 0 * v == x in floating point
    np.testing.assert_array_equal(tiny_engine.score(PROMPT, zero, a.token_ids), tiny_engine.score(PROMPT, TARGET, a.token_ids))


def test_addition_shifts_the_residual_by_coef_v(tiny_engine, direction):
    v = load_direction(direction).direction
    seqs = tiny_engine.sample(PROMPT, TARGET, 3, seed=10).token_ids
    before, handle = capture_residuals(tiny_engine, 1)
    tiny_engine.score(PROMPT, TARGET, seqs)
    handle.remove()
    after, handle = capture_residuals(tiny_engine, 1)
    tiny_engine.score(PROMPT, steered(direction, "add", 2.5, (1,)), seqs)
    handle.remove()
    for b, a in zip(before, after):
        np.testing.assert_allclose((a - b).numpy(), np.broadcast_to(2.5 * v.numpy(), b.shape), rtol=0, atol=1e-5)


# -- (d) the hooks never outlive a call ---------------------------------------------------------------


def test_hooks_are_removed_after_every_call(tiny_engine, direction):
    samples = tiny_engine.sample(PROMPT, TARGET, 30, seed=5)
    before = tiny_engine.score(PROMPT, TARGET, samples.token_ids)
    rows_before = tiny_engine.next_token_logprobs(PROMPT, TARGET, [[], [7]])
    variant = steered(direction, "add", 4.0, (0, 1))
    for call in (lambda: tiny_engine.sample(PROMPT, variant, 10, seed=6),
                 lambda: tiny_engine.score(PROMPT, variant, samples.token_ids),
                 lambda: tiny_engine.next_token_logprobs(PROMPT, variant, [[], [7]])):
        call()
        assert engine_hooks(tiny_engine) == 0
        np.testing.assert_array_equal(tiny_engine.score(PROMPT, TARGET, samples.token_ids), before)
        np.testing.assert_array_equal(tiny_engine.next_token_logprobs(PROMPT, TARGET, [[], [7]]), rows_before)
    again = tiny_engine.sample(PROMPT, TARGET, 30, seed=5)
    assert again.token_ids == samples.token_ids
    np.testing.assert_array_equal(again.logprobs, samples.logprobs)


@pytest.mark.parametrize("fail_at_call", [1, 2, 3])  # the prefill, the first and second decode step
def test_hooks_are_removed_after_an_exception_inside_the_forward(make_tiny_engine, direction, fail_at_call):
    engine = make_tiny_engine()
    samples = engine.sample(PROMPT, TARGET, 20, seed=7)
    before = engine.score(PROMPT, TARGET, samples.token_ids)
    calls = [0]

    def explode(module, args, output):
        calls[0] += 1
        if calls[0] == fail_at_call:
            raise RuntimeError("boom inside the forward pass")

    # on the lm_head: it runs after every decoder layer, so the steering hooks are installed and
    # have fired when the exception comes
    handle = engine.model.lm_head.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            engine.sample(PROMPT, steered(direction, "add", 4.0, (0, 1)), 8, seed=1)
        calls[0] = fail_at_call - 1
        with pytest.raises(RuntimeError, match="boom"):
            engine.score(PROMPT, steered(direction, "ablate", 1.0, (0, 1)), samples.token_ids)
    finally:
        handle.remove()
    assert engine_hooks(engine) == 0
    np.testing.assert_array_equal(engine.score(PROMPT, TARGET, samples.token_ids), before)


def test_a_hook_on_a_layer_that_never_runs_is_an_error(make_tiny_engine, direction, monkeypatch):
    """The guard against the silent no-op itself: hooks put on modules the forward pass does not
    run (here a copy of the layers) must fail the call, not return target log-probs."""
    import copy

    import tailmon.engines.transformers_engine as transformers_engine

    engine = make_tiny_engine()
    stray = copy.deepcopy(decoder_layers(engine.model))
    monkeypatch.setattr(transformers_engine, "decoder_layers", lambda model: stray)
    with pytest.raises(RuntimeFailure, match="never ran"):
        engine.score(PROMPT, steered(direction), [[7]])
    assert sum(len(layer._forward_hooks) for layer in stray) == 0


def test_steering_through_a_peft_wrapped_model(make_tiny_engine, tiny_engine, direction, lora_adapter):
    """A mixture with a `lora:` and a `steer:` component: once peft wraps the model, the steered
    variant (adapter off) is the same distribution as on the plain model, and a variant with both
    an adapter and a steering samples and scores consistently."""
    engine = make_tiny_engine()
    lora_only = Variant("lora", TARGET.decoding, adapter=lora_adapter)
    engine.sample(PROMPT, lora_only, 2, seed=0)  # loads the adapter: the model is a PeftModel now
    variant = steered(direction, layers=(0, 1))
    samples = tiny_engine.sample(PROMPT, variant, 40, seed=12)
    np.testing.assert_allclose(engine.score(PROMPT, variant, samples.token_ids), samples.logprobs, rtol=0, atol=TOL)
    both = Variant("both", TARGET.decoding, adapter=lora_adapter, steering=variant.steering)
    drawn = engine.sample(PROMPT, both, 40, seed=13)
    np.testing.assert_allclose(drawn.logprobs, engine.score(PROMPT, both, drawn.token_ids), rtol=0, atol=TOL)
    assert np.median(np.abs(drawn.logprobs - engine.score(PROMPT, lora_only, drawn.token_ids))) > MIN_CHANGE
    assert np.median(np.abs(drawn.logprobs - engine.score(PROMPT, variant, drawn.token_ids))) > MIN_CHANGE
    assert engine_hooks(engine) == 0


# -- errors ------------------------------------------------------------------------------------


def test_bad_steering_is_an_input_error(tiny_engine, direction, tmp_path):
    with pytest.raises(InputError, match="out of range"):
        tiny_engine.score(PROMPT, steered(direction, layers=(2,)), [[7]])
    wrong_width = tmp_path / "wide.safetensors"
    save_direction(wrong_width, torch.ones(2, 16), {"layer": 0})
    with pytest.raises(InputError, match="16 dimensions"):
        tiny_engine.score(PROMPT, steered(str(wrong_width)), [[7]])
    deeper = tmp_path / "deep.safetensors"
    save_direction(deeper, torch.ones(3, 32), {"layer": 0})
    with pytest.raises(InputError, match="3 layers"):
        tiny_engine.sample(PROMPT, steered(str(deeper)), 2, seed=0)
    zero = tmp_path / "zero.safetensors"
    save_direction(zero, torch.zeros(2, 32), {"layer": 1})
    with pytest.raises(InputError, match="zero"):
        tiny_engine.next_token_logprobs(PROMPT, steered(str(zero), "ablate", 1.0), [[]])
    with pytest.raises(InputError, match="does not exist"):
        tiny_engine.score(PROMPT, steered(str(tmp_path / "missing.safetensors")), [[7]])
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(2, 32)}, str(foreign))
    with pytest.raises(InputError, match="not a tailmon steering direction"):
        tiny_engine.score(PROMPT, steered(str(foreign)), [[7]])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="cannot read"):
        tiny_engine.score(PROMPT, steered(str(garbage)), [[7]])
    assert engine_hooks(tiny_engine) == 0


def test_direction_files_are_cached_and_reloaded_when_rewritten(make_tiny_engine, direction, tmp_path):
    import shutil

    engine = make_tiny_engine()
    path = tmp_path / "d.safetensors"
    shutil.copy(direction, path)
    variant = steered(str(path), layers=(0, 1))
    first = engine.next_token_logprobs(PROMPT, variant, [[]])
    assert len(engine._directions) == 1
    engine.next_token_logprobs(PROMPT, variant, [[]])
    assert len(engine._directions) == 1  # not loaded again
    file = load_direction(path)
    save_direction(path, -file.directions, file.metadata)  # a recomputed direction, same name
    flipped = engine.next_token_logprobs(PROMPT, variant, [[]])
    assert len(engine._directions) == 1
    np.testing.assert_allclose(flipped, engine.next_token_logprobs(
        PROMPT, steered(direction, coef=-4.0, layers=(0, 1)), [[]]), rtol=0, atol=TOL)
    assert np.max(np.abs(flipped - first)) > MIN_CHANGE


# -- (e) importance sampling with a steered proposal ----------------------------------------------

# Exact P of each event under the target, and the steered proposal's design (defensive 0.1,
# n = 400): relative sd of one estimate from exact enumeration (conftest.exact_is_design),
# 0.15 and 0.28 (measured; asserted < 0.35 so the normal interval is sound, see
# test_pipe_exact_is.py). Monte Carlo with the same 400 samples has relative sd
# sqrt((1 - P) / (400 P)) = 1.5 for the first event: steering must beat that to pass.
IS_CASES = [
    # (target decoding, event, proposal spec (PATH filled in), documented exact P)
    (Decoding(temperature=0.3, max_new_tokens=2), "S", "steer:{}@4", 1.06e-3),
    (Decoding(temperature=0.7, max_new_tokens=2), "ass", "ablate:{}@1@0-1", 4.89e-2),
]
R = 30
Z_MEDIAN, SD_MEDIAN = 0.6745, 0.787  # as in test_pipe_exact_is.py


@pytest.mark.parametrize("decoding, text, spec, documented", IS_CASES)
def test_importance_sampling_with_a_steered_proposal_recovers_exact_probabilities(
        tiny_engine, direction, exact_design, decoding, text, spec, documented):
    """Checks as in test_pipe_exact_is.py: unbiasedness (|mean - P| <= 4 sd / sqrt(R)), accuracy
    (median relative error <= (0.674 + 3 * 0.787 / sqrt(R)) rse) and coverage (at least the
    Binomial(R, 0.95) mean minus 3 sigmas of the R intervals contain P). A steering hook that
    never fired would make q == p: plain Monte Carlo, whose median relative error at the first
    event is 1 (no hit in 65% of runs: (1 - P)^400), far above the bound 0.31."""
    from tailmon.judges import parse_judge
    from tailmon.estimation.pipeline import EstimationPlan, estimate_prompt
    from tailmon.estimation.prompts import PromptItem
    from tailmon.proposals import parse_proposal

    target = Variant("target", decoding)
    P = prefix_probability(tiny_engine, PROMPT, target, text)
    assert P == pytest.approx(documented, rel=0.1)

    def plan(seed):
        return EstimationPlan(target=target, judge=parse_judge(f"prefix:{text}"), method="is",
                              proposals=[parse_proposal(spec.format(direction))], defensive=0.1,
                              n_samples=400, seed=seed)

    q = prefix_probability(tiny_engine, PROMPT, plan(0).components[1].variant, text)
    assert q > 2 * P  # the proposal makes the event common
    P_enum, sd = exact_design(tiny_engine, PROMPT, text, plan(0))
    assert P_enum == pytest.approx(P, rel=1e-5)
    assert sd / P < 0.35
    estimates = [estimate_prompt(tiny_engine, plan(seed), PromptItem(PROMPT)).estimate for seed in range(R)]
    p_hat = np.array([e.p_hat for e in estimates])
    assert abs(p_hat.mean() - P) <= 4 * sd / math.sqrt(R), (p_hat.mean(), P, sd)
    assert np.median(np.abs(p_hat - P) / P) <= (Z_MEDIAN + 3 * SD_MEDIAN / math.sqrt(R)) * sd / P
    covered = sum(e.ci_low <= P <= e.ci_high for e in estimates)
    assert covered >= R * 0.95 - 3 * math.sqrt(R * 0.95 * 0.05)
