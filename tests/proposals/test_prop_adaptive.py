"""Adaptive proposals (tailmon.proposals.adaptive) on the tiny model, against exact values.

The event: a whole-response judge, `regex: is` (" is" anywhere in the reply), on prompt "ab",
target temperature 0.5, 2-token replies: P = 4.37e-3, computed exactly by enumerating all 307
responses. The monitor starts from `temperature:1.5` (and the target, defensive share 0.1) and
learns after every run from that run's 200 samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import InputError
from tailmon.estimation.pipeline import EstimationPlan, allocate, run_estimation
from tailmon.estimation.prompts import PromptItem
from tailmon.judges import parse_judge
from tailmon.proposals import parse_proposal
from tailmon.engines.tilt import load_tilt
from tailmon.proposals.adaptive import ADAPTER_KEY, STATE_FILE, TILT_KEY, AdaptiveLearner, AdaptiveSettings

PROMPT = "ab"
JUDGE = "regex: is"
TARGET = Variant("target", Decoding(temperature=0.5, max_new_tokens=2))
START = ["temperature:1.5"]
DEFENSIVE = 0.1
SETTINGS = AdaptiveSettings(steps=20, lr=0.01, rank=4, alpha=8, batch_size=16)
N = 200
REPEATS, RUNS = 25, 3


@pytest.fixture(scope="module")
def exact(tiny_engine, enumerate_all):
    return exact_event(tiny_engine, enumerate_all, JUDGE)


def exact_event(tiny_engine, enumerate_all, spec):
    """Every response the target can give (the untruncated support), its p and its score h."""
    seqs, _ = enumerate_all(tiny_engine, PROMPT, Variant("all", Decoding(max_new_tokens=2)))
    judge = parse_judge(spec)
    h = judge.score([PROMPT] * len(seqs), [tiny_engine.decode(s) for s in seqs])
    p = np.exp(tiny_engine.score(PROMPT, TARGET, seqs))
    return seqs, p, h


def exact_sd(engine, plan, exact) -> float:
    """The exact sd of the plan's stratified IS estimate (the formula of conftest.exact_is_design,
    for any judge): Var = (1/n^2) sum_j n_j Var_{q_j}(w h), w = p / sum_j a_j q_j."""
    seqs, p, h = exact
    counts = np.array(allocate(plan.n_samples, [c.share for c in plan.components]))
    q = np.exp(np.stack([engine.score(PROMPT, c.variant, seqs) for c in plan.components], axis=1))
    mix = q @ (counts / plan.n_samples)
    x = np.divide(p, mix, out=np.zeros_like(p), where=mix > 0) * h
    var = sum(n_j * (np.sum(q[:, j] * x * x) - np.sum(q[:, j] * x) ** 2) for j, n_j in enumerate(counts) if n_j)
    return math.sqrt(var) / plan.n_samples


def one_run(engine, learner, seed, judge, exact=None, start=START, n=N):
    """A run as the daemon makes it: the mixture (and the target's share, never below the
    monitor's DEFENSIVE) fixed from the state, estimate, then learn. With `exact`, also the exact
    sd of the run's plan (computed before the update, which may retire the run's tilt file)."""
    mix = learner.mixture(start, defensive=DEFENSIVE)
    plan = EstimationPlan(target=TARGET, judge=judge, proposals=[parse_proposal(s) for s in mix.specs],
                          weights=mix.weights, defensive=mix.defensive, n_samples=n, seed=seed)
    report = run_estimation(engine, plan, [PromptItem(PROMPT)])
    sd = None if exact is None else exact_sd(engine, plan, exact)
    record = learner.update(engine, TARGET, plan.components, report.results, seed=seed, defensive=DEFENSIVE,
                            judge=judge)
    return mix, plan, report.results[0].estimate, record, sd


@pytest.fixture(scope="module")
def sequences(make_tiny_engine, exact, tmp_path_factory):
    """REPEATS independent monitors (state folders, engines, seeds), RUNS runs each:
    (generation, p_hat, exact sd of the run's own plan, update record, mixture record) per run."""
    P = float(exact[1] @ exact[2])
    judge = parse_judge(JUDGE)
    out = []
    for r in range(REPEATS):
        engine = make_tiny_engine()
        learner = AdaptiveLearner(tmp_path_factory.mktemp(f"adaptive-{r}"), SETTINGS)
        runs = []
        for k in range(RUNS):
            mix, plan, est, record, sd = one_run(engine, learner, 1000 * r + k, judge, exact)
            runs.append((mix.record["generation"], est.p_hat, sd, record, mix.record))
        out.append(runs)
    return P, out


def test_the_event_is_rare_and_read_by_a_whole_response_judge(exact):
    seqs, p, h = exact
    P = float(p @ h)
    assert 4e-3 < P < 5e-3, P
    # hits that do not start with " is": the judge reads the whole reply, not a prefix
    assert any(h[i] > 0 and seqs[i][0] != seqs[j][0] for i in range(len(seqs)) for j in [int(np.argmax(h))])


def test_every_run_is_unbiased(sequences):
    """Each run's mixture is fixed before its draws, so p_hat - P has mean 0 given the runs before.

    Catches: a learnt component left out of the mixture density the weights divide by (checked:
    weighting the adapter's draws as if the adapter were not in the mixture gives mean z of 67
    and 228 at runs 2 and 3). Its power against small errors is limited: scoring the adapter at
    half its scale (its own draws keep their sampled log-probs) moved the mean z by less than
    0.2, which this test does not see; the exactness of LoRA weights themselves is tested in
    test_prop_lora_cem.py. Likewise for the learnt tilt: scoring the tilt as the target (its
    column of the mixture density replaced by p) gives mean z of 658 and 830 at runs 2 and 3;
    scoring it untilted only for the other components' draws (its own keep their sampled
    log-probs) passed unseen; the tilt's density itself is tested exactly in test_eng_tilt.py.

    Tolerance: z = (p_hat - P) / sd, sd the exact sd of that run's plan (computed from the plan,
    which the earlier runs chose). Given the history, each z has mean 0 and variance 1 exactly, so
    the z's of one sequence are martingale differences and their sum over all REPEATS x RUNS runs
    has variance REPEATS x RUNS; |sum| / sqrt(75) > 4 has probability about 6e-5 under the normal
    approximation (the z's are skewed: few hits in run 1; a mean of 25 of them per run index is
    still close to normal, and 4 sd leaves room). The per-run-index means (independent repeats)
    get the same 4 sd bound.
    """
    P, seqs = sequences
    z = np.array([[(p_hat - P) / sd for _, p_hat, sd, *_ in runs] for runs in seqs])
    assert abs(z.sum()) / math.sqrt(z.size) < 4, z.mean(axis=0)
    for k in range(RUNS):
        assert abs(z[:, k].mean()) * math.sqrt(REPEATS) < 4, (k, z[:, k].mean())


def test_the_variance_falls_over_runs(sequences):
    """The third run's exact variance is far below the first's: what the first two runs learnt.

    Catches: a monitor that does not learn (no update adopted, or the learnt adapter and weights
    not used by the next run): then run 3's plan is run 1's and the ratio is exactly 1.

    Measured with these seeds: run 1 (temperature:1.5 and the target) has sd 1.96e-3 in every
    repeat. With adapters only (before tilts were learnt) the run-3 variance ratio had median
    0.20 (0.04 .. 1.44), 20 of 25 repeats lower. With the learnt tilt (" is" is the event's
    decisive token, which a tilt raises without touching the rest of the reply): median 0.029
    (0.020 .. 0.35), all 25 repeats lower and at generation >= 1; with the learnt target share
    (never raised here: the start finds the hits) median 0.027 (0.017 .. 0.11), all 25 lower. The
    assertions leave a margin from these and from the adapter-only figures (median 0.20): the
    median below 0.1 and at least 90% of the repeats lower at run 3.
    """
    _, seqs = sequences
    ratio = np.array([(runs[2][2] / runs[0][2]) ** 2 for runs in seqs])
    assert np.median(ratio) < 0.1, np.sort(ratio)
    assert np.mean(ratio < 1) >= 0.9, np.sort(ratio)
    # the runs that fell used a learnt state (generation >= 1 before run 3)
    assert all(runs[2][0] >= 1 for runs, r in zip(seqs, ratio) if r < 1)


def test_updates_are_adopted_only_on_a_lower_held_out_variance(sequences):
    """Every record says why; an adopted one has a lower held-out variance, a refused one not.

    Catches: adoption decided on the samples that fitted the adapter (or not at all)."""
    _, seqs = sequences
    records = [run[3] for runs in seqs for run in runs]
    assert any(r["adopted"] for r in records)
    for r in records:
        held = r["held_out"]
        assert r["fit_samples"] + r["held_out_samples"] == N
        assert abs(r["held_out_samples"] - N * SETTINGS.holdout) <= 2  # rounded within each component
        if r["adopted"]:
            assert held["variance_after"] < held["variance_before"], r
            assert r["generation_after"] == r["generation_before"] + 1
        else:
            assert r["generation_after"] == r["generation_before"]
            assert held["prompts_with_hits"] == 0 or held["variance_after"] >= held["variance_before"], r


def test_the_state_survives_a_restart_and_a_checkpoint_change(make_tiny_engine, tmp_path):
    """A new learner on the same folder (a restarted daemon) proposes exactly what the old one
    would have; a new checkpoint keeps the adapter and is recorded once.

    Catches: state kept in memory only, an adapter folder pruned while still current, a
    checkpoint change that silently drops (or silently keeps, unrecorded) the learnt adapter."""
    engine = make_tiny_engine()
    judge = parse_judge(JUDGE)
    learner = AdaptiveLearner(tmp_path, SETTINGS)
    for k in range(3):
        one_run(engine, learner, 31 + k, judge)  # seeds whose state ends with an adapter and a tilt
    assert learner.generation >= 1 and learner.adapter_path is not None and learner.tilt_path is not None
    before = learner.mixture(START, defensive=DEFENSIVE, model_fingerprint=None)
    again = AdaptiveLearner(tmp_path, SETTINGS)
    after = again.mixture(START, defensive=DEFENSIVE)
    assert (after.specs, after.weights) == (before.specs, before.weights)
    assert after.record["adapter_sha256"] == before.record["adapter_sha256"] is not None
    assert [d.name for d in (tmp_path / "adapters").iterdir()] == [again.state["adapter"].split("/")[-1]]
    assert len(again.state["history"]) == 3
    # the tilt likewise (these seeds adopt one): one file, the current one, loadable, with provenance
    assert again.tilt_spec in after.specs and after.record["tilt_sha256"] == before.record["tilt_sha256"] is not None
    assert [f.name for f in (tmp_path / "tilts").iterdir()] == [again.state["tilt"].split("/")[-1]]
    tilt = load_tilt(again.tilt_path)
    assert tilt.provenance["generation"] <= again.generation and tilt.provenance["judge"] == JUDGE
    assert tilt.provenance["hits"] >= 2 and tilt.tokenizer_sha256 == engine.base_facts()["tokenizer_sha256"]

    # The adapter was trained with no fingerprint given: record one, then change it.
    again.state["model"] = {"fingerprint": "A", "version": 1}
    moved = again.mixture(START, defensive=DEFENSIVE, model_fingerprint="B", model_version=2, run_id=9)
    assert moved.record["checkpoint_changed"] and moved.specs == after.specs
    again.mixture(START, defensive=DEFENSIVE, model_fingerprint="B", model_version=2, run_id=10)
    changes = json.loads((tmp_path / STATE_FILE).read_text())["checkpoint_changes"]
    assert [(c["from"], c["to"], c["run_id"]) for c in changes] == [("A", "B", 9)]

    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        AdaptiveLearner(tmp_path, SETTINGS)


def test_a_run_without_hits_changes_nothing(make_tiny_engine, tmp_path):
    """No harmful sample: nothing to fit, the state stays at generation 0 and says why.
    Catches: an update fitted to nothing (a fresh random adapter adopted on no evidence)."""
    engine = make_tiny_engine()
    learner = AdaptiveLearner(tmp_path, SETTINGS)
    mix, plan, est, record, _ = one_run(engine, learner, 3, parse_judge("regex:^never$"))
    assert est.p_hat == 0 and not record["adopted"] and "nothing to learn" in record["reason"]
    assert learner.generation == 0 and learner.adapter_path is None
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())
    assert AdaptiveLearner(tmp_path, SETTINGS).state["history"][-1]["reason"] == record["reason"]
    assert ADAPTER_KEY not in learner.mixture(START, defensive=DEFENSIVE).record["weights"]


def test_tilts_are_learnt_adopted_on_a_lower_held_out_variance_and_recorded(sequences):
    """After a run with hits a tilt is fitted and scored; a candidate with the new tilt is adopted
    only on a lower held-out variance; the next run draws from it and says so in its record, and
    its file carries its provenance.

    Catches: the tilt never fitted or never a candidate (no record adopts one), and a tilt adopted
    but left out of the next mixture or its record."""
    _, seqs = sequences
    records = [run[3] for runs in seqs for run in runs]
    fitted = [r for r in records if r.get("tilt", {}).get("fitted")]
    assert fitted and all(r["tilt"]["temper"] in (0.5, 1.0) for r in fitted)
    with_tilt = [r for r in records if r["adopted"] and "new tilt" in r["candidate"]]
    # measured with these seeds: 74 of 75 records fit a tilt, 40 of the 66 adopted updates take it
    assert len(with_tilt) >= 10
    for r in with_tilt:
        held = r["held_out"]
        assert held["candidates"][r["candidate"]] == held["variance_after"] < held["variance_before"]
    # a run after an adopted tilt draws from it: its mixture record names the tilt and its weight
    followed = 0
    for runs in seqs:
        for run, nxt in zip(runs, runs[1:]):
            rec, mix = run[3], nxt[4]
            if rec["adopted"] and "new tilt" in rec["candidate"]:
                followed += 1
                assert mix["generation"] == rec["generation_after"]
                assert mix["tilt"] == str(Path(rec["tilt"]["file"]).resolve()) and mix["tilt_sha256"]
                assert mix["weights"][TILT_KEY] == rec["candidate_weights"]["new tilt"] > 0
    assert followed
    assert any(r.get("tilt", {}).get("fitted") and r["tilt"]["temper"] == 1.0 for r in records)


# A starting component that misses the event: temperature 0.25 gives "!", "," "assistant" or
# "cannot" (P = 0.111 under the target) probability 0.0118, so at the target's share 0.1 a hit
# weighs about 1 / (0.1 + 0.9 x 0.106) = 5 and the first run's variance is 6.0x Monte Carlo's.
MISS_JUDGE, MISS_START, MISS_N, MISS_REPEATS = "regex:!|,|assistant|cannot", ["temperature:0.25"], 400, 8


def test_the_target_share_rises_where_the_start_misses_and_falls_once_learnt(make_tiny_engine, enumerate_all,
                                                                             tiny_engine, tmp_path):
    """On an event the starting component misses, the proposals only dilute the target's own
    draws: the first update may raise the target's share (its grid from DEFENSIVE up to 0.9), the
    next run draws with it, and once a learnt adapter or tilt finds the hits the share comes down.

    Catches: the share not among the candidates (measured with TARGET_SHARES emptied: no record
    raises it, and the second runs' exact variances reach 3.8x and 2.3x Monte Carlo's), a learnt
    share not used by the next run's plan, and a ratchet (the floor left out of the grid: no share
    ever comes back down).

    Measured with these seeds: 7 of 8 first updates adopted, 6 of them with a share of 0.75 or
    0.9; 6 of those came back to 0.1 by the fourth run. The assertions: at least a quarter of the
    first updates raise the share, every run drawn at a raised share a0 has an exact variance
    within the bound that share guarantees, (1/a0 - P) / (1 - P) times Monte Carlo's (w <= 1/a0),
    and at least one share comes back down to DEFENSIVE. Every run's mixture, its share included,
    is fixed before its draws, so each run is unbiased: the sum of the 32 z's (exact sd of each
    run's own plan) is within 4 sd of 0, as in test_every_run_is_unbiased."""
    seqs, p, h = exact = exact_event(tiny_engine, enumerate_all, MISS_JUDGE)
    P = float(p @ h)
    judge = parse_judge(MISS_JUDGE)
    mc_var = P * (1 - P) / MISS_N
    raised, lowered, z = 0, 0, []
    for r in range(MISS_REPEATS):
        engine = make_tiny_engine()
        learner = AdaptiveLearner(tmp_path / f"miss-{r}", SETTINGS)
        shares = []
        for k in range(4):
            mix, plan, est, record, sd = one_run(engine, learner, 1000 * r + k, judge, exact, MISS_START, MISS_N)
            z.append((est.p_hat - P) / sd)
            assert plan.components[0].share == mix.defensive == mix.record["target_share"] >= DEFENSIVE
            if k == 0:
                assert mix.defensive == DEFENSIVE and sd ** 2 / mc_var > 5  # the start misses
                raised += record["adopted"] and record["candidate_target_share"] > DEFENSIVE
            if mix.defensive > DEFENSIVE:
                bound = (1 / mix.defensive - P) / (1 - P)
                assert sd ** 2 / mc_var <= bound * (1 + 1e-9), (r, k, mix.defensive, sd ** 2 / mc_var)
            shares.append(mix.defensive)
        lowered += any(a > DEFENSIVE for a in shares) and shares[-1] == DEFENSIVE
    assert raised >= MISS_REPEATS // 4, raised
    assert lowered >= 1
    assert abs(sum(z)) / math.sqrt(len(z)) < 4, z
