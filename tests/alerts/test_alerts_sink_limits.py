"""The HTTP sinks against a hostile receiver (tests/hostile_http.py): a redirect is a failed delivery
that is neither followed nor retried, a dripping receiver is cut at the sink's timeout in all."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from hostile_http import hostile_pair  # tests/ is on sys.path
from tailmon.alerts.config import SinkConfig
from tailmon.alerts.sinks import AlertmanagerSink, Notification, WebhookSink


@pytest.fixture
def servers():
    main, other = hostile_pair(drip=0.2)
    yield main, other
    main.close()
    other.close()


def _notification() -> Notification:
    now = datetime.now(timezone.utc)
    return Notification(monitor="prod", rule="r", status="firing", severity="warning", summary="s",
                        labels={"alertname": "r", "monitor": "prod", "severity": "warning"}, annotations={},
                        starts_at=now, at=now)


@pytest.mark.parametrize("kind", ["webhook", "alertmanager"])
def test_a_redirect_is_a_failed_delivery_and_is_not_followed(servers, kind, monkeypatch):
    """Catches following redirects: urllib re-sent the signed notification to the Location (a 307
    keeps the POST and its body), or reported the other host's 200 as a delivery."""
    main, other = servers
    monkeypatch.setenv("TAILMON_TEST_HOOK_SECRET", "k")
    config = SinkConfig(type=kind, url=main.url + "/redirect-cross?token=t0ken", retries=3, backoff=0.01,
                        **({"secret_env": "TAILMON_TEST_HOOK_SECRET"} if kind == "webhook" else {}))
    sink = (WebhookSink if kind == "webhook" else AlertmanagerSink)("hook", config)
    delivery = sink.deliver(_notification(), threading.Event())
    assert (delivery.outcome, delivery.http_status, delivery.attempts) == ("failed", 302, 1)  # not retried
    assert other.requests == [] and len(main.requests) == 1
    assert "does not follow redirects" in delivery.error and "t0ken" not in delivery.error


def test_a_dripping_receiver_is_cut_at_the_timeout(servers):
    """Catches a per-read timeout: a byte every 0.2 s never trips it, and the sink's worker would
    be held for 200 s by one notification."""
    main, _ = servers
    sink = WebhookSink("hook", SinkConfig(type="webhook", url=main.url + "/drip-body", timeout=0.5, retries=0))
    start = time.monotonic()
    delivery = sink.deliver(_notification(), threading.Event())
    assert delivery.outcome == "failed" and "no answer within 0.5 s" in delivery.error
    assert time.monotonic() - start < 2.0


def test_a_huge_answer_does_not_fail_a_delivery(servers):
    """The receiver's 200 is what counts: a huge answer body is left unread, not read whole."""
    main, _ = servers
    sink = WebhookSink("hook", SinkConfig(type="webhook", url=main.url + "/huge", timeout=5, retries=0))
    delivery = sink.deliver(_notification(), threading.Event())
    assert (delivery.outcome, delivery.http_status) == ("delivered", 200)
