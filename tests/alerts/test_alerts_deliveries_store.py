"""The store's alert_deliveries table (revisions 0003, 0004): recording, listing, validation."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tailmon.errors import InputError

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def test_deliveries_newest_first_with_filters(store):
    first = store.add_alert_delivery(monitor="m1", rule="r1", sink="hook", status="firing", outcome="failed",
                                     attempts=4, http_status=503, error="HTTP 503 from https://hooks/x", at=T0)
    second = store.add_alert_delivery(monitor="m1", rule="r2", sink="log", status="resolved", outcome="delivered",
                                      attempts=1, event_id=12, at=T0 + timedelta(minutes=1))
    third = store.add_alert_delivery(monitor="m2", rule="r1", sink="am", status="firing", repeat=True,
                                     outcome="dropped", error="the queue of sink am is full")
    assert [d["id"] for d in store.alert_deliveries()] == [third, second, first]
    assert [d["id"] for d in store.alert_deliveries("m1")] == [second, first]
    assert [d["id"] for d in store.alert_deliveries(rule="r1")] == [third, first]
    assert [d["id"] for d in store.alert_deliveries(limit=1)] == [third]
    row = store.alert_deliveries("m1", "r1")[0]
    assert row == {"id": first, "monitor": "m1", "rule": "r1", "sink": "hook", "status": "firing", "repeat": False,
                   "outcome": "failed", "attempts": 4, "http_status": 503, "error": "HTTP 503 from https://hooks/x",
                   "event_id": None, "at": T0, "notification_id": None}
    assert store.alert_deliveries("m2")[0]["at"].tzinfo == timezone.utc  # `at` defaults to now, in UTC


def test_delivery_errors_are_redacted(store):
    store.add_alert_delivery(monitor="m1", rule="r", sink="hook", status="firing", outcome="failed",
                             error="receiver said: unknown user bob@example.com")
    assert "bob@example.com" not in store.alert_deliveries()[0]["error"]


def test_delivery_validation(store):
    with pytest.raises(InputError, match="unknown alert delivery fields"):
        store.add_alert_delivery(monitor="m", rule="r", sink="s", status="firing", outcome="delivered", colour=1)
    with pytest.raises(InputError, match="needs sink"):
        store.add_alert_delivery(monitor="m", rule="r", status="firing", outcome="delivered")
    with pytest.raises(InputError, match="delivery outcome must be one of delivered, failed, dropped, abandoned"):
        store.add_alert_delivery(monitor="m", rule="r", sink="s", status="firing", outcome="lost")
    with pytest.raises(InputError, match="timezone-aware"):
        store.add_alert_delivery(monitor="m", rule="r", sink="s", status="firing", outcome="failed",
                                 at=datetime(2025, 1, 1))
    with pytest.raises(InputError, match="limit must be >= 1"):
        store.alert_deliveries(limit=0)
    assert store.alert_deliveries() == []
