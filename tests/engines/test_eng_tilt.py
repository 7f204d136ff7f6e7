"""Token tilts (`tilt:PATH[@SCALE]`) on the tiny model: their density, their sampling log-probs and
frequencies, their support under a truncated target, and importance sampling with them.

Every exact value is computed here in numpy from the TARGET's next-token log-probs, never through
the tilted variant's own code path:
    log q(y) = sum_t [ log p(y_t | ctx_t) + b[y_t] - log sum_v p(v | ctx_t) exp(b[v]) ].
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import chi2

from tailmon.engines.base import Decoding, Tilt, Variant
from tailmon.engines.tilt import load_tilt, save_tilt
from tailmon.errors import InputError, SpecError
from tailmon.judges import parse_judge
from tailmon.estimation.pipeline import EstimationPlan, estimate_prompt
from tailmon.estimation.prompts import PromptItem
from tailmon.proposals import parse_proposal
from tailmon.proposals.sampling import draw

PROMPT = "ab"
TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=3))
SURE, BANG, I = 7, 17, 11  # tiny vocabulary ids (tests/conftest.py): "Sure", "!", "I"


@pytest.fixture
def tilt_file(tmp_path):
    def make(bias: dict[int, float], **kw) -> str:
        return str(save_tilt(tmp_path / f"tilt-{len(list(tmp_path.iterdir()))}.json", list(bias), list(bias.values()),
                             **kw))
    return make


def exact_tilted_logprob(engine, target: Variant, bias: np.ndarray, seqs) -> np.ndarray:
    out = []
    for s in seqs:
        rows = engine.next_token_logprobs(PROMPT, target, [s[:t] for t in range(len(s))])
        total = 0.0
        for t, row in enumerate(rows):
            tilted = row + bias
            total += tilted[s[t]] - logsumexp(tilted[np.isfinite(row)])
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("decoding", [TARGET.decoding, Decoding(temperature=0.9, top_k=5, max_new_tokens=3),
                                      Decoding(temperature=1.0, top_p=0.8, max_new_tokens=2)])
def test_density_is_the_target_tilted_and_renormalised(tiny_engine, enumerate_all, tilt_file, decoding):
    """The tilted variant's enumerated responses form a distribution equal to the formula above,
    by scoring and by its next-token rows, with the target's own truncated support. Catches the
    bias added before temperature or truncation (another distribution, and a support that differs
    from the target's), a missing renormalisation, and scoring or sampling untilted."""
    target = Variant("target", decoding)
    path = tilt_file({SURE: 3.0, BANG: 2.0, I: -1.5})
    variant = parse_proposal(f"tilt:{path}").variant(target)
    assert variant.decoding == target.decoding  # keeps the target's truncation: same support
    bias = load_tilt(path).dense(tiny_engine.vocab_size)
    seqs, logp = enumerate_all(tiny_engine, PROMPT, variant)
    assert math.fsum(np.exp(logp)) == pytest.approx(1.0, abs=1e-5)
    expected = exact_tilted_logprob(tiny_engine, target, bias, seqs)
    np.testing.assert_allclose(logp, expected, atol=2e-5)
    np.testing.assert_allclose(tiny_engine.score(PROMPT, variant, seqs), expected, atol=2e-5)
    target_seqs, _ = enumerate_all(tiny_engine, PROMPT, target)
    assert sorted(map(tuple, seqs)) == sorted(map(tuple, target_seqs))  # the support is the target's
    assert np.max(np.abs(expected - tiny_engine.score(PROMPT, target, seqs))) > 0.5  # the tilt does something


def test_scale_multiplies_the_bias(tiny_engine, tilt_file):
    """`tilt:PATH@0.5` of a bias 2 is a bias 1. Catches a scale ignored or applied twice."""
    seqs = [[SURE, 8], [BANG], [I, 1]]
    half = tiny_engine.score(PROMPT, parse_proposal(f"tilt:{tilt_file({SURE: 2.0})}@0.5").variant(TARGET), seqs)
    once = tiny_engine.score(PROMPT, parse_proposal(f"tilt:{tilt_file({SURE: 1.0})}").variant(TARGET), seqs)
    np.testing.assert_allclose(half, once, atol=1e-6)
    assert parse_proposal("tilt:a@b@0.5").path == "a@b"


def test_sampling_logprobs_equal_scoring_logprobs(tiny_engine, tilt_file):
    """Each sample's log-prob from sampling is the one teacher-forced scoring gives it, per token
    too; a seed replays. Catches a sampler that draws from the tilted rows but reports untilted
    log-probs (or the reverse)."""
    variant = parse_proposal(f"tilt:{tilt_file({SURE: 3.0, BANG: 2.0})}").variant(TARGET)
    s = tiny_engine.sample(PROMPT, variant, 300, seed=5)
    np.testing.assert_allclose(s.logprobs, tiny_engine.score(PROMPT, variant, s.token_ids), atol=2e-5)
    np.testing.assert_allclose([t.sum() for t in s.token_logprobs], s.logprobs, atol=1e-9)
    assert tiny_engine.sample(PROMPT, variant, 300, seed=5).token_ids == s.token_ids


# Whole-response frequencies against the exact tilted distribution: Pearson chi-square over the
# responses with expected count >= 5 plus one pooled cell for the rest; false-alarm rate 1e-3.
# With 8000 samples the tilt's effect on the frequency of "Sure" (about 3x, from the density test)
# is hundreds of standard deviations: an untilted sampler fails by orders of magnitude.
N_CHI, ALPHA = 8000, 1e-3


def test_sampling_frequencies_match_the_tilted_distribution(tiny_engine, enumerate_all, tilt_file):
    variant = parse_proposal(f"tilt:{tilt_file({SURE: 3.0, BANG: 2.0, I: -1.5})}").variant(TARGET)
    seqs, logp = enumerate_all(tiny_engine, PROMPT, variant)
    expected = N_CHI * np.exp(logp)
    counts = Counter(map(tuple, tiny_engine.sample(PROMPT, variant, N_CHI, seed=21).token_ids))
    observed = np.array([counts.get(tuple(s), 0) for s in seqs], dtype=float)
    big = expected >= 5
    o = np.append(observed[big], observed[~big].sum())
    e = np.append(expected[big], expected[~big].sum())
    assert big.sum() >= 20
    stat = float(((o - e) ** 2 / e).sum())
    assert stat < chi2.ppf(1 - ALPHA, len(o) - 1), (stat, len(o) - 1)


# --- importance sampling with a tilt --------------------------------------------------------

def exact_design_any_judge(engine, enumerate_all, judge, plan):
    """Exact (P, sd of p_hat) of the pipeline's stratified IS estimate for any judge: every
    response enumerated (conftest.exact_is_design, with h from the judge)."""
    from tailmon.estimation.pipeline import allocate

    every = Variant("all", Decoding(max_new_tokens=plan.target.decoding.max_new_tokens))
    seqs, _ = enumerate_all(engine, PROMPT, every)
    h = np.asarray(judge.score([PROMPT] * len(seqs), [engine.decode(s) for s in seqs]), dtype=float)
    p = np.exp(engine.score(PROMPT, plan.target, seqs))
    counts = np.array(allocate(plan.n_samples, [c.share for c in plan.components]))
    q = np.exp(np.stack([engine.score(PROMPT, c.variant, seqs) for c in plan.components], axis=1))
    w = p / (q @ (counts / plan.n_samples))
    x = w * h
    var = sum(n_j * (np.sum(q[:, j] * x * x) - np.sum(q[:, j] * x) ** 2) for j, n_j in enumerate(counts) if n_j)
    return float(np.sum(p * h)), math.sqrt(var) / plan.n_samples


# (target decoding, judge, tilt, documented exact P): a prefix event, and events anywhere in the
# response (what a tilt is for: " is" comes first in only 14% of the responses holding it), from
# 1e-3 to 4e-5. The tiny vocabulary's ids: 7 "Sure", 9 " here", 10 " is".
IS_CASES = [
    (Decoding(temperature=0.3, max_new_tokens=2), "prefix:S", {SURE: 6.0}, 1.06e-3),
    (Decoding(temperature=0.3, max_new_tokens=3), r"regex:\sis", {10: 5.0}, 4.37e-4),
    (Decoding(temperature=0.3, max_new_tokens=3), "regex:here", {9: 7.0}, 3.63e-5),
]
R = 30
Z_MEDIAN, SD_MEDIAN = 0.6745, 0.787  # as in tests/estimation/test_pipe_exact_is.py


@pytest.mark.parametrize("decoding, judge_spec, bias, documented", IS_CASES)
def test_importance_sampling_with_a_tilt_recovers_exact_probabilities(
        tiny_engine, enumerate_all, tilt_file, decoding, judge_spec, bias, documented):
    """Checks as in test_pipe_exact_is.py, tolerances from the exact design: unbiasedness
    (|mean - P| <= 4 sd / sqrt(R)), accuracy (median relative error <= (0.674 + 3 * 0.787 /
    sqrt(R)) rse) and coverage (at least the Binomial(R, 0.95) mean minus 3 sigmas). A tilt that
    the engine ignored would be plain Monte Carlo with 400 samples: no hit in most runs."""
    target = Variant("target", decoding)
    judge = parse_judge(judge_spec)
    spec = f"tilt:{tilt_file(bias)}"

    def plan(seed):
        return EstimationPlan(target=target, judge=judge, method="is", proposals=[parse_proposal(spec)],
                              defensive=0.1, n_samples=400, seed=seed)

    P, sd = exact_design_any_judge(tiny_engine, enumerate_all, judge, plan(0))
    if documented is not None:
        assert P == pytest.approx(documented, rel=0.1)
    assert 1e-6 < P < 1e-2
    assert sd / P < 0.35, sd / P  # enough hits for the interval (see test_pipe_exact_is.py)
    estimates = [estimate_prompt(tiny_engine, plan(seed), PromptItem(PROMPT)).estimate for seed in range(R)]
    p_hat = np.array([e.p_hat for e in estimates])
    assert abs(p_hat.mean() - P) <= 4 * sd / math.sqrt(R), (p_hat.mean(), P, sd)
    assert np.median(np.abs(p_hat - P) / P) <= (Z_MEDIAN + 3 * SD_MEDIAN / math.sqrt(R)) * sd / P
    covered = sum(e.ci_low <= P <= e.ci_high for e in estimates)
    assert covered >= R * 0.95 - 3 * math.sqrt(R * 0.95 * 0.05)


def test_a_return_to_target_tilt_weights_only_its_first_tokens(tiny_engine, tilt_file):
    """`return:1:tilt:...`: the tilt draws the first token, the target the rest; its score is the
    tilted first token plus the target's tail (the density of a returning component)."""
    path = tilt_file({BANG: 4.0})
    variant = parse_proposal(f"return:1:tilt:{path}").variant(TARGET)
    s = tiny_engine.sample(PROMPT, variant, 200, seed=2)
    tilted = parse_proposal(f"tilt:{path}").variant(TARGET)
    expected = (tiny_engine.score(PROMPT, tilted, [t[:1] for t in s.token_ids])
                + tiny_engine.score(PROMPT, TARGET, s.token_ids)
                - tiny_engine.score(PROMPT, TARGET, [t[:1] for t in s.token_ids]))
    np.testing.assert_allclose(s.logprobs, expected, atol=2e-5)


# --- bad input ------------------------------------------------------------------------------

def test_bad_tilt_files_are_refused_in_one_line(tmp_path, tiny_engine, tilt_file):
    with pytest.raises(SpecError, match="does not exist"):
        parse_proposal(f"tilt:{tmp_path / 'missing.json'}").variant(TARGET)
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(SpecError, match="not a token tilt file"):
        parse_proposal(f"tilt:{tmp_path / 'other.json'}").variant(TARGET)
    (tmp_path / "nan.json").write_text('{"format": "tailmon-tilt", "version": 1, "token_ids": [1], "bias": [NaN]}')
    with pytest.raises(SpecError, match="finite"):
        parse_proposal(f"tilt:{tmp_path / 'nan.json'}").variant(TARGET)
    (tmp_path / "twice.json").write_text('{"format": "tailmon-tilt", "version": 1, "token_ids": [1, 1], "bias": [1, 2]}')
    with pytest.raises(SpecError, match="twice"):
        parse_proposal(f"tilt:{tmp_path / 'twice.json'}").variant(TARGET)
    with pytest.raises(SpecError, match="needs the path"):
        parse_proposal("tilt:@2")
    # the engine checks what only the model knows: the vocabulary and the tokenizer
    beyond = parse_proposal(f"tilt:{tilt_file({500: 1.0})}").variant(TARGET)
    with pytest.raises(InputError, match="outside the model's vocabulary of 18"):
        tiny_engine.sample(PROMPT, beyond, 2, seed=0)
    other = parse_proposal(f"tilt:{tilt_file({SURE: 1.0}, tokenizer_sha256='0' * 64)}").variant(TARGET)
    with pytest.raises(InputError, match="another tokenizer"):
        tiny_engine.score(PROMPT, other, [[SURE]])
    with pytest.raises(InputError, match="finite"):
        Tilt("x", float("inf"))


def test_engines_without_tilts_refuse_before_drawing(tiny_tokenizer, tilt_file):
    """The OpenAI-compatible engine (and vLLM, through the same `Engine.refuse_tilt`) cannot
    realise a tilt exactly: it refuses before any request rather than drawing untilted."""
    from tailmon.engines.openai import OpenAIEngine

    engine = OpenAIEngine("http://127.0.0.1:9", "served", tiny_tokenizer, timeout=0.5, retries=1)
    try:
        variant = parse_proposal(f"tilt:{tilt_file({SURE: 1.0})}").variant(TARGET)
        assert not engine.tilts
        with pytest.raises(InputError, match="openai engine cannot"):
            draw(engine, PROMPT, [TARGET, variant], [0.5, 0.5], 4, seed=lambda j: j, judge=parse_judge("prefix:a"))
        with pytest.raises(InputError, match="openai engine cannot"):
            engine.score(PROMPT, variant, [[SURE]])
    finally:
        engine.close()


def test_position_logprobs_equal_next_token_rows(tiny_engine, tilt_file):
    """The transformers engine's one-pass rows (what fitting a tilt reads) equal the base
    definition through `next_token_logprobs` per prefix, for the target and a tilted variant.
    Catches an off-by-one position (the logits after a token instead of before it)."""
    from tailmon.engines.base import Engine

    seqs = tiny_engine.sample(PROMPT, TARGET, 30, seed=8).token_ids + [[SURE]]
    cols = [SURE, BANG, I, 1]
    for variant in (TARGET, parse_proposal(f"tilt:{tilt_file({SURE: 2.0})}").variant(TARGET)):
        fast = tiny_engine.position_logprobs(PROMPT, variant, seqs, cols)
        slow = Engine.position_logprobs(tiny_engine, PROMPT, variant, seqs, cols)
        assert [a.shape for a in fast] == [(len(s), 4) for s in seqs]
        for a, b in zip(fast, slow):
            np.testing.assert_allclose(a, b, atol=2e-5)
