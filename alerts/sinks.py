"""Where alert notifications go: the log, a webhook, Alertmanager; and the workers that deliver them.

Delivery never happens on the caller's thread: each sink has one worker thread fed by a bounded
queue, so a receiver that hangs or fails delays only its own later notifications, never a run
or another sink. HTTP sinks retry connection errors, timeouts, 429 and 5xx with exponential
backoff (`backoff`, then twice that, ...); other 4xx are not retried (the request itself is wrong).
Every attempt's outcome goes to the worker's `record` callback, also one cut short by a stop
('abandoned') and those never tried ('dropped'): the alert service keeps what a sink has not
taken and tries again later.

A webhook URL is often itself the secret (Slack's hooks.slack.com/services/...): `Sink.mask`
keeps it (and any credential) out of the errors that are logged and stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from tailmon import __version__, httpclient
from tailmon.alerts.config import SinkConfig
from tailmon.redact import SecretsFilter, mask_secrets, mask_url

log = logging.getLogger("tailmon.alerts")
# Errors quote URLs: no credential in any of its lines (the service logs here too).
log.addFilter(SecretsFilter())

SIGNATURE_HEADER = "X-Tailmon-Signature"
QUEUE_SIZE = 1000
REPLY_BYTES = 64 * 1024  # of a receiver's answer; the rest is left unread (its status is what counts)


@dataclass(frozen=True)
class Notification:
    monitor: str
    rule: str
    status: str
    """'firing' or 'resolved'."""
    severity: str
    summary: str
    labels: dict
    """alertname, monitor, severity and the rule's own labels (Alertmanager identifies the alert by them)."""
    annotations: dict
    starts_at: datetime
    at: datetime
    value: float | None = None
    threshold: float | None = None
    run_id: int | None = None
    repeat: bool = False
    test: bool = False
    resend: bool = False
    """An Alertmanager keep-alive of an alert already notified: delivered, not recorded."""

    def to_json(self) -> dict:
        return {
            "version": 1, "status": self.status, "monitor": self.monitor, "rule": self.rule,
            "severity": self.severity, "summary": self.summary, "value": self.value, "threshold": self.threshold,
            "labels": self.labels, "annotations": self.annotations, "starts_at": self.starts_at.isoformat(),
            "ends_at": self.at.isoformat() if self.status == "resolved" else None, "at": self.at.isoformat(),
            "run_id": self.run_id, "repeat": self.repeat, "test": self.test,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Notification":
        """The notification `to_json()` described (kept by the store until its sink takes it)."""
        return cls(monitor=data["monitor"], rule=data["rule"], status=data["status"], severity=data["severity"],
                   summary=data["summary"], labels=dict(data["labels"]), annotations=dict(data["annotations"]),
                   starts_at=datetime.fromisoformat(data["starts_at"]), at=datetime.fromisoformat(data["at"]),
                   value=data.get("value"), threshold=data.get("threshold"), run_id=data.get("run_id"),
                   repeat=bool(data.get("repeat")), test=bool(data.get("test")))


@dataclass
class Delivery:
    outcome: str
    """'delivered', 'failed', 'dropped' (never attempted: queue full or the daemon stopped) or
    'abandoned' (in flight when the daemon stopped: no answer yet)."""
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None


class Sink(ABC):
    """Where notifications go; `deliver` runs on the sink's own worker thread."""

    def __init__(self, name: str, config: SinkConfig):
        self.name, self.config = name, config

    @abstractmethod
    def deliver(self, n: Notification, cancel: threading.Event) -> Delivery:
        """Send one notification (giving up early when `cancel` is set); never raises."""

    def mask(self, text: str | None) -> str | None:
        """`text` (an error to log or store) without credentials."""
        return mask_secrets(text) if text is not None else None


class LogSink(Sink):
    def deliver(self, n: Notification, cancel: threading.Event) -> Delivery:
        what = "test notification" if n.test else ("still firing" if n.repeat else n.status)
        level = logging.INFO if n.status == "resolved" or n.test else logging.WARNING
        log.log(level, "ALERT %s [%s] %s", what.upper(), n.severity, n.summary)
        return Delivery("delivered", attempts=1)


class _HttpSink(Sink):
    @abstractmethod
    def body(self, n: Notification) -> bytes:
        """The request body for this receiver's protocol."""

    url_is_secret = False
    """Whether the whole URL is the credential (a webhook's): then only scheme://host is ever shown."""

    def endpoint(self) -> str:
        return self.config.url

    def mask(self, text: str | None) -> str | None:
        if text is None:
            return None
        if self.url_is_secret:  # as written, or as the HTTP client's errors quote it (strictly masked)
            for url in (self.endpoint(), self.config.url):
                for quoted in (url, mask_url(url, strict=True)):
                    text = text.replace(quoted, mask_url(url, whole=True))
        return mask_secrets(text)

    def headers(self, body: bytes) -> dict:
        return {"Content-Type": "application/json", "User-Agent": f"tailmon/{__version__}"}

    def deliver(self, n: Notification, cancel: threading.Event) -> Delivery:
        body = self.body(n)
        headers = self.headers(body)
        cfg = self.config
        delay = cfg.backoff
        result = Delivery("failed")
        for attempt in range(1, cfg.retries + 2):
            result = _post(self.endpoint(), body, headers, cfg.timeout)
            result.attempts = attempt
            if result.outcome == "delivered" or not _retryable(result) or attempt > cfg.retries:
                break
            if cancel.wait(delay):  # stopping: no more waiting for a receiver that keeps failing
                result.error = f"{result.error}; retries abandoned at shutdown"
                break
            delay *= 2
        return result


class WebhookSink(_HttpSink):
    """POST the notification as JSON (or a Slack message), signed with HMAC-SHA256 when a secret is set."""

    url_is_secret = True

    def __init__(self, name: str, config: SinkConfig):
        super().__init__(name, config)
        self._secret = config.secret()

    def body(self, n: Notification) -> bytes:
        data = slack_message(n) if self.config.format == "slack" else n.to_json()
        return json.dumps(data, allow_nan=False).encode()

    def headers(self, body: bytes) -> dict:
        headers = super().headers(body)
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = signature(self._secret, body)
        return headers


class AlertmanagerSink(_HttpSink):
    """Alertmanager's API v2: POST /api/v2/alerts, a list of {labels, annotations, startsAt, endsAt}.

    Alertmanager resolves an alert that is not re-sent before its endsAt, so a firing alert is
    posted with endsAt = now + 4 x resend_interval and re-sent every resend_interval (the engine's
    tick); its resolution is the same alert with endsAt = now.
    """

    def endpoint(self) -> str:
        return self.config.url.rstrip("/") + "/api/v2/alerts"

    def body(self, n: Notification) -> bytes:
        ends = n.at if n.status == "resolved" else n.at + timedelta(seconds=4 * self.config.resend_interval)
        annotations = {"summary": n.summary, **n.annotations}
        if n.value is not None:
            annotations.setdefault("value", f"{n.value:.6g}")
        if n.threshold is not None:
            annotations.setdefault("threshold", f"{n.threshold:g}")
        alert = {"labels": n.labels, "annotations": annotations, "startsAt": _rfc3339(n.starts_at),
                 "endsAt": _rfc3339(ends)}
        return json.dumps([alert], allow_nan=False).encode()


def signature(secret: bytes, body: bytes) -> str:
    """The signature header's value: 'sha256=' and the hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def slack_message(n: Notification) -> dict:
    """A Slack-compatible incoming-webhook message ({"text", "blocks"}; Mattermost reads it too)."""
    head = "TEST" if n.test else ("RESOLVED" if n.status == "resolved" else "FIRING")
    text = f"[{head}] {n.severity}: {n.summary}"
    fields = [f"*{k}*: {v}" for k, v in n.labels.items()] + [f"*{k}*: {v}" for k, v in n.annotations.items()]
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "\n".join(fields)[:3000]}]},
        ],
    }


def _rfc3339(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def retryable(d: Delivery) -> bool:
    """Whether trying again may help: no answer, 429 or 5xx (another 4xx means the request is wrong)."""
    return _retryable(d)


def _retryable(d: Delivery) -> bool:
    return d.http_status is None or d.http_status == 429 or d.http_status >= 500


def _post(url: str, body: bytes, headers: dict, timeout: float) -> Delivery:
    # tailmon.httpclient: a redirect is a failure (never followed: a 307 would re-send the signed
    # body, and any redirect could carry it to another host), `timeout` bounds the whole exchange
    # (a receiver dripping its answer cannot hold the worker), and only the first bytes of the
    # answer are read (the status is all a delivery needs).
    try:
        reply = httpclient.request(url, method="POST", body=body, headers=headers, timeout=timeout,
                                   max_bytes=REPLY_BYTES, truncate=True)
    except httpclient.Redirected as exc:
        return Delivery("failed", http_status=exc.status, error=str(exc))
    except httpclient.HttpFailure as exc:
        return Delivery("failed", error=str(exc))
    if reply.status >= 400:
        return Delivery("failed", http_status=reply.status,
                        error=f"HTTP {reply.status} {reply.reason} from {httpclient.mask_url(url)}")
    return Delivery("delivered", http_status=reply.status)


def build_sink(name: str, config: SinkConfig) -> Sink:
    return {"log": LogSink, "webhook": WebhookSink, "alertmanager": AlertmanagerSink}[config.type](name, config)


@dataclass
class _Job:
    notification: Notification
    event_id: int | None
    notification_id: int | None = None
    """The store's alert_notifications row this job delivers (None: untracked)."""
    reported: bool = False
    """Its outcome went to `record` (by the worker, or by close() when it abandoned it)."""


class SinkWorker:
    """One sink's delivery thread and its bounded queue. `record(sink, notification, event_id,
    delivery, notification_id)` is called exactly once per submitted job with its outcome (from the
    worker thread, or the caller when dropped, or close() when abandoned); errors are masked."""

    def __init__(self, sink: Sink, record: Callable, maxsize: int = QUEUE_SIZE):
        self.sink = sink
        self._record = record
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._cancel = threading.Event()
        self._current: _Job | None = None
        self._jobs_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"tailmon-alerts-{sink.name}", daemon=True)
        self._started = False
        self._start_lock = threading.Lock()

    def submit(self, n: Notification, event_id: int | None = None, notification_id: int | None = None) -> bool:
        """Queue a notification; never blocks. False when the queue is full (recorded as dropped)."""
        with self._start_lock:
            if not self._started:
                self._thread.start()
                self._started = True
        job = _Job(n, event_id, notification_id)
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            full = f"the queue of sink {self.sink.name} is full ({self._queue.maxsize}): the receiver is too slow"
            self._report(job, Delivery("dropped", error=full))
            return False

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                with self._jobs_lock:
                    self._current = job
                if self._cancel.is_set():
                    delivery = Delivery("dropped", error="the daemon stopped before it was delivered")
                else:
                    try:
                        delivery = self.sink.deliver(job.notification, self._cancel)
                    except Exception as exc:  # a bug in a sink must not end its worker
                        log.error("sink %s: delivery crashed: %s: %s", self.sink.name, type(exc).__name__, exc,
                                  exc_info=True)
                        delivery = Delivery("failed", error=f"{type(exc).__name__}: {exc}")
                with self._jobs_lock:
                    self._current = None
                self._report(job, delivery)
            finally:
                self._queue.task_done()

    def _report(self, job: _Job, delivery: Delivery) -> None:
        with self._jobs_lock:  # once per job: close() may have recorded it as abandoned already
            if job.reported:
                return
            job.reported = True
        delivery.error = self.sink.mask(delivery.error)
        n = job.notification
        if delivery.outcome != "delivered":
            log.error("sink %s: %s notification of %s/%s %s after %d attempt(s): %s", self.sink.name, n.status,
                      n.monitor, n.rule, delivery.outcome, delivery.attempts, delivery.error)
        try:
            self._record(self.sink, n, job.event_id, delivery, job.notification_id)
        except Exception as exc:  # the store may be down: the log line above still says it
            log.error("sink %s: could not record a delivery: %s", self.sink.name, exc)

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    def close(self, deadline: float) -> None:
        """Deliver what is queued until `deadline` (time.time()), then drop the rest and stop.

        A delivery still in flight then (a receiver that does not answer) is recorded as
        'abandoned', and what is still queued behind it as 'dropped', before this returns: the
        process may end right after, and the alert service retries them from the store."""
        while not self.idle() and time.time() < deadline:
            time.sleep(0.02)
        self._cancel.set()  # from here on, queued jobs are recorded as dropped, backoffs end
        if not self._started:
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the worker drains the queue (dropping) and stays parked; it is a daemon thread
        self._thread.join(timeout=max(0.0, deadline - time.time()) + 1.0)
        if not self._thread.is_alive():
            return
        with self._jobs_lock:
            stuck = self._current
        if stuck is not None:
            self._report(stuck, Delivery("abandoned", error="the daemon stopped while this delivery was in flight "
                                                              "(no answer from the receiver yet)"))
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._report(job, Delivery("dropped", error="the daemon stopped before it was delivered"))
            self._queue.task_done()
        # The stop sentinel went with the rest: the worker ends once its delivery returns.
        self._queue.put_nowait(None)


__all__ = ["AlertmanagerSink", "Delivery", "LogSink", "Notification", "SIGNATURE_HEADER", "Sink", "SinkWorker",
           "WebhookSink", "build_sink", "retryable", "signature", "slack_message"]
