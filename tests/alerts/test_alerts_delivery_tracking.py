"""Delivery tracked per sink (issue 18, item 7), against real HTTP receivers on loopback and a real
SQLite store: a notification counts as delivered to a sink only once that sink answered 2xx; one
it did not take is retried on the clock's tick with a doubling backoff, every attempt a row; a
stop records the delivery in flight as abandoned and a restarted service delivers it; a webhook
URL that is itself the secret appears in no log line and no stored row."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from alerts_support import figures, make_config
from tailmon.alerts import AlertService

RULE = {"name": "harm-high", "metric": "harm_probability", "op": ">", "threshold": 1e-4, "sinks": ["hook"]}
LATER = timedelta(days=1) - timedelta(minutes=1)  # past every backoff, short of giving up (1 day)


def service_for(store, url, *, retry_first=0.2, **hook):
    sink = {"type": "webhook", "url": url, "retries": 0, "backoff": 0.05, **hook}
    return AlertService(make_config([RULE], sinks={"hook": sink}), store, retry_first=retry_first)


def later(now=None):
    return (now or datetime.now(timezone.utc)) + LATER


def settle(service, timeout=10):
    assert service.flush(timeout), "deliveries still in flight"


def attempts(store):
    """(outcome, notification_id) of every delivery row, oldest first."""
    return [(d["outcome"], d["notification_id"]) for d in reversed(store.alert_deliveries())]


def test_a_failed_delivery_is_retried_on_the_tick_until_the_sink_takes_it(store, receiver):
    """Catches an alert counted as notified although its sink answered 500, and a failed
    notification never tried again (before: nothing until the rule's repeat interval, 4 h)."""
    hook = receiver(fail_first=1)  # 500, then 200
    service = service_for(store, hook.url)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3), run_id=7)
    settle(service)
    [pending] = store.alert_notifications(rule="harm-high")
    assert (pending["state"], pending["attempts"], pending["sink"]) == ("pending", 1, "hook")
    assert attempts(store) == [("failed", pending["id"])]

    assert service.retry_due() == 0  # not due yet: the backoff runs
    service.tick(later())  # the daemon's tick, after the backoff
    settle(service)
    assert attempts(store) == [("failed", pending["id"]), ("delivered", pending["id"])]
    [done] = store.alert_notifications(rule="harm-high")
    assert (done["state"], done["attempts"], done["next_attempt_at"]) == ("delivered", 2, None)
    first, second = (r.json() for r in hook.wait_for(2))
    assert (second["rule"], second["status"], second["run_id"]) == ("harm-high", "firing", 7)
    assert first == second  # the same notification, `at` included (when it was made)

    service.tick(later() + LATER)  # delivered: never sent again by the retries
    settle(service)
    assert len(hook.requests) == 2 and len(store.alert_deliveries()) == 2
    service.close(5)


def test_the_backoff_doubles_between_attempts(store, receiver):
    """Catches retries at a fixed pace (a dead receiver hammered every tick) or never spaced."""
    hook = receiver(fail_first=100)
    service = service_for(store, hook.url, retry_first=30.0)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3))
    settle(service)
    delays = []
    for _ in range(4):
        [row] = store.alert_notifications()
        last = store.alert_deliveries(limit=1)[0]
        delays.append((row["next_attempt_at"] - last["at"]).total_seconds())
        service.tick(row["next_attempt_at"] + timedelta(seconds=1))
        settle(service)
    # 30 s, then twice that each time; the store computes them from its own clock a few ms after
    # the delivery row's time, hence the 1 s of slack.
    for delay, expected in zip(delays, [30, 60, 120, 240]):
        assert expected <= delay < expected + 1, delays
    assert [o for o, _ in attempts(store)] == ["failed"] * 5 and len(hook.requests) == 5
    service.close(5)


def test_a_receiver_that_never_answers_is_tried_again(store, receiver):
    """Catches a hanging webhook leaving no row and no new attempt."""
    hook = receiver(hang=True)
    service = service_for(store, hook.url, timeout=0.3)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3))
    settle(service)
    [failed] = store.alert_deliveries()
    assert failed["outcome"] == "failed" and "no answer within 0.3 s" in failed["error"]
    hook.hang = False
    hook.release.set()
    service.tick(later())
    settle(service)
    assert [o for o, _ in attempts(store)] == ["failed", "delivered"]
    assert store.alert_notifications()[0]["state"] == "delivered"
    service.close(5)


def test_close_records_the_delivery_in_flight_as_abandoned_and_a_restart_delivers_it(store, receiver):
    """Catches SinkWorker.close returning while a delivery hangs without recording it: the
    process ends, and the notification is lost without a trace."""
    hook = receiver(hang=True)
    service = service_for(store, hook.url, timeout=5)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3))
    hook.wait_for(1)
    t0 = time.monotonic()
    service.close(0.3)
    assert time.monotonic() - t0 < 2.5  # the stop bound (and the join's grace), not the 5 s timeout
    [abandoned] = store.alert_deliveries()
    assert abandoned["outcome"] == "abandoned" and "in flight" in abandoned["error"]
    [pending] = store.alert_notifications()
    assert pending["state"] == "pending" and abandoned["notification_id"] == pending["id"]

    hook.hang = False
    hook.release.set()  # the old worker's request ends: its late answer is not recorded twice
    restarted = service_for(store, hook.url, timeout=5)
    assert restarted.retry_due(later()) == 1
    settle(restarted)
    assert [o for o, _ in attempts(store)] == ["abandoned", "delivered"]
    assert store.alert_notifications()[0]["state"] == "delivered"
    restarted.close(5)


def test_queued_notifications_behind_a_stuck_one_are_recorded_as_dropped(store, receiver):
    """Catches close() leaving queued notifications unrecorded while the worker is stuck."""
    hook = receiver(hang=True)
    rules = [dict(RULE, name=f"r{i}") for i in range(3)]
    sink = {"type": "webhook", "url": hook.url, "retries": 0, "timeout": 5}
    service = AlertService(make_config(rules, sinks={"hook": sink}), store)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3))
    hook.wait_for(1)
    service.close(0.2)
    assert sorted(d["outcome"] for d in store.alert_deliveries()) == ["abandoned", "dropped", "dropped"]
    assert [n["state"] for n in store.alert_notifications()] == ["pending"] * 3
    hook.release.set()


def test_a_newer_notification_supersedes_an_undelivered_one(store, receiver):
    """Catches a stale 'firing' retried after the 'resolved' was delivered (the receiver would
    end up believing the alert fires)."""
    hook = receiver(fail_first=1)
    service = service_for(store, hook.url)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3))  # firing: the 500
    settle(service)
    service.on_run("prod", "succeeded", figures(p_hat=0.0))  # resolved: delivered
    settle(service)
    resolved, firing = store.alert_notifications()
    assert (firing["status"], firing["state"]) == ("firing", "superseded")
    assert (resolved["status"], resolved["state"]) == ("resolved", "delivered")
    service.tick(later())
    settle(service)
    assert [r.json()["status"] for r in hook.requests] == ["firing", "resolved"]
    service.close(5)


def test_a_request_the_receiver_refuses_is_not_retried(store, receiver):
    """Catches a 4xx (the request is wrong: retrying cannot fix it) retried forever."""
    hook = receiver(status=404)
    service = service_for(store, hook.url)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3))
    settle(service)
    service.tick(later())
    settle(service)
    assert len(hook.requests) == 1
    assert store.alert_notifications()[0]["state"] == "failed"
    service.close(5)


def test_a_notification_too_old_is_given_up(store, receiver, caplog):
    hook = receiver(fail_first=100)
    service = service_for(store, hook.url)
    service.on_run("prod", "succeeded", figures(p_hat=1e-3))
    settle(service)
    with caplog.at_level(logging.ERROR, logger="tailmon.alerts"):
        service.tick(datetime.now(timezone.utc) + timedelta(days=1, minutes=1))
    settle(service)
    assert store.alert_notifications()[0]["state"] == "failed" and len(hook.requests) == 1
    assert "gave up the firing notification of prod/harm-high after 1 attempt(s)" in caplog.text
    service.close(5)


TOKEN = "XOXB-webhook-secret-4f2a"


@pytest.mark.parametrize("answer", ["500", "refused"])
def test_a_webhook_url_that_is_the_secret_is_never_logged_or_stored(store, receiver, caplog, answer, tmp_path,
                                                                    monkeypatch):
    """Catches the Slack-style webhook URL (its path and query are the credential) in the error
    that is logged, stored with the delivery, or printed by `tailmon alerts test`."""
    if answer == "500":
        hook = receiver(fail_first=100)
        port = hook.httpd.server_address[1]
    else:
        import socket

        with socket.socket() as s:  # nothing listens there once closed
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/services/T0/B0/{TOKEN}?token={TOKEN}"
    service = service_for(store, url)
    with caplog.at_level(logging.DEBUG):
        service.on_run("prod", "succeeded", figures(p_hat=1e-3))
        settle(service)
        service.tick(later())
        settle(service)
        service.close(5)
    rows = store.alert_deliveries()
    assert len(rows) == 2 and all(r["outcome"] == "failed" for r in rows)
    assert all(f"[IP]:{port}/[REDACTED]" in r["error"] for r in rows)  # the host is named, for the operator
    assert "sink hook: firing notification of prod/harm-high failed" in caplog.text
    stored = repr(rows) + repr(store.alert_notifications()) + repr(store.alert_events())
    assert TOKEN not in stored and TOKEN not in caplog.text

    config = tmp_path / "t.yaml"
    config.write_text(f"alert_sinks: {{hook: {{type: webhook, url: '{url}', retries: 0}}}}\n"
                      "monitors: [{name: prod, prompts: {type: file, path: p.jsonl}, judge: 'prefix:Sure', "
                      "proposals: ['system:Sure'], schedule: {every: 1h}}]\n")
    from tailmon.cli.main import main

    result = CliRunner().invoke(main, ["alerts", "test", "--sink", "hook", "--config", str(config)])
    assert result.exit_code == 3 and "hook: failed" in result.output
    assert TOKEN not in result.output and "/[REDACTED]" in result.output


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    before = set(threading.enumerate())
    yield
    deadline = time.time() + 10
    while time.time() < deadline:
        left = [t for t in threading.enumerate() if t not in before and t.name.startswith("tailmon-alerts-")]
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError(f"sink workers still running: {[t.name for t in left]}")
