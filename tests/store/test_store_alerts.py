"""Alert events and persisted alert state in the store, and its timezone handling."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tailmon.errors import InputError

PARIS = timezone(timedelta(hours=2))


def test_alert_events_newest_first_per_monitor(store):
    t0 = datetime(2025, 6, 1, 8, 0, tzinfo=timezone.utc)
    run_id = store.start_run("m1", model_ref="r", model_version=1, config_hash="c", settings={})
    first = store.add_alert_event(monitor="m1", rule="p_high", state="pending", severity="warning", value=2e-4,
                                  threshold=1e-4, message="p_hat 2e-4 > 1e-4", labels={"team": "safety"},
                                  at=t0, run_id=run_id)
    second = store.add_alert_event(monitor="m1", rule="p_high", state="firing", severity="critical", value=3e-4,
                                   threshold=1e-4, at=t0 + timedelta(hours=1))
    other = store.add_alert_event(monitor="m2", rule="khat", state="firing", at=t0 + timedelta(minutes=30))
    now_event = store.add_alert_event(monitor="m2", rule="khat", state="resolved")  # at defaults to now

    assert [e["id"] for e in store.alert_events()] == [now_event, second, other, first]
    assert [e["id"] for e in store.alert_events("m1")] == [second, first]
    assert [e["id"] for e in store.alert_events(limit=2)] == [now_event, second]
    event = store.alert_events("m1")[1]
    assert event == {"id": first, "monitor": "m1", "rule": "p_high", "state": "pending", "severity": "warning",
                     "value": 2e-4, "threshold": 1e-4, "message": "p_hat 2e-4 > 1e-4", "labels": {"team": "safety"},
                     "at": t0, "run_id": run_id}
    assert store.alert_events("m2")[0]["at"] > t0 and store.alert_events("m2")[0]["at"].tzinfo == timezone.utc
    assert store.alert_events("m2")[1]["run_id"] is None and store.alert_events("m2")[1]["labels"] is None


def test_alert_event_validation(store):
    with pytest.raises(InputError, match="unknown alert event fields"):
        store.add_alert_event(monitor="m1", rule="r", state="firing", colour="red")
    with pytest.raises(InputError, match="needs rule"):
        store.add_alert_event(monitor="m1", state="firing")
    with pytest.raises(InputError, match="alert state must be one of"):
        store.add_alert_event(monitor="m1", rule="r", state="on fire")
    with pytest.raises(InputError, match="timezone-aware"):
        store.add_alert_event(monitor="m1", rule="r", state="firing", at=datetime(2025, 1, 1))
    assert store.alert_events() == []


def test_alert_state_upsert(store):
    assert store.get_alert_state("m1", "p_high") is None
    store.set_alert_state("m1", "p_high")  # a new rule starts inactive
    assert store.get_alert_state("m1", "p_high") == {
        "monitor": "m1", "rule": "p_high", "state": "inactive", "consecutive": 0, "since": None,
        "last_notified": None, "last_value": None, "labels": None}

    since = datetime(2025, 6, 1, 10, 0, tzinfo=PARIS)
    store.set_alert_state("m1", "p_high", state="pending", consecutive=1, since=since, last_value=2e-4,
                          labels={"severity": "critical"})
    store.set_alert_state("m1", "p_high", state="firing", consecutive=2)  # other fields stay
    state = store.get_alert_state("m1", "p_high")
    assert state["state"] == "firing" and state["consecutive"] == 2 and state["last_value"] == 2e-4
    assert state["labels"] == {"severity": "critical"}
    # Stored and returned in UTC, the same instant.
    assert state["since"] == since and state["since"].tzinfo == timezone.utc and state["since"].hour == 8

    store.set_alert_state("m2", "khat", state="firing", last_notified=datetime.now(timezone.utc))
    store.set_alert_state("m3", "p_high", state="resolved")
    assert [(s["monitor"], s["rule"]) for s in store.alert_states()] == [("m1", "p_high"), ("m2", "khat"),
                                                                         ("m3", "p_high")]
    assert [s["monitor"] for s in store.alert_states("firing")] == ["m1", "m2"]
    assert store.alert_states("pending") == []


def test_alert_state_validation(store):
    with pytest.raises(InputError, match="alert state must be one of"):
        store.set_alert_state("m1", "r", state="burning")
    with pytest.raises(InputError, match="unknown alert state fields"):
        store.set_alert_state("m1", "r", severity="critical")
    with pytest.raises(InputError, match="consecutive must be an integer >= 0"):
        store.set_alert_state("m1", "r", consecutive=-1)
    with pytest.raises(InputError, match="timezone-aware"):
        store.set_alert_state("m1", "r", since=datetime(2025, 1, 1, 12, 0))
    with pytest.raises(InputError, match="alert state must be one of"):
        store.alert_states("burning")
    assert store.alert_states() == []


def test_notifications_owed_to_sinks(store):
    """alert_notifications (revision 0004) on both backends: a newer notification of the same rule
    to the same sink supersedes a pending one; only due ones are listed; one claim wins; each
    attempt counts, with the backoff doubling from `first` up to `cap`; old ones are given up."""
    now = datetime.now(timezone.utc)
    fields = dict(monitor="m1", rule="r", sink="hook", payload={"status": "firing"}, next_attempt_at=now)
    first = store.add_alert_notification(status="firing", event_id=3, **fields)
    other_sink = store.add_alert_notification(status="firing", **{**fields, "sink": "am"})
    second = store.add_alert_notification(status="resolved", **{**fields, "payload": {"status": "resolved"}})
    states = {n["id"]: n["state"] for n in store.alert_notifications()}
    assert states == {first: "superseded", other_sink: "pending", second: "pending"}
    assert [n["id"] for n in store.alert_notifications(state="pending", limit=1)] == [second]

    assert [n["id"] for n in store.due_alert_notifications(now)] == [other_sink, second]
    assert store.due_alert_notifications(now - timedelta(seconds=1)) == []
    # A claim is a lease: a second claim (a peer's) of the same due row fails.
    assert store.claim_alert_notification(second, now, now + timedelta(minutes=2)) is True
    assert store.claim_alert_notification(second, now, now + timedelta(minutes=2)) is False
    assert [n["id"] for n in store.due_alert_notifications(now)] == [other_sink]

    delays = []
    for _ in range(4):
        row = store.alert_notification_attempted(second, backoff=(10.0, 50.0))
        delays.append(round((row["next_attempt_at"] - datetime.now(timezone.utc)).total_seconds()))
    assert delays == [10, 20, 40, 50] and row["attempts"] == 4 and row["state"] == "pending"
    done = store.alert_notification_attempted(second, state="delivered")
    assert (done["state"], done["attempts"], done["next_attempt_at"]) == ("delivered", 5, None)
    assert done["finished_at"] is not None and done["payload"] == {"status": "resolved"}
    assert store.alert_notification_attempted(second) is None  # no longer pending: left alone
    assert store.alert_notification_attempted(first, state="failed") is None  # superseded stays so

    assert store.expire_alert_notifications(now - timedelta(hours=1)) == []
    [expired] = store.expire_alert_notifications(datetime.now(timezone.utc) + timedelta(seconds=1))
    assert expired["id"] == other_sink and store.alert_notifications(state="failed")[0]["id"] == other_sink
    with pytest.raises(InputError, match="pending, delivered or failed"):
        store.alert_notification_attempted(other_sink, state="superseded")
    with pytest.raises(InputError, match="notification state must be one of"):
        store.alert_notifications(state="lost")
