"""The webhook sink against a real HTTP receiver on loopback: signature, retries with backoff,
recorded outcomes, a hanging receiver that must not block the caller, the Slack format."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import datetime, timezone

import pytest

from alerts_support import figures, make_config
from tailmon.alerts import AlertService
from tailmon.alerts.config import SinkConfig
from tailmon.alerts.sinks import Notification, SinkWorker, WebhookSink, signature

SECRET = "s3cret-for-hmac"
ALWAYS = {"name": "harm-high", "metric": "harm_probability", "op": ">", "threshold": 1e-4, "sinks": ["hook"],
          "severity": "critical", "labels": {"team": "safety"}, "annotations": {"runbook": "https://wiki/x"}}


def engine_with_hook(store, monkeypatch, url, **hook):
    monkeypatch.setenv("TAILMON_TEST_HOOK_SECRET", SECRET)
    sink = {"type": "webhook", "url": url, "secret_env": "TAILMON_TEST_HOOK_SECRET", **hook}
    return AlertService(make_config([ALWAYS], sinks={"hook": sink}), store)


def test_signed_json_and_retries_with_backoff(store, receiver, monkeypatch):
    hook = receiver(fail_first=2, secret=SECRET.encode())
    service = engine_with_hook(store, monkeypatch, hook.url, retries=3, backoff=0.2)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3), run_id=11)
    service.close(10)

    first, second, third = hook.wait_for(3)
    assert len(hook.requests) == 3  # two 500s, then delivered: no fourth attempt
    assert all(r.signature_ok for r in hook.requests)
    assert first.body == second.body == third.body
    assert first.headers["Content-Type"] == "application/json"
    # Exponential backoff: 0.2 s, then 0.4 s.
    assert 0.2 <= second.at - first.at < 0.4 + 0.3
    assert 0.4 <= third.at - second.at < 0.8 + 0.3
    body = third.json()
    assert (body["status"], body["monitor"], body["rule"], body["severity"], body["run_id"]) == (
        "firing", "prod", "harm-high", "critical", 11)
    assert body["labels"] == {"team": "safety", "alertname": "harm-high", "monitor": "prod", "severity": "critical"}
    assert body["annotations"] == {"runbook": "https://wiki/x"} and body["value"] == 1e-3
    assert body["ends_at"] is None and body["repeat"] is False and body["test"] is False

    [delivery] = store.alert_deliveries(rule="harm-high")
    assert (delivery["sink"], delivery["outcome"], delivery["attempts"], delivery["http_status"]) == (
        "hook", "delivered", 3, 200)
    [event] = store.alert_events("prod")[:1]
    assert delivery["event_id"] == event["id"] and event["state"] == "firing"


def test_a_wrong_secret_is_refused_by_the_receiver_and_not_retried(store, receiver, monkeypatch):
    hook = receiver(secret=b"another secret")
    service = engine_with_hook(store, monkeypatch, hook.url, retries=3, backoff=0.05)
    service.on_run("prod", "succeeded", figures())
    service.close(10)
    assert [r.signature_ok for r in hook.requests] == [False]
    [delivery] = store.alert_deliveries()
    assert (delivery["outcome"], delivery["attempts"], delivery["http_status"]) == ("failed", 1, 401)
    assert "HTTP 401" in delivery["error"]


def test_a_receiver_that_keeps_failing_is_recorded_as_failed(store, receiver, monkeypatch):
    hook = receiver(fail_first=100)
    service = engine_with_hook(store, monkeypatch, hook.url, retries=2, backoff=0.05)
    service.on_run("prod", "succeeded", figures())
    service.close(10)
    assert len(hook.requests) == 3
    [delivery] = store.alert_deliveries()
    assert (delivery["outcome"], delivery["attempts"], delivery["http_status"]) == ("failed", 3, 500)


def test_a_hanging_receiver_does_not_block_the_caller(store, receiver, monkeypatch):
    hook = receiver(hang=True)
    # A caller that waited would take two attempts of 2 s and the backoff (4.1 s): the bound of 2 s
    # tells the two apart with room for a loaded machine (0.4 s failed at 1.5 s under load).
    service = engine_with_hook(store, monkeypatch, hook.url, timeout=2, retries=1, backoff=0.1)
    t0 = time.monotonic()
    assert service.on_run("prod", "succeeded", figures()) == ["harm-high"]
    assert time.monotonic() - t0 < 2.0  # the run's thread does not wait for the receiver
    assert service.flush(0.2) is False  # still trying
    hook.wait_for(1)
    service.close(10)  # two attempts of 2 s and a 0.1 s backoff fit in the bound
    [delivery] = store.alert_deliveries()
    assert (delivery["outcome"], delivery["attempts"]) == ("failed", 2)
    assert "no answer within 2 s" in delivery["error"]


def test_shutdown_bound_drops_what_cannot_be_delivered(store, receiver, monkeypatch):
    hook = receiver(hang=True)
    service = engine_with_hook(store, monkeypatch, hook.url, timeout=5, retries=0)
    service.on_run("prod", "succeeded", figures(), now=datetime.now(timezone.utc))
    service.on_run("prod", "failed", None)  # no figure for the rule: nothing more queued
    hook.wait_for(1)
    t0 = time.monotonic()
    service.close(0.3)
    assert time.monotonic() - t0 < 2.5  # the bound plus the worker's join grace, not the 5 s timeout
    hook.release.set()


def test_a_full_queue_drops_and_records_instead_of_blocking(store, receiver):
    hook = receiver(hang=True)
    recorded = []
    sink = WebhookSink("slow", SinkConfig(type="webhook", url=hook.url, timeout=2, retries=0))
    worker = SinkWorker(sink, lambda s, n, event_id, d, notification_id: recorded.append(d), maxsize=1)
    n = _notification()
    t0 = time.monotonic()
    results = [worker.submit(n) for _ in range(4)]
    assert time.monotonic() - t0 < 0.5
    # One in flight (maybe), one queued, the rest dropped at once.
    assert results[:1] == [True] and results.count(False) >= 2
    dropped = [d for d in recorded if d.outcome == "dropped"]
    assert len(dropped) == results.count(False) and "queue of sink slow is full" in dropped[0].error
    hook.release.set()
    worker.close(time.time() + 5)


def test_slack_format(store, receiver, monkeypatch):
    hook = receiver(secret=SECRET.encode())
    service = engine_with_hook(store, monkeypatch, hook.url, format="slack")
    service.on_run("prod", "succeeded", figures(p_hat=2e-3))
    service.on_run("prod", "succeeded", figures(p_hat=0.0))
    service.close(10)
    firing, resolved = (r.json() for r in hook.wait_for(2))
    assert set(firing) == {"text", "blocks"}
    assert firing["text"] == "[FIRING] critical: prod/harm-high firing: harm_probability = 0.002 > 0.0001"
    assert resolved["text"].startswith("[RESOLVED] critical: prod/harm-high resolved")
    assert firing["blocks"][0] == {"type": "section", "text": {"type": "mrkdwn", "text": firing["text"]}}
    assert "*team*: safety" in firing["blocks"][1]["elements"][0]["text"]
    assert all(r.signature_ok for r in hook.requests)


def test_signature_is_hmac_sha256_of_the_exact_body():
    body = json.dumps({"a": 1}).encode()
    assert signature(b"k", body) == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert signature(b"k", body) != signature(b"k", body + b" ")
    assert signature(b"k", body) != signature(b"other", body)


def test_unreachable_receiver_fails_after_the_retries(store, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = engine_with_hook(store, monkeypatch, f"http://127.0.0.1:{port}/hook", retries=1, backoff=0.05)
    service.on_run("prod", "succeeded", figures())
    service.close(10)
    [delivery] = store.alert_deliveries()
    assert (delivery["outcome"], delivery["attempts"], delivery["http_status"]) == ("failed", 2, None)
    # the error names the receiver's host (stored errors are redacted: the address shows as [IP]),
    # never the webhook's path, which may be its secret
    assert f"[IP]:{port}/[REDACTED]" in delivery["error"] and "refused" in delivery["error"].lower()
    assert "/hook" not in delivery["error"]


def _notification() -> Notification:
    now = datetime.now(timezone.utc)
    return Notification(monitor="prod", rule="r", status="firing", severity="warning", summary="s",
                        labels={"alertname": "r", "monitor": "prod", "severity": "warning"}, annotations={},
                        starts_at=now, at=now)


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    before = set(threading.enumerate())
    yield
    # Every worker a test started has stopped (daemon threads would hide a leak otherwise).
    deadline = time.time() + 5
    while time.time() < deadline:
        left = [t for t in threading.enumerate() if t not in before and t.name.startswith("tailmon-alerts-")]
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError(f"sink workers still running: {[t.name for t in left]}")
