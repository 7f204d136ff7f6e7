"""The alerts part of the Store: alert events (transitions), per-rule alert state, the
notifications owed to each sink until it takes them, and every delivery attempt."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from tailmon.errors import InputError
from tailmon.redact import mask_secrets, redact
from tailmon.store.base import StoreBase
from tailmon.store.schema import (
    ALERT_DELIVERIES,
    ALERT_EVENTS,
    ALERT_NOTIFICATIONS,
    ALERT_STATE,
    ALERT_STATES,
    DELIVERY_OUTCOMES,
    NOTIFICATION_STATES,
)
from tailmon.store.values import as_aware, as_float, as_int


class AlertStore(StoreBase):
    """Alert history and state; every method runs its own transaction."""

    _EVENT_FIELDS = ("monitor", "rule", "state", "severity", "value", "threshold", "message", "labels", "at",
                     "run_id")
    _STATE_FIELDS = ("state", "consecutive", "since", "last_notified", "last_value", "labels")

    def add_alert_event(self, **fields) -> int:
        """Record one alert transition; `at` defaults to now. Returns the event id."""
        unknown = set(fields) - set(self._EVENT_FIELDS)
        if unknown:
            raise InputError(f"unknown alert event fields {sorted(unknown)}; known: {', '.join(self._EVENT_FIELDS)}")
        missing = [k for k in ("monitor", "rule", "state") if not fields.get(k)]
        if missing:
            raise InputError(f"an alert event needs {', '.join(missing)}")
        if fields["state"] not in ALERT_STATES:
            raise InputError(f"alert state must be one of {', '.join(ALERT_STATES)}, got '{fields['state']}'")
        values = dict(fields, value=as_float(fields.get("value"), "alert value"),
                      threshold=as_float(fields.get("threshold"), "alert threshold"),
                      at=as_aware(fields.get("at"), "alert event 'at'"))
        with self._tx(f"recording an alert event of monitor '{fields['monitor']}'") as conn:
            if values["at"] is None:
                values["at"] = self._now(conn)
            return conn.execute(insert(ALERT_EVENTS).values(**values)).inserted_primary_key[0]

    def alert_events(self, monitor: str | None = None, limit: int = 50) -> list[dict]:
        """Newest first."""
        if int(limit) < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        query = select(ALERT_EVENTS).order_by(ALERT_EVENTS.c.at.desc(), ALERT_EVENTS.c.id.desc()).limit(int(limit))
        if monitor is not None:
            query = query.where(ALERT_EVENTS.c.monitor == monitor)
        with self._read("listing alert events") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def get_alert_state(self, monitor: str, rule: str) -> dict | None:
        with self._read(f"reading alert state {monitor}/{rule}") as conn:
            row = conn.execute(select(ALERT_STATE).where(ALERT_STATE.c.monitor == monitor,
                                                         ALERT_STATE.c.rule == rule)).first()
            return dict(row._mapping) if row else None

    def set_alert_state(self, monitor: str, rule: str, **fields) -> None:
        """Create or update the (monitor, rule) state with the given fields; a new row starts
        as state 'inactive', consecutive 0."""
        unknown = set(fields) - set(self._STATE_FIELDS)
        if unknown:
            raise InputError(f"unknown alert state fields {sorted(unknown)}; known: {', '.join(self._STATE_FIELDS)}")
        if "state" in fields and fields["state"] not in ALERT_STATES:
            raise InputError(f"alert state must be one of {', '.join(ALERT_STATES)}, got '{fields['state']}'")
        values = dict(fields)
        if "consecutive" in values:
            values["consecutive"] = as_int(values["consecutive"], "consecutive")
            if values["consecutive"] is None or values["consecutive"] < 0:
                raise InputError(f"consecutive must be an integer >= 0, got {fields['consecutive']!r}")
        for key in ("since", "last_notified"):
            if key in values:
                as_aware(values[key], key)
        if "last_value" in values:
            values["last_value"] = as_float(values["last_value"], "last_value")
        key = (ALERT_STATE.c.monitor == monitor) & (ALERT_STATE.c.rule == rule)
        with self._tx(f"writing alert state {monitor}/{rule}") as conn:
            if values and conn.execute(update(ALERT_STATE).where(key).values(**values)).rowcount == 1:
                return
            if not values and conn.execute(select(ALERT_STATE.c.state).where(key)).first() is not None:
                return
            try:
                with conn.begin_nested():
                    conn.execute(insert(ALERT_STATE).values(
                        **{"state": "inactive", "consecutive": 0, **values, "monitor": monitor, "rule": rule}))
            except IntegrityError:
                # A concurrent writer created the row first: ours is an update after all.
                if values:
                    conn.execute(update(ALERT_STATE).where(key).values(**values))

    _DELIVERY_FIELDS = ("monitor", "rule", "sink", "status", "repeat", "outcome", "attempts", "http_status", "error",
                        "event_id", "at", "notification_id")

    def add_alert_delivery(self, **fields) -> int:
        """Record the outcome of one attempt to deliver a notification to one sink; `at` defaults
        to now. Errors are stored redacted, credentials masked."""
        unknown = set(fields) - set(self._DELIVERY_FIELDS)
        if unknown:
            raise InputError(f"unknown alert delivery fields {sorted(unknown)}; known: "
                             f"{', '.join(self._DELIVERY_FIELDS)}")
        missing = [k for k in ("monitor", "rule", "sink", "status", "outcome") if not fields.get(k)]
        if missing:
            raise InputError(f"an alert delivery needs {', '.join(missing)}")
        if fields["outcome"] not in DELIVERY_OUTCOMES:
            raise InputError(f"delivery outcome must be one of {', '.join(DELIVERY_OUTCOMES)}, "
                             f"got '{fields['outcome']}'")
        values = dict(fields, repeat=bool(fields.get("repeat", False)),
                      attempts=as_int(fields.get("attempts", 0), "attempts"),
                      http_status=as_int(fields.get("http_status"), "http_status"),
                      error=redact(mask_secrets(fields["error"])) if fields.get("error") is not None else None,
                      at=as_aware(fields.get("at"), "alert delivery 'at'"))
        with self._tx(f"recording an alert delivery of monitor '{fields['monitor']}'") as conn:
            if values["at"] is None:
                values["at"] = self._now(conn)
            return conn.execute(insert(ALERT_DELIVERIES).values(**values)).inserted_primary_key[0]

    def alert_deliveries(self, monitor: str | None = None, rule: str | None = None, limit: int = 50) -> list[dict]:
        """Newest first."""
        if int(limit) < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        query = (select(ALERT_DELIVERIES).order_by(ALERT_DELIVERIES.c.at.desc(), ALERT_DELIVERIES.c.id.desc())
                 .limit(int(limit)))
        if monitor is not None:
            query = query.where(ALERT_DELIVERIES.c.monitor == monitor)
        if rule is not None:
            query = query.where(ALERT_DELIVERIES.c.rule == rule)
        with self._read("listing alert deliveries") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    # -- notifications owed to sinks (revision 0004)

    def add_alert_notification(self, *, monitor: str, rule: str, sink: str, status: str, payload: dict,
                               next_attempt_at, repeat: bool = False, event_id: int | None = None,
                               created_at=None) -> int:
        """Owe `sink` a notification (pending from `next_attempt_at` on); returns its id. Pending
        ones of the same rule to the same sink are superseded in the same transaction: the sink
        is told the latest state, never an older one after it."""
        if not (monitor and rule and sink and status):
            raise InputError("an alert notification needs monitor, rule, sink and status")
        due = as_aware(next_attempt_at, "next_attempt_at")
        created = as_aware(created_at, "created_at")
        t = ALERT_NOTIFICATIONS
        with self._tx(f"recording a notification of {monitor}/{rule} to sink {sink}") as conn:
            now = self._now(conn)
            conn.execute(update(t).where(t.c.monitor == monitor, t.c.rule == rule, t.c.sink == sink,
                                         t.c.state == "pending").values(state="superseded", finished_at=now))
            return conn.execute(insert(t).values(
                monitor=monitor, rule=rule, sink=sink, status=status, repeat=bool(repeat), event_id=event_id,
                payload=payload, state="pending", attempts=0, created_at=created or now,
                next_attempt_at=due or now)).inserted_primary_key[0]

    def due_alert_notifications(self, now, limit: int = 100) -> list[dict]:
        """Pending notifications whose next attempt is due at `now`, oldest first."""
        t = ALERT_NOTIFICATIONS
        query = (select(t).where(t.c.state == "pending", t.c.next_attempt_at <= as_aware(now, "now"))
                 .order_by(t.c.id).limit(int(limit)))
        with self._read("listing due alert notifications") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def claim_alert_notification(self, notification_id: int, now, until) -> bool:
        """Take a due notification for one attempt: its next attempt moves to `until` (a lease: a
        peer sharing the database leaves it alone meanwhile). False when it is no longer due
        (a peer took it, or it was delivered or superseded)."""
        t = ALERT_NOTIFICATIONS
        with self._tx(f"claiming alert notification {notification_id}") as conn:
            result = conn.execute(update(t).where(t.c.id == notification_id, t.c.state == "pending",
                                                  t.c.next_attempt_at <= as_aware(now, "now"))
                                  .values(next_attempt_at=as_aware(until, "until")))
            return result.rowcount == 1

    def alert_notification_attempted(self, notification_id: int, *, state: str = "pending",
                                     backoff: tuple[float, float] = (60.0, 3600.0)) -> dict | None:
        """Count one attempt of a pending notification. 'delivered' and 'failed' end it; still
        'pending', its next attempt is due after the backoff (first, cap) in seconds: `first`
        after the first attempt, doubling with each further one, at most `cap`. Returns the row
        after, or None when it was no longer pending (superseded meanwhile: left as it is)."""
        if state not in ("pending", "delivered", "failed"):
            raise InputError(f"an attempt leaves a notification pending, delivered or failed, not '{state}'")
        first, cap = (float(x) for x in backoff)
        t = ALERT_NOTIFICATIONS
        with self._tx(f"recording an attempt of alert notification {notification_id}") as conn:
            now = self._now(conn)
            row = conn.execute(select(t.c.attempts).where(t.c.id == notification_id, t.c.state == "pending")
                               .with_for_update()).first()
            if row is None:
                return None
            values = {"state": state, "attempts": row.attempts + 1}
            if state == "pending":
                delay = min(first * 2.0 ** min(row.attempts, 60), cap)
                values["next_attempt_at"] = now + timedelta(seconds=delay)
            else:
                values.update(next_attempt_at=None, finished_at=now)
            conn.execute(update(t).where(t.c.id == notification_id).values(**values))
            return dict(conn.execute(select(t).where(t.c.id == notification_id)).one()._mapping)

    def expire_alert_notifications(self, created_before) -> list[dict]:
        """Give up (state 'failed') pending notifications created before `created_before`;
        returns them."""
        t = ALERT_NOTIFICATIONS
        with self._tx("expiring old alert notifications") as conn:
            now = self._now(conn)
            old = t.c.state == "pending", t.c.created_at < as_aware(created_before, "created_before")
            rows = [dict(r._mapping) for r in conn.execute(select(t).where(*old))]
            if rows:
                conn.execute(update(t).where(t.c.id.in_([r["id"] for r in rows]))
                             .values(state="failed", next_attempt_at=None, finished_at=now))
            return rows

    def alert_notifications(self, monitor: str | None = None, rule: str | None = None, state: str | None = None,
                            limit: int = 50) -> list[dict]:
        """Notifications owed or paid to sinks, newest first."""
        if state is not None and state not in NOTIFICATION_STATES:
            raise InputError(f"notification state must be one of {', '.join(NOTIFICATION_STATES)}, got '{state}'")
        if int(limit) < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        t = ALERT_NOTIFICATIONS
        query = select(t).order_by(t.c.id.desc()).limit(int(limit))
        for column, value in (("monitor", monitor), ("rule", rule), ("state", state)):
            if value is not None:
                query = query.where(t.c[column] == value)
        with self._read("listing alert notifications") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def latest_alert_notifications(self) -> list[dict]:
        """The newest notification of every (monitor, rule, sink): whether each sink has taken
        what it was last told. Without payloads; ordered by monitor, rule, sink."""
        t = ALERT_NOTIFICATIONS
        newest = select(func.max(t.c.id)).group_by(t.c.monitor, t.c.rule, t.c.sink)
        query = (select(*(c for c in t.c if c.name != "payload")).where(t.c.id.in_(newest))
                 .order_by(t.c.monitor, t.c.rule, t.c.sink))
        with self._read("listing the latest alert notifications") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def alert_states(self, state: str | None = None) -> list[dict]:
        """Every (monitor, rule) state, optionally only those in `state`, ordered by monitor, rule."""
        if state is not None and state not in ALERT_STATES:
            raise InputError(f"alert state must be one of {', '.join(ALERT_STATES)}, got '{state}'")
        query = select(ALERT_STATE).order_by(ALERT_STATE.c.monitor, ALERT_STATE.c.rule)
        if state is not None:
            query = query.where(ALERT_STATE.c.state == state)
        with self._read("listing alert states") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
