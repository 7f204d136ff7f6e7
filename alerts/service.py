"""The alert engine: evaluates each monitor's rules after its runs and on a clock, keeps their
state in the store, records every transition and hands notifications to the sinks.

The store is the only state. A new engine on the same database (a restarted daemon, a peer, a
`tailmon run --once`) continues where the last left off: a firing alert stays firing and is not
notified again before its repeat interval.

Delivery is tracked per sink. Each notification to each sink is kept in the store (pending) until
that sink takes it (2xx); an attempt that fails (after the sink's own quick retries), is dropped
or is cut short by a stop is recorded, and the notification is tried again on the clock's tick
(the next run may be hours away) after a backoff that doubles from `retry_first` up to
`retry_max`, until it is delivered, superseded by a newer notification of the same rule to the
same sink, refused with a 4xx that retrying cannot fix, or older than `give_up_after`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Protocol

from tailmon.alerts.config import LOG_SINK, SinkConfig
from tailmon.alerts.rules import (
    GAUGE_VALUE,
    Rule,
    State,
    Step,
    compile_rules,
    evaluate,
    message,
    run_figures,
)
from tailmon.alerts.sinks import Delivery, Notification, Sink, SinkWorker, build_sink, retryable
from tailmon.errors import TailmonError
from tailmon.estimation.result import RunFigures

log = logging.getLogger("tailmon.alerts")

TEST_ALERTNAME = "tailmon-test"

RETRY_FIRST_S = 60.0
"""A notification a sink did not take is tried again after this long, then twice as long, ..."""
RETRY_MAX_S = 3600.0
"""... at most this long apart ..."""
GIVE_UP_AFTER_S = 86400.0
"""... until it is this old: then it is recorded as failed and no longer tried."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AlertStateStore(Protocol):
    """What the alert service needs of a store (tailmon.store.Store is one): alert state and
    history, and the last successful run for staleness. Rows are dicts with the field names."""

    def alert_states(self, state: str | None = None) -> list[dict]: ...

    def get_alert_state(self, monitor: str, rule: str) -> dict | None: ...

    def set_alert_state(self, monitor: str, rule: str, **fields) -> None: ...

    def add_alert_event(self, **fields) -> int: ...

    def add_alert_delivery(self, **fields) -> int: ...

    def add_alert_notification(self, **fields) -> int: ...

    def due_alert_notifications(self, now: datetime, limit: int = 100) -> list[dict]: ...

    def claim_alert_notification(self, notification_id: int, now: datetime, until: datetime) -> bool: ...

    def alert_notification_attempted(self, notification_id: int, *, state: str = "pending",
                                     backoff: tuple[float, float] = (60.0, 3600.0)) -> dict | None: ...

    def expire_alert_notifications(self, created_before: datetime) -> list[dict]: ...

    def list_runs(self, monitor: str | None = None, status: str | None = None, limit: int = 20) -> list[dict]: ...


class AlertService:
    """Evaluates every monitor's rules after each run and on the daemon's clock, keeps their state
    in the store and notifies the sinks. `config`: the daemon's Config; `store`: an AlertStateStore
    (None for `alerts test`, which sends without state); `metrics`: Metrics or None."""

    def __init__(self, config, store: AlertStateStore | None, metrics=None, *, retry_first: float = RETRY_FIRST_S,
                 retry_max: float = RETRY_MAX_S, give_up_after: float = GIVE_UP_AFTER_S):
        self.store = store
        self.metrics = metrics
        self.started = utcnow()
        """Staleness of a monitor that never succeeded counts from here."""
        self.retry_first, self.retry_max, self.give_up_after = retry_first, retry_max, give_up_after
        self._lock = threading.RLock()
        self._workers: dict[str, SinkWorker] = {}
        self._resent: dict[tuple, datetime] = {}
        self._in_flight: set[int] = set()
        """Ids of stored notifications queued or being delivered by this process's workers."""
        self._in_flight_lock = threading.Lock()
        self.configure(config)

    # -- configuration

    def configure(self, config) -> None:
        """Take a (re)loaded config: its rules and sinks. The previous sinks' workers finish
        their queues in the background."""
        with self._lock:
            self._sink_configs = {LOG_SINK: SinkConfig(type="log"), **config.alert_sinks}
            self.rules: dict[str, list[Rule]] = {m.name: compile_rules(m.alerts) for m in config.monitors}
            old = self._new_workers()
        for worker in old.values():
            threading.Thread(target=worker.close, args=(time.time() + 30,), daemon=True).start()

    def _new_workers(self) -> dict[str, SinkWorker]:
        """Fresh sinks and workers from the configured sinks; returns the previous workers."""
        old, self._workers = self._workers, {name: SinkWorker(build_sink(name, cfg), self._record)
                                             for name, cfg in self._sink_configs.items()}
        self.sinks: dict[str, Sink] = {name: w.sink for name, w in self._workers.items()}
        return old

    def rule(self, monitor: str, name: str) -> Rule | None:
        return next((r for r in self.rules.get(monitor, []) if r.name == name), None)

    def sinks_of(self, rule: Rule) -> list[str]:
        return list(rule.sinks) if rule.sinks is not None else list(self.sinks)

    # -- evaluation

    def restore(self) -> None:
        """Set the alert-state gauge of every configured rule from the store (daemon start)."""
        if self.metrics is None:
            return
        stored = {(s["monitor"], s["rule"]): s["state"] for s in self.store.alert_states()}
        for monitor, rules in self.rules.items():
            for rule in rules:
                self._gauge(monitor, rule, stored.get((monitor, rule.name), "inactive"))

    def on_run(self, monitor: str, status: str, figures: RunFigures | None = None, run_id: int | None = None,
               now: datetime | None = None) -> list[str]:
        """Evaluate the monitor's rules on an ended run (`figures`: a successful run's); returns the
        names of its rules firing after."""
        now = now or utcnow()
        figures = run_figures(status, figures)
        if any(r.staleness for r in self.rules.get(monitor, [])):
            figures.update(self._staleness(monitor, now))
        with self._lock:
            for rule in self.rules.get(monitor, []):
                self._apply(monitor, rule, figures, now, run_id)
        return self.firing(monitor)

    def tick(self, now: datetime | None = None) -> None:
        """The clock's part: staleness rules, Alertmanager keep-alives of firing alerts, and
        notifications that a sink has not taken yet."""
        now = now or utcnow()
        with self._lock:
            for monitor, rules in self.rules.items():
                stale_rules = [r for r in rules if r.staleness]
                if stale_rules:
                    figures = self._staleness(monitor, now)
                    for rule in stale_rules:
                        self._apply(monitor, rule, figures, now, None)
            self._resend(now)
            self.retry_due(now)

    def retry_due(self, now: datetime | None = None) -> int:
        """Submit again the stored notifications that a sink has not taken and whose next attempt
        is due (also those a stopped process left); returns how many."""
        if self.store is None:
            return 0
        now = now or utcnow()
        for row in self.store.expire_alert_notifications(now - timedelta(seconds=self.give_up_after)):
            log.error("sink %s: gave up the %s notification of %s/%s after %d attempt(s) over %s", row["sink"],
                      row["status"], row["monitor"], row["rule"], row["attempts"],
                      timedelta(seconds=round(self.give_up_after)))
        submitted = 0
        with self._lock:
            for row in self.store.due_alert_notifications(now):
                name = row["sink"]
                with self._in_flight_lock:
                    busy = row["id"] in self._in_flight
                # A sink no longer configured keeps its notifications until they expire.
                if busy or name not in self._workers:
                    continue
                if not self.store.claim_alert_notification(row["id"], now, now + self._lease(name)):
                    continue  # a peer took it
                n = Notification.from_json(row["payload"])
                if n.status == "firing" and self.sinks[name].config.type == "alertmanager":
                    n = replace(n, at=now)  # its endsAt counts from `at`: an old one would resolve it
                self._submit(name, n, row["event_id"], row["id"])
                submitted += 1
        return submitted

    def _lease(self, name: str) -> timedelta:
        """How long one attempt of sink `name` may take (its timeouts and backoffs, with slack):
        until then no process tries the same notification again."""
        cfg = self.sinks[name].config
        return timedelta(seconds=(cfg.retries + 1) * cfg.timeout + cfg.backoff * (2 ** cfg.retries) + 30.0)

    def firing(self, monitor: str) -> list[str]:
        configured = {r.name for r in self.rules.get(monitor, [])}
        return sorted(s["rule"] for s in self.store.alert_states("firing")
                      if s["monitor"] == monitor and s["rule"] in configured)

    def _staleness(self, monitor: str, now: datetime) -> dict[str, float]:
        last = self.store.list_runs(monitor=monitor, status="succeeded", limit=1)
        since = last[0]["finished_at"] if last else self.started
        return {"seconds_since_success": max(0.0, (now - since).total_seconds())}

    def _apply(self, monitor: str, rule: Rule, figures: dict, now: datetime, run_id: int | None) -> Step:
        row = self.store.get_alert_state(monitor, rule.name)
        prev = State(row["state"], row["consecutive"], row["since"], row["last_notified"], row["last_value"]) \
            if row else State()
        step = evaluate(rule, figures, prev, now)
        labels = self._labels(monitor, rule)
        if step.state != prev or row is None:
            s = step.state
            self.store.set_alert_state(monitor, rule.name, state=s.state, consecutive=s.consecutive, since=s.since,
                                       last_notified=s.last_notified, last_value=s.last_value, labels=labels)
        event_id = None
        text = message(monitor, rule, step.transition or step.state.state, step.state.last_value)
        if step.transition:
            event_id = self.store.add_alert_event(
                monitor=monitor, rule=rule.name, state=step.transition, severity=rule.severity,
                value=step.state.last_value, threshold=rule.threshold, message=text, labels=labels, at=now,
                run_id=run_id)
            # Notified transitions reach the log through the log sink, when the rule uses it.
            if not step.notify or LOG_SINK not in self.sinks_of(rule):
                log.log(logging.WARNING if step.transition == "pending" else logging.INFO, "alert %s", text)
        self._gauge(monitor, rule, step.state.state)
        if step.notify:
            self._notify(Notification(
                monitor=monitor, rule=rule.name, status=step.notify, severity=rule.severity, summary=text,
                labels=labels, annotations=dict(rule.annotations), starts_at=step.fired_at or now, at=now,
                value=step.state.last_value, threshold=rule.threshold, run_id=run_id, repeat=step.repeat),
                self.sinks_of(rule), event_id)
        return step

    def _labels(self, monitor: str, rule: Rule) -> dict:
        return {**rule.labels, "alertname": rule.name, "monitor": monitor, "severity": rule.severity}

    def _gauge(self, monitor: str, rule: Rule, state: str) -> None:
        if self.metrics is not None:
            self.metrics.alert_state.labels(monitor, rule.name, rule.severity).set(GAUGE_VALUE[state])

    def _resend(self, now: datetime) -> None:
        am = [name for name, sink in self.sinks.items() if sink.config.type == "alertmanager"]
        if not am:
            return
        for state in self.store.alert_states("firing"):
            rule = self.rule(state["monitor"], state["rule"])
            if rule is None:
                continue
            for name in am:
                if name not in self.sinks_of(rule):
                    continue
                key = (name, state["monitor"], rule.name)
                interval = timedelta(seconds=self.sinks[name].config.resend_interval)
                if key in self._resent and now - self._resent[key] < interval:
                    continue
                self._resent[key] = now
                self._workers[name].submit(Notification(
                    monitor=state["monitor"], rule=rule.name, status="firing", severity=rule.severity,
                    summary=message(state["monitor"], rule, "firing", state["last_value"]),
                    labels=self._labels(state["monitor"], rule), annotations=dict(rule.annotations),
                    starts_at=state["since"] or now, at=now, value=state["last_value"], threshold=rule.threshold,
                    resend=True))

    # -- delivery

    def _notify(self, n: Notification, sinks: list[str], event_id: int | None) -> None:
        for name in sinks:
            if self.sinks[name].config.type == "alertmanager":
                self._resent[(name, n.monitor, n.rule)] = n.at
            notification_id = None
            try:
                # Owed to the sink until it takes it; the lease keeps peers from sending it too.
                notification_id = self.store.add_alert_notification(
                    monitor=n.monitor, rule=n.rule, sink=name, status=n.status, repeat=n.repeat, event_id=event_id,
                    payload=n.to_json(), next_attempt_at=n.at + self._lease(name))
            except TailmonError as exc:  # the store is down: still try now, untracked
                log.error("sink %s: the %s notification of %s/%s is not kept for retries: %s", name, n.status,
                          n.monitor, n.rule, exc)
            self._submit(name, n, event_id, notification_id)

    def _submit(self, name: str, n: Notification, event_id: int | None, notification_id: int | None) -> None:
        if notification_id is not None:
            with self._in_flight_lock:
                self._in_flight.add(notification_id)
        self._workers[name].submit(n, event_id, notification_id)

    def _record(self, sink: Sink, n: Notification, event_id: int | None, delivery: Delivery,
                notification_id: int | None = None) -> None:
        """Every attempt's outcome (from the sink's worker): a delivery row, and the stored
        notification delivered, given up, or due again after the backoff."""
        if notification_id is not None:
            with self._in_flight_lock:
                self._in_flight.discard(notification_id)
        if n.test or (n.resend and delivery.outcome == "delivered"):
            return  # keep-alives are not notifications; a failed one is worth a row
        self.store.add_alert_delivery(
            monitor=n.monitor, rule=n.rule, sink=sink.name, status=n.status, repeat=n.repeat or n.resend,
            outcome=delivery.outcome, attempts=delivery.attempts, http_status=delivery.http_status,
            error=delivery.error, event_id=event_id, notification_id=notification_id)
        if notification_id is None:
            return
        if delivery.outcome == "delivered":
            self.store.alert_notification_attempted(notification_id, state="delivered")
        elif delivery.outcome == "failed" and not retryable(delivery):
            self.store.alert_notification_attempted(notification_id, state="failed")
        else:  # failed (no answer, 429, 5xx), dropped or abandoned: again after the backoff
            self.store.alert_notification_attempted(notification_id, backoff=(self.retry_first, self.retry_max))

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for queued notifications to be delivered; True when all were."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(w.idle() for w in self._workers.values()):
                return True
            time.sleep(0.02)
        return all(w.idle() for w in self._workers.values())

    def close(self, timeout: float) -> None:
        """Deliver what is queued within `timeout` s, record the rest as dropped, stop the workers.
        Later notifications go to fresh workers (`run_once` may be called again)."""
        deadline = time.time() + timeout
        with self._lock:
            old = self._new_workers()
        for worker in old.values():
            worker.close(deadline)

    # -- test notifications (tailmon alerts test)

    def test_notification(self, monitor: str | None = None, rule: Rule | None = None) -> Notification:
        now = utcnow()
        if rule is None:
            labels = {"alertname": TEST_ALERTNAME, "monitor": TEST_ALERTNAME, "severity": "info"}
            summary = "tailmon test notification: this sink is reachable (nothing is firing)"
            monitor, name, severity, annotations = TEST_ALERTNAME, TEST_ALERTNAME, "info", {}
        else:
            labels = self._labels(monitor, rule)
            summary = f"{monitor}/{rule.name} test notification: fires when {rule.describe()} (nothing is firing)"
            name, severity, annotations = rule.name, rule.severity, dict(rule.annotations)
        # Its own label, so that Alertmanager never merges a test into the real alert of the rule.
        labels["tailmon_test"] = "true"
        return Notification(monitor=monitor, rule=name, status="firing", severity=severity, summary=summary,
                            labels=labels, annotations=annotations, starts_at=now, at=now, test=True)

    def send_now(self, n: Notification, sinks: list[str]) -> dict[str, Delivery]:
        """Deliver on this thread, one sink after the other (the CLI's test; nothing recorded)."""
        cancel = threading.Event()
        results = {name: self.sinks[name].deliver(n, cancel) for name in sinks}
        for name, delivery in results.items():  # printed: a webhook's URL is its secret
            delivery.error = self.sinks[name].mask(delivery.error)
        return results
