"""Fitting token tilts (tailmon.proposals.tilt_fit) and `tailmon proposals fit-tilt`, on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from tailmon.cli.main import main
from tailmon.engines.base import Decoding, Variant
from tailmon.engines.tilt import load_tilt, save_tilt
from tailmon.errors import InputError
from tailmon.judges import parse_judge
from tailmon.proposals import parse_proposal
from tailmon.proposals.tilt_fit import HitSet, fit_tilt

from daemon_support import proposal_training_config  # noqa: E402  (tests/ is on sys.path)

PROMPT = "ab"
TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=3))
SURE = 7  # tiny vocabulary id of "Sure" (tests/conftest.py)
TRUE_BIAS = 2.0
N_FIT = 1500


def test_fit_tilt_recovers_a_known_bias(tiny_engine, tmp_path):
    """Responses drawn from the target tilted by b* = 2 on "Sure", each a hit of equal weight (the
    judge "the response holds Sure" scores the draws alike, and w h is constant when the draws
    come from q* itself): the cross-entropy fit is then the maximum-likelihood estimate of the
    bias within the tilt family, which holds q_b*, so it converges to b*.

    Tolerance, derived: without the ridge (ridge=0) the MLE is asymptotically normal with
    variance 1 / I, I = sum over the sampled positions of q_b(Sure | ctx)(1 - q_b(Sure | ctx))
    (the observed information of a one-parameter exponential family at each position); the fit
    must be within 4 / sqrt(I) of b* (false alarm ~6e-5). With the default ridge (0.05 per unit of
    hit mass, the N hits sharing mass 1) the stationarity condition, linearised at b*, gives
    b_ridge ~ b* (I/N) / (I/N + ridge): checked with the same 4 sd. Measured with this seed:
    I = 305 (sd 0.057), b = 2.05 without the ridge, 1.603 with it against 1.605 predicted.

    Catches (checked): log Z computed without the mass outside the candidates (the fit then
    ignores that the bias must be paid for by renormalising: it runs to the bound, -30), and the ridge
    applied with the wrong sign (2.56 with the ridge, above the unridged 2.05)."""
    path = save_tilt(tmp_path / "true.json", [SURE], [TRUE_BIAS])
    variant = parse_proposal(f"tilt:{path}").variant(TARGET)
    s = tiny_engine.sample(PROMPT, variant, N_FIT, seed=3)
    responses = [list(r) for r in s.token_ids if r]
    assert sum(SURE in r for r in responses) > 100  # the biased token is common enough to learn from
    hits = [HitSet(PROMPT, responses, np.ones(len(responses)))]
    fitted = fit_tilt(tiny_engine, TARGET, hits, candidates=[SURE], ridge=0.0)
    assert list(fitted.token_ids) == [SURE]
    b = float(fitted.bias[0])
    # the information at b*, from the positions of the draws (their contexts are q_b*'s own)
    rows = np.concatenate([tiny_engine.next_token_logprobs(PROMPT, variant, [r[:t] for t in range(len(r))])
                           for r in responses])
    q = np.exp(rows[:, SURE])
    info = float(np.sum(q * (1 - q)))
    assert abs(b - TRUE_BIAS) < 4 / math.sqrt(info), (b, info)
    # the default ridge: the same estimate shrunk by about ridge * b / (I / N + ridge)
    ridged = float(fit_tilt(tiny_engine, TARGET, hits, candidates=[SURE]).bias[0])
    per = info / len(responses)
    expected = TRUE_BIAS * per / (per + 0.05)
    assert ridged < b and abs(ridged - expected) < 4 / math.sqrt(info), (ridged, expected)


def test_fit_tilt_refuses_nothing_to_fit(tiny_engine):
    with pytest.raises(InputError, match="needs hits"):
        fit_tilt(tiny_engine, TARGET, [])


# --- tailmon proposals fit-tilt ------------------------------------------------------------

JUDGE = "regex: is"


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    return proposal_training_config(tmp_path, tiny_model_dir, JUDGE)


def test_cli_fit_tilt_writes_a_loadable_tilt_for_a_monitor(config, tmp_path, make_tiny_engine, enumerate_all):
    """End to end on the tiny model folder: a pilot from the monitor's seeding mixture and one
    refitting round; the file loads as a proposal, its provenance names the monitor's judge and
    decoding, every round is reported, and the tilt raises the event's probability.

    Catches: the CLI's own decoding instead of the monitor's, a round line missing, a file the
    engine cannot load, and a tilt that does not favour the hits (its probability of the event
    no higher than the target's)."""
    out = tmp_path / "tilt.json"
    done = CliRunner().invoke(main, ["proposals", "fit-tilt", "--config", str(config), "--monitor", "tiny",
                                     "--out", str(out), "--samples", "100", "--rounds", "1"])
    assert done.exit_code == 0, done.output
    assert "round 0:" in done.output and "round 1:" in done.output and "ESS(w*h)" in done.output
    tilt = load_tilt(out)
    prov = tilt.provenance
    assert prov["judge"] == JUDGE and prov["rounds"] == 1 and len(prov["history"]) == 2
    assert prov["target"]["temperature"] == 0.5 and prov["target"]["max_new_tokens"] == 2
    assert prov["start"][-1] == "temperature:0.75" and prov["history"][0]["temper"] == 0.5
    assert prov["history"][1]["mixture"][1].startswith("tilt:")  # round 1 drew from the pilot's tilt
    assert tilt.token_ids.size and tilt.tokenizer_sha256
    # the tilt favours " is": its probability of the event (exactly, by enumeration) beats the target's
    engine = make_tiny_engine()
    target = Variant("target", Decoding(temperature=0.5, max_new_tokens=2))
    variant = parse_proposal(f"tilt:{out}").variant(target)
    prompts = prov["prompts"]
    assert prompts >= 1
    judge = parse_judge(JUDGE)
    seqs, logq = enumerate_all(engine, PROMPT, variant)
    h = judge.score([PROMPT] * len(seqs), [engine.decode(x) for x in seqs])
    logp = engine.score(PROMPT, target, seqs)
    # measured: 0.28 against the target's 4.4e-3 (64x); 10x leaves a wide margin
    assert float(np.exp(logq) @ h) > 10 * float(np.exp(logp) @ h)


def test_cli_fit_tilt_errors(config, tmp_path, tiny_model_dir):
    """No hits: said so, with what to do; missing judge or prompts: said so; never a traceback."""
    none = CliRunner().invoke(main, ["proposals", "fit-tilt", "--model", str(tiny_model_dir), "--prompt", "ab",
                                     "--judge", "regex:^never$", "--out", str(tmp_path / "t.json"),
                                     "--samples", "20", "--max-new-tokens", "2", "--quiet"])
    assert none.exit_code != 0 and "no hit to fit a tilt to" in none.output and "--samples" in none.output
    assert "Traceback" not in none.output and not (tmp_path / "t.json").exists()
    nojudge = CliRunner().invoke(main, ["proposals", "fit-tilt", "--prompt", "ab", "--out", str(tmp_path / "t.json")])
    assert nojudge.exit_code != 0 and "--judge" in nojudge.output
    noprompt = CliRunner().invoke(main, ["proposals", "fit-tilt", "--judge", "regex:x", "--out", str(tmp_path / "t")])
    assert noprompt.exit_code != 0 and "--prompt" in noprompt.output
