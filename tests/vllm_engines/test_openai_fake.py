"""The OpenAI engine's fleet behaviour against scripted servers on loopback (no vLLM needed: these
run in the main environment too). Each fake replica answers /v1/completions as vLLM does, with
the behaviour a test gives it: raw log-prob mode, a failure status, a delay (to count the
requests in flight)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import InputError, RuntimeFailure

SAMPLED = [7, 8, 1]  # " here", " is", EOS in the tiny vocabulary (tests/conftest.py)


class Replica:
    def __init__(self, *, check_logprob=0.0, fail_first=0, status=503, delay=0.0):
        self.check_logprob, self.fail_first, self.status, self.delay = check_logprob, fail_first, status, delay
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with replica.lock:
                    replica.requests.append(body)
                    failing = len(replica.requests) <= replica.fail_first
                    replica.in_flight += 1
                    replica.max_in_flight = max(replica.max_in_flight, replica.in_flight)
                try:
                    time.sleep(replica.delay)
                    if failing:
                        self.send_response(replica.status)
                        self.end_headers()
                        self.wfile.write(b'{"error": "scripted failure"}')
                        return
                    if body.get("top_k") == 1 and body["max_tokens"] == 1:  # the mode check
                        choices = [{"index": 0, "token_ids": [7], "logprobs": {"token_logprobs": [replica.check_logprob]}}]
                    else:
                        m = body["max_tokens"]  # a reply stops at max_tokens, as vLLM's would
                        choices = [{"index": i, "token_ids": SAMPLED[:m],
                                    "logprobs": {"token_logprobs": [-0.5, -0.25, -0.125][:m]}} for i in range(body["n"])]
                    data = json.dumps({"choices": choices}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with replica.lock:
                        replica.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replicas():
    made = []

    def make(**kwargs):
        made.append(Replica(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def engine_for(tiny_tokenizer, urls, **kwargs):
    from tailmon.engines.openai import OpenAIEngine

    kwargs.setdefault("backoff", 0.01)
    return OpenAIEngine(urls, "served", tiny_tokenizer, timeout=5, **kwargs)


VARIANT = Variant("t", Decoding(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=3))


def test_sampling_request_and_result(tiny_tokenizer, replicas):
    r = replicas()
    eng = engine_for(tiny_tokenizer, [r.url])
    samples = eng.sample("ab", VARIANT, 3, seed=4)
    assert samples.token_ids == [SAMPLED] * 3 and samples.finished == [True] * 3
    np.testing.assert_allclose(samples.logprobs, -0.875)
    body = r.requests[-1]
    # token ids as rendered by the transformers engine's code, the deployed decoding, top-k on
    assert body["prompt"] == eng.prompt_ids("ab")
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (0.7, 0.9, 5, 3)
    assert body["logprobs"] == 0 and body["return_token_ids"] and body["stop_token_ids"] == [1]


def test_scoring_that_needs_full_vocabulary_rows_is_refused(tiny_tokenizer, replicas):
    """Processed log-probs at T != 1 or under top-p/top-k come over HTTP only from full-vocabulary
    prompt log-prob rows (~100 s per response): refused before any request, naming the cost and
    the alternatives; sampling at such a decoding stays allowed, and so does nothing to score."""
    r = replicas()
    eng = engine_for(tiny_tokenizer, [r.url])
    eng.sample("ab", VARIANT, 1, seed=0)
    sent = len(r.requests)
    for decoding in (VARIANT.decoding, Decoding(temperature=1.5), Decoding(top_k=5), Decoding(top_p=0.95)):
        with pytest.raises(InputError, match=r"full-vocabulary.*100 s per scored response.*temperature 1 "
                                             r"without top-p/top-k.*in-process vllm engine.*full_rows=True"):
            eng.score("ab", Variant("t", decoding), [SAMPLED])
    with pytest.raises(InputError, match="next-token distributions over HTTP.*full_rows=True"):
        eng.next_token_logprobs("ab", Variant("t", Decoding()), [[7]])
    # an importance-sampling draw (a mixture) that will need them: refused before sampling
    with pytest.raises(InputError, match="scoring over HTTP under 't'.*full_rows=True"):
        eng.sample_mixture("ab", [Variant("target", Decoding(max_new_tokens=3)), VARIANT], [1, 1], [0, 1])
    assert len(r.requests) == sent  # refused before asking any server
    assert eng.score("ab", VARIANT, [[]]).tolist() == [0.0]
    assert len(eng.sample_mixture("ab", [VARIANT], [2], [0])[0]) == 2  # one component: nothing to score


def test_a_replica_in_raw_mode_is_refused(tiny_tokenizer, replicas):
    r = replicas(check_logprob=-0.31)
    with pytest.raises(InputError, match="--logprobs-mode processed_logprobs"):
        engine_for(tiny_tokenizer, [r.url]).sample("ab", VARIANT, 1, seed=0)


def test_failures_move_to_the_next_replica(tiny_tokenizer, replicas):
    flaky, healthy = replicas(fail_first=100), replicas()
    eng = engine_for(tiny_tokenizer, [flaky.url, healthy.url], retries=3)
    eng._checked.add((flaky.url, "served"))  # only the sampling requests are under test here
    samples = eng.sample("ab", VARIANT, 2, seed=0)
    assert len(samples) == 2
    assert flaky.requests and len(healthy.requests) >= 2  # the mode check and the retried request


def test_a_client_error_is_not_retried(tiny_tokenizer, replicas):
    bad = replicas(fail_first=100, status=400)
    eng = engine_for(tiny_tokenizer, [bad.url], retries=3)
    with pytest.raises(InputError, match="refused the request"):
        eng.sample("ab", VARIANT, 1, seed=0)
    assert len(bad.requests) == 1


def test_every_replica_down_names_them_all(tiny_tokenizer, replicas):
    a, b = replicas(fail_first=100), replicas(fail_first=100)
    eng = engine_for(tiny_tokenizer, [a.url, b.url], retries=4)
    with pytest.raises(RuntimeFailure, match="after 4 tries") as info:
        eng.sample("ab", VARIANT, 1, seed=0)
    assert a.url in str(info.value) and b.url in str(info.value) and "HTTP 503" in str(info.value)
    assert len(a.requests) == 2 and len(b.requests) == 2  # alternating, with backoff between


def test_concurrency_is_bounded_and_spread(tiny_tokenizer, replicas):
    a, b = replicas(delay=0.2), replicas(delay=0.2)
    eng = engine_for(tiny_tokenizer, [a.url, b.url], max_concurrency=3, sample_chunk=2)
    eng.check_replicas()
    samples = eng.sample("ab", VARIANT, 16, seed=0)  # 8 requests of 2
    assert len(samples) == 16
    assert a.max_in_flight + b.max_in_flight <= 3 + 1  # each replica's peak; together <= the bound + 1
    assert len(a.requests) >= 4 and len(b.requests) >= 4  # round-robin: 1 check + 4 each


def test_steering_and_scaled_lora_are_refused(tiny_tokenizer, replicas):
    from tailmon.engines.base import Steering

    eng = engine_for(tiny_tokenizer, [replicas().url])
    with pytest.raises(InputError, match="steering needs the transformers engine"):
        eng.sample("ab", Variant("s", VARIANT.decoding, steering=Steering("add", "x", 1.0)), 1, seed=0)
    with pytest.raises(InputError, match="scale"):
        eng.sample("ab", Variant("l", VARIANT.decoding, adapter="unsafe-v1", adapter_scale=0.5), 1, seed=0)


def test_every_sample_gets_its_own_vllm_seed(tiny_tokenizer, replicas):
    """vLLM seeds the j-th of a request's n samples with seed + j (vllm/v1/engine/parallel_sampling.py):
    the requests of one draw, and of two draws, must not share a sample seed, or samples repeat
    (requests seeded s, s+1, ... gave the same samples shifted by one)."""
    a = replicas()
    eng = engine_for(tiny_tokenizer, [a.url], sample_chunk=5)
    eng.check_replicas()
    child_seeds = []
    for seed in (0, 1):
        before = len(a.requests)
        eng.sample("ab", VARIANT, 23, seed=seed)  # 5 requests: 5, 5, 5, 5, 3
        child_seeds += [r["seed"] + j for r in a.requests[before:] for j in range(r["n"])]
    assert len(child_seeds) == 46 and len(set(child_seeds)) == 46


def test_a_returning_component_continues_from_the_targets_own_prompt(tiny_tokenizer, replicas):
    """`return:2:SPEC` over HTTP: the head's request (its system prompt, cut at 2 tokens), then one
    request per open response whose prompt is the *target's* rendered prompt plus the 2 token ids,
    for the remaining tokens, under the target's decoding, on seeds that none of the head's
    samples used; the sample joins both parts (ids, log-probs, per-token log-probs). Catches a
    continuation under the head's prompt or decoding, a wrong count, and reused streams (the
    real server's test checks the log-probs: tests/vllm_engines/test_openai_server.py)."""
    from tailmon.proposals import parse_proposal

    r = replicas()
    eng = engine_for(tiny_tokenizer, [r.url])
    eng.check_replicas()
    target = Variant("target", Decoding(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=3))
    variant = parse_proposal("return:2:system:Sure").variant(target)
    before = len(r.requests)
    samples = eng.sample("ab", variant, 4, seed=9)
    head, *rest = r.requests[before:]
    assert head["prompt"] == eng.prompt_ids("ab", "Sure") and head["max_tokens"] == 2 and head["n"] == 4
    assert len(rest) == 4
    for body in rest:
        assert body["prompt"] == eng.prompt_ids("ab") + SAMPLED[:2] and body["max_tokens"] == 1 and body["n"] == 1
        assert (body["temperature"], body["top_p"], body["top_k"]) == (0.7, 0.9, 5)
    streams = [b["seed"] for b in rest]
    assert len(set(streams)) == 4 and not {head["seed"] + j for j in range(4)} & set(streams)
    assert samples.token_ids == [SAMPLED[:2] + SAMPLED[:1]] * 4 and samples.finished == [False] * 4
    np.testing.assert_allclose(samples.logprobs, -1.25)
    assert [list(t) for t in samples.token_logprobs] == [[-0.5, -0.25, -0.5]] * 4


def test_the_loader_connects_by_settings_and_checks_every_replica(tiny_model_dir, replicas):
    from tailmon.engines.loading import EngineSettings, load_engine
    from tailmon.engines.openai import OpenAIEngine

    a, b = replicas(), replicas()
    eng = load_engine(EngineSettings(engine="openai", ref=str(tiny_model_dir), base_urls=(a.url, b.url),
                                     served_model="served", timeout=5))
    try:
        assert isinstance(eng, OpenAIEngine) and eng.model == "served" and eng.model_id == str(tiny_model_dir)
        assert [r["top_k"] for r in a.requests + b.requests] == [1, 1]  # each replica's mode, checked at load
    finally:
        eng.close()
    raw = replicas(check_logprob=-0.31)
    with pytest.raises(InputError, match="^baseline model: vLLM server .* --logprobs-mode processed_logprobs"):
        load_engine(EngineSettings(engine="openai", ref=str(tiny_model_dir), base_urls=(raw.url,),
                                   served_model="served", timeout=5), role="baseline")


def test_redirects_drips_and_huge_replies_are_refused(tiny_tokenizer):
    """Catches the engine's hand-written urllib client: it followed a cross-origin redirect with
    the API key, let a dripping reply run past its timeout, and read any reply whole."""
    from hostile_http import hostile_pair  # tests/ is on sys.path

    main, other = hostile_pair(drip=0.2, huge=40 * 1024 * 1024)
    try:
        eng = engine_for(tiny_tokenizer, [main.url + "/redirect-cross"], retries=3)
        eng._api_key = "sk-engine-key"
        with pytest.raises(RuntimeFailure, match="HTTP 302, a redirect to .*/steal: tailmon does not follow") as err:
            eng.check_replicas()
        assert other.requests == [] and len(main.requests) == 1 and "sk-engine-key" not in str(err.value)

        eng = engine_for(tiny_tokenizer, [main.url + "/drip-body"], retries=1)
        eng._timeout = 0.5
        start = time.monotonic()
        with pytest.raises(RuntimeFailure, match=r"timed out \(no answer within 0.5 s\)"):
            eng.check_replicas()
        assert time.monotonic() - start < 2.0

        eng = engine_for(tiny_tokenizer, [main.url + "/huge"], retries=3)
        with pytest.raises(RuntimeFailure, match="larger than the 1 MiB tailmon reads"):
            eng.check_replicas()
        assert main.sent < 20 * 1024 * 1024
    finally:
        main.close()
        other.close()


def test_the_full_rows_setting_reaches_the_engine_and_not_the_fingerprint(tmp_path, tiny_model_dir, replicas):
    """`model.full_rows: true` is how a monitor pays for full-vocabulary scoring over HTTP: it must
    reach the engine (else such a monitor fails every run), stay out of the fingerprint (the same
    values), and be refused with another engine."""
    from daemon_support import write_config  # noqa: E402  (tests/ is on sys.path)
    from tailmon.engines.loading import EngineSettings, load_engine
    from tailmon.monitor.config import load_config

    r = replicas()
    model = {"engine": "openai", "ref": str(tiny_model_dir), "base_urls": [r.url], "max_new_tokens": 3}
    fingerprints = {}
    for value in (False, True):
        [mon] = load_config(write_config(tmp_path, tiny_model_dir, model={**model, "full_rows": value})).config.monitors
        settings = mon.model.engine_settings()
        assert settings.full_rows is value
        engine = load_engine(settings)
        try:
            assert engine.full_rows is value
        finally:
            engine.close()
        fingerprints[value] = mon.fingerprint()
    assert fingerprints[False] == fingerprints[True]
    with pytest.raises(InputError, match="full_rows are for the openai engine"):
        EngineSettings(engine="transformers", full_rows=True)
