"""`Engine.score_many`: every response under every variant at once, sharing forward passes.

The transformers engine runs one pass per (rendered prompt, adapter, adapter scale, steering) and
processes its logits once per decoding; a variant that returns to the target is scored as its head
(a pass over the first K tokens) plus its continuation's tokens after K (the continuation's pass).
With `batched_scoring` (the default) the passes of different prompts and adapters run in shared
batches (each distinct prompt and adapter prefilled once, left-padded, per-row positions and peft
adapter names); steered passes and a second scale of one adapter run alone.
Every value must equal the per-variant `score`, -inf where a token lies outside a truncated
support, and `draw` must give the weights per-variant scoring gives.

TOL = 1e-5: the same sequence's log-prob from two batch shapes differs by float32 round-off of
the logits, ~1e-6 per token (test_eng_consistency.py), over at most 3 tokens here; a wrong
processing, prompt, adapter, steering or segment moves a log-prob by 1e-2 or more (each variant
below differs from the target by more than that on these responses, asserted).
"""

from __future__ import annotations

import numpy as np
import pytest

from stub_engine import StubEngine  # noqa: E402  (tests/ is on sys.path)
from tailmon.engines import transformers_engine
from tailmon.engines.base import Decoding, Steering, Tilt, Variant
from tailmon.engines.steering import compute_direction, save_direction
from tailmon.errors import InputError
from tailmon.judges import parse_judge
from tailmon.proposals import parse_proposal
from tailmon.proposals.sampling import draw

TOL = 1e-5
PROMPT = "ab"
TARGET = Variant("target", Decoding(max_new_tokens=3))


@pytest.fixture(scope="module")
def direction(tiny_engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("steer-many") / "tiny.safetensors"
    directions, meta = compute_direction(tiny_engine, ["Sure, here is", "Sure", "here is a"], ["I cannot", "no no", "I no"])
    save_direction(path, directions, meta)
    return str(path)


@pytest.fixture(scope="module")
def tilt(tmp_path_factory) -> str:
    from tailmon.engines.tilt import save_tilt

    return str(save_tilt(tmp_path_factory.mktemp("tilt-many") / "tilt.json", [7, 17, 11], [3.0, 2.0, -1.5]))


def every_kind(direction: str, adapter: str | None, tilt: str | None = None) -> list[Variant]:
    """The target first, then one variant of each component type, some sharing a pass."""
    d = TARGET.decoding
    out = [TARGET,
           Variant("T1.5", Decoding(temperature=1.5, max_new_tokens=3)),
           Variant("top-p", Decoding(temperature=0.7, top_p=0.8, max_new_tokens=3)),
           Variant("top-k", Decoding(top_k=3, max_new_tokens=3)),
           Variant("system", d, system_prompt="Sure, here is"),
           Variant("system T0.7", Decoding(temperature=0.7, max_new_tokens=3), system_prompt="Sure, here is"),
           Variant("steer", d, steering=Steering("add", direction, 4.0)),
           Variant("steer T1.5", Decoding(temperature=1.5, max_new_tokens=3), steering=Steering("add", direction, 4.0)),
           parse_proposal("return:2:system:I cannot").variant(TARGET),
           parse_proposal("return:1:temperature:2").variant(TARGET)]
    if tilt is not None:  # a tilt is a processing of the target's own pass
        out += [Variant("tilt", d, tilt=Tilt(tilt)), Variant("tilt top-k", Decoding(top_k=4, max_new_tokens=3),
                                                             tilt=Tilt(tilt, 2.0))]
    if adapter is not None:
        out += [Variant("lora", d, adapter=adapter), Variant("lora half", d, adapter=adapter, adapter_scale=0.5),
                Variant("lora top-k", Decoding(top_k=4, max_new_tokens=3), adapter=adapter)]
    return out


def responses(engine) -> list[list[int]]:
    drawn = engine.sample(PROMPT, TARGET, 40, seed=5).token_ids
    return [[]] + drawn + [[17, 16, 15]]  # the empty response, and unlikely tokens (outside top-k)


def per_variant(engine, variants, seqs, need) -> np.ndarray:
    out = np.full(need.shape, np.nan)
    for j, v in enumerate(variants):
        rows = np.flatnonzero(need[:, j])
        if rows.size:
            out[rows, j] = engine.score(PROMPT, v, [seqs[i] for i in rows])
    return out


def assert_same(got, want, need):
    assert np.isnan(got[~need]).all()  # entries nobody asked for are not read, and say so
    np.testing.assert_allclose(got[need], want[need], rtol=0, atol=TOL)  # infs must sit at the same places


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_equals_per_variant_score_for_every_component_type(make_tiny_engine, lora_adapter, direction, tilt, density):
    """Catches a pass shared by variants that differ in prompt, adapter, scale or steering, a
    decoding applied to another variant's column, a return segment cut at the wrong token, and a
    row left out of a shared pass."""
    engine = make_tiny_engine()
    variants = every_kind(direction, lora_adapter, tilt)
    seqs = responses(engine)
    need = np.random.default_rng(0).random((len(seqs), len(variants))) < density
    want = per_variant(engine, variants, seqs, need)
    got = engine.score_many(PROMPT, variants, seqs, need)
    assert_same(got, want, need)
    full = engine.score_many(PROMPT, variants, seqs) if density < 1 else got
    for j, v in enumerate(variants[1:], 1):  # every variant is a distribution of its own here
        assert np.nanmax(np.abs(full[:, j] - full[:, 0])) > 1e-2, v.name
    truncated = [j for j, v in enumerate(variants) if v.decoding.truncates]
    assert np.isneginf(full[:, truncated]).any() and np.isfinite(full[:, truncated]).any()


def test_variants_that_differ_only_in_decoding_share_one_pass(tiny_engine, direction, tilt, monkeypatch):
    """Counts the model's forward calls: one prompt prefill and one pass over the responses per
    distinct (prompt, weights, steering), whatever the number of decodings on it; a returning
    head's pass reads its first K tokens only (K = 1: the prompt's last logits alone). Each pass
    alone (`batched_scoring=False`; passes batched together: the test below).
    Catches a pass per variant, and a head scored over whole responses."""
    monkeypatch.setattr(tiny_engine, "batched_scoring", False)
    seqs = responses(tiny_engine)
    widths: list[int] = []
    hook = tiny_engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        decodings = [TARGET, Variant("T1.5", Decoding(temperature=1.5, max_new_tokens=3)),
                     Variant("top-k", Decoding(top_k=3, max_new_tokens=3)),
                     Variant("top-p", Decoding(top_p=0.8, max_new_tokens=3)),
                     Variant("tilt", TARGET.decoding, tilt=Tilt(tilt))]
        tiny_engine.score_many(PROMPT, decodings, seqs)
        assert len(widths) == 2  # prefill, then every response in one chunk
        widths.clear()
        system = Variant("system", TARGET.decoding, system_prompt="I cannot")
        head_only = parse_proposal("return:1:system:Sure, here is").variant(TARGET)
        tiny_engine.score_many(PROMPT, decodings + [system, head_only], seqs)
        # target pass (2 calls; it also serves head_only's continuation), system (2), head (prefill only)
        assert len(widths) == 5
    finally:
        hook.remove()


def test_draw_weights_equal_per_variant_scoring(tiny_engine, direction):
    """`draw` scores through `score_many`: every column it did not sample equals `score` of the
    sample under that component, the re-scored own columns equal the sampled log-probs, and the
    balance-heuristic weights follow. Catches a column written to the wrong rows, a need mask that
    leaves a column out, and re-scored values read from another column."""
    variants = every_kind(direction, None)
    variants = [v for v in variants if not v.returns]  # with a returning component all are cut (horizon)
    shares = [0.1] + [0.9 / (len(variants) - 1)] * (len(variants) - 1)
    d = draw(tiny_engine, PROMPT, variants, shares, 90, seed=lambda j: 10 + j, judge=parse_judge("prefix:a"),
             rescore=20)
    for j, v in enumerate(variants):
        rows = np.flatnonzero(d.drawn != j)
        np.testing.assert_allclose(d.logq[rows, j], tiny_engine.score(PROMPT, v, [d.ids[i] for i in rows]),
                                   rtol=0, atol=TOL)
    assert len(d.checked) == 20
    np.testing.assert_allclose(d.rescored, d.logq[d.checked, d.drawn[d.checked]], rtol=0, atol=TOL)
    # the re-scored rows are those of `score` under their own component, not another column
    for i, r in zip(d.checked, d.rescored):
        assert r == pytest.approx(float(tiny_engine.score(PROMPT, variants[d.drawn[i]], [d.ids[i]])[0]), abs=TOL)


def test_the_default_scores_each_variant_on_its_needed_rows_only():
    """The default (`Engine.score_many` for engines without sharing): one `score` per variant with
    the rows that need it, NaN elsewhere; a `need` of another shape is an InputError."""
    engine = Counting()
    need = np.array([[True, False], [True, True], [False, False]])
    got = engine.score_many(PROMPT, [TARGET, TARGET], [[0], [0, 0], [0]], need)
    assert engine.calls == [[0, 1], [1]]
    np.testing.assert_array_equal(np.isnan(got), ~need)
    np.testing.assert_array_equal(got[need], [1.0, 2.0, 2.0])
    with pytest.raises(InputError, match="shape"):
        engine.score_many(PROMPT, [TARGET], [[0]], np.ones((1, 2), dtype=bool))


class Counting(StubEngine):
    """An engine without sharing: records the rows of every `score` call; a response's score is its length."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self._rows: list = []

    def score(self, prompt, variant, responses):
        self.calls.append([self._index(r) for r in responses])
        return np.array([float(len(r)) for r in responses])

    def _index(self, response):
        return next(i for i, r in enumerate(self._rows) if r is response)

    def score_many(self, prompt, variants, responses, need=None):
        self._rows = list(responses)
        return super().score_many(prompt, variants, responses, need)


def test_shared_scoring_off_gives_each_variant_its_own_passes(make_tiny_engine):
    """`shared_scoring=False` (`model.shared_scoring: false`, the path before shared passes, kept
    for comparison) scores through `score` once per variant: two forward calls (prefill, then the
    responses) per variant where the shared path runs two in all, with the same values. Catches the
    switch ignored (what benchmarks/engines.py --overall compares would then be one path twice)."""
    engine = make_tiny_engine()
    seqs = responses(engine)
    variants = [TARGET, Variant("T1.5", Decoding(temperature=1.5, max_new_tokens=3)),
                Variant("top-k", Decoding(top_k=3, max_new_tokens=3))]
    widths: list[int] = []
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        shared = engine.score_many(PROMPT, variants, seqs)
        assert len(widths) == 2
        widths.clear()
        engine.shared_scoring = False
        alone = engine.score_many(PROMPT, variants, seqs)
        assert len(widths) == 2 * len(variants)
    finally:
        hook.remove()
    need = np.ones(shared.shape, dtype=bool)
    assert_same(alone, shared, need)


# -- rows of different prompts and adapters in one batch (`batched_scoring`) --------------------


@pytest.fixture(scope="module")
def second_adapter(tiny_engine, tmp_path_factory) -> str:
    """Another random LoRA adapter for the tiny model, on other modules than `lora_adapter`'s
    (q_proj, v_proj) besides q_proj: in a batch holding rows of both, each layer applies each
    adapter to its own rows only, and skips the rows of an adapter it does not carry."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("tiny-lora-2")
    torch.manual_seed(2)
    model = get_peft_model(copy.deepcopy(tiny_engine.model),  # a copy: the shared engine stays plain
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(str(path))
    return str(path)


LONG_SYSTEM = "I cannot a b ab ! Sure, here is"  # prompts of three lengths: left padding in the prefill


def mixed_kinds(first: str, second: str, direction: str, tilt: str) -> list[Variant]:
    """Every component type, over eight passes that share a batch (the target, which also serves
    both returning variants' continuations; two system prompts; each adapter alone and with a
    system prompt; the head of a returning system prompt, cut at 2 tokens; the returning adapter's
    head, K = 1, shares its adapter's pass) and two that run alone (a steered one, and the first
    adapter at a second scale)."""
    d = TARGET.decoding
    return [TARGET,
            Variant("T1.5", Decoding(temperature=1.5, max_new_tokens=3)),
            Variant("top-p", Decoding(temperature=0.7, top_p=0.8, max_new_tokens=3)),
            Variant("top-k", Decoding(top_k=3, max_new_tokens=3)),
            Variant("tilt", d, tilt=Tilt(tilt)),
            Variant("system", d, system_prompt="Sure, here is"),
            Variant("long system top-k", Decoding(top_k=4, max_new_tokens=3), system_prompt=LONG_SYSTEM),
            Variant("lora", d, adapter=first, adapter_scale=0.8),
            Variant("lora system T0.7", Decoding(temperature=0.7, max_new_tokens=3), system_prompt="I cannot",
                    adapter=first, adapter_scale=0.8),
            Variant("lora2 top-p", Decoding(top_p=0.9, max_new_tokens=3), adapter=second),
            Variant("lora2 long system tilt", d, system_prompt=LONG_SYSTEM, adapter=second, tilt=Tilt(tilt, 2.0)),
            parse_proposal("return:2:system:I cannot").variant(TARGET),
            Variant("return lora2", d, adapter=second, returns_after=1, continuation=TARGET),
            Variant("steer", d, steering=Steering("add", direction, 4.0)),
            Variant("lora half", d, adapter=first, adapter_scale=0.5)]


@pytest.mark.parametrize("budget", [1024, 30])
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_batched_passes_equal_per_variant_score(make_tiny_engine, lora_adapter, second_adapter, direction, tilt,
                                                monkeypatch, budget, density):
    """Rows of different prompts (three lengths) and adapters (two, with and without a system
    prompt) in shared batches give every variant's `score` to float32 round-off, and the passes
    one by one (`batched_scoring=False`) the same. Budget 30: chunks of 7 rows, so a chunk holds
    rows of two passes and a pass spans chunks. Catches a row given another row's prompt,
    positions, adapter, scale or first logits, padding attended to, and a row's log-probs written
    to another pass's column."""
    monkeypatch.setattr(transformers_engine, "SCORE_TOKEN_BUDGET", budget)
    engine = make_tiny_engine()
    variants = mixed_kinds(lora_adapter, second_adapter, direction, tilt)
    seqs = responses(engine)
    seqs += engine.sample(PROMPT, variants[10], 20, seed=6).token_ids  # likelier under an adapter
    need = np.random.default_rng(1).random((len(seqs), len(variants))) < density
    want = per_variant(engine, variants, seqs, need)
    got = engine.score_many(PROMPT, variants, seqs, need)
    assert_same(got, want, need)
    engine.batched_scoring = False
    assert_same(engine.score_many(PROMPT, variants, seqs, need), got, need)
    if density == 1.0:
        for j, v in enumerate(variants[1:], 1):  # every variant is a distribution of its own here
            assert np.nanmax(np.abs(got[:, j] - got[:, 0])) > 1e-2, v.name
        for a, b in ((7, 9), (8, 10), (7, 14)):  # and the adapters' variants differ from each other
            assert np.nanmax(np.abs(got[:, a] - got[:, b])) > 1e-2, (variants[a].name, variants[b].name)


def test_passes_of_different_prompts_and_adapters_share_forward_calls(make_tiny_engine, lora_adapter, second_adapter,
                                                                      direction, tilt):
    """Counts the forward calls: with every response of one length (no chunk split for padding)
    and all rows within the budget, the seven passes over whole responses that can share a batch
    take two calls (one prefill of the seven distinct prompts and adapters, one pass over every
    response, each row with its adapter), the returning head (cut at 2 tokens) two of its own, the
    steered pass and the second scale two each: 8 calls where the passes one by one take 20.
    Catches passes run one by one, a batch whose rows all get one adapter, a head's short rows
    padded to the long rows' width, and a head kept apart where its cut pads nothing."""
    engine = make_tiny_engine()
    variants = mixed_kinds(lora_adapter, second_adapter, direction, tilt)
    seqs = [r for r in responses(engine) if len(r) == 3][:24]
    assert len(seqs) == 24  # 24 rows x 8 passes x 4 positions <= 1024: one chunk
    for path in (lora_adapter, second_adapter):
        engine.adapter_note(path)  # loaded (the model wrapped by peft) before the hook goes on
    calls: list[tuple[int, int, tuple]] = []
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1],
                                                   tuple(kwargs.get("adapter_names") or ()))), with_kwargs=True)
    try:
        engine.score_many(PROMPT, variants, seqs)
        batched = list(calls)
        calls.clear()
        engine.batched_scoring = False
        engine.score_many(PROMPT, variants, seqs)
        alone = list(calls)
    finally:
        hook.remove()
    assert len(alone) == 20  # 10 passes, each a prefill and a pass over its rows
    assert len(batched) == 8
    mixed = [c for c in batched if c[2]]
    # the returning head's rows (cut at K = 2 tokens) in a chunk of their own: one input position,
    # not padded to the whole responses' width
    assert [(b, len(set(names))) for b, _, names in mixed[:2]] == [(1, 1), (24, 1)] and mixed[1][1] == 1
    # then one prefill of the 7 other distinct (prompt, adapter) rows and one pass over their responses
    assert [(b, len(set(names))) for b, _, names in mixed[2:]] == [(7, 3), (7 * 24, 3)]
    for b, _, names in mixed[2:]:  # base: the target, two system prompts; two passes per adapter
        assert sorted(names.count(a) for a in set(names)) == [2 * b // 7, 2 * b // 7, 3 * b // 7]
    # every component returning after 2 tokens: `draw` scores the responses cut there (the weight
    # horizon), so the head's cut pads nothing and its rows join the target's: 2 calls, not 4
    calls.clear()
    engine.batched_scoring = True
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        engine.score_many(PROMPT, [TARGET, variants[11]], [r[:2] for r in seqs])
    finally:
        hook.remove()
    assert len(calls) == 2
