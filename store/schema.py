"""The schema the store's code reads and writes: its tables as SQLModel models, and their types.

The models describe the schema at the migrations' head revision. The revisions under
store/migrations create it with their own frozen table definitions, so that revision 0001 keeps
creating the first tables after a later revision alters them; tests/store/test_store_schema.py
checks that both agree.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, CheckConstraint, DateTime, Index, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

RUN_STATUSES = ("running", "succeeded", "failed", "interrupted")
FINAL_STATUSES = ("succeeded", "failed", "interrupted")
ALERT_STATES = ("inactive", "pending", "firing", "resolved")
DELIVERY_OUTCOMES = ("delivered", "failed", "dropped", "abandoned")
NOTIFICATION_STATES = ("pending", "delivered", "failed", "superseded")


def utcnow() -> datetime:
    """Now, timezone-aware UTC: the only kind of time the store takes."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both backends.

    PostgreSQL stores timestamptz and returns it in the session time zone; SQLite stores text
    without any zone. Both are normalised to UTC: naive UTC text on SQLite (so that comparisons
    on the text order correctly), aware UTC datetimes out of both.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self):
        super().__init__(timezone=True)

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware times only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def json_type() -> JSON:
    # none_as_null: a missing report or label set is SQL NULL, not the JSON text 'null'.
    return JSON(none_as_null=True)


# --- The tables ---------------------------------------------------------------------------------


class Run(SQLModel, table=True):
    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'succeeded', 'failed', 'interrupted')", name="ck_runs_status"),
        Index("ix_runs_monitor_started", "monitor", "started_at"),
        Index("ix_runs_status", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    monitor: str
    model_ref: str
    model_version: int
    config_hash: str
    status: str
    owner_instance: str
    owner_token: str
    started_at: datetime = Field(sa_type=UTCDateTime)
    heartbeat_at: datetime = Field(sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    duration_s: float | None = None
    error: str | None = Field(default=None, sa_type=Text)
    settings: dict | None = Field(default=None, sa_type=json_type())
    timings: dict | None = Field(default=None, sa_type=json_type())
    report: dict | None = Field(default=None, sa_type=json_type())
    """EstimationReport.to_dict(), prompts redacted."""
    method: str | None = None
    n_prompts: int | None = None
    n_samples: int | None = None
    n_harmful: int | None = None
    p_hat: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    std_error: float | None = None
    ess: float | None = None
    """The smallest per-prompt ESS: the aggregate is only as well sampled as its weakest prompt."""
    khat: float | None = None
    """The largest per-prompt k-hat, for the same reason."""
    reliable: bool | None = None
    volume: float | None = None
    window: str | None = None
    expected_per_window: float | None = None
    expected_ci_low: float | None = None
    expected_ci_high: float | None = None
    p_any_per_window: float | None = None
    p_any_ci_low: float | None = None
    p_any_ci_high: float | None = None
    worst_query_p: float | None = None


class EstimateRow(SQLModel, table=True):
    __tablename__ = "estimates"
    __table_args__ = (UniqueConstraint("run_id", "prompt_index", name="uq_estimates_run_prompt"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", ondelete="CASCADE")
    prompt_index: int
    prompt: str = Field(sa_type=Text)
    """Redacted."""
    category: str | None = None
    method: str | None = None
    n_samples: int | None = None
    p_hat: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_harmful: int | None = None
    ess: float | None = None
    ess_wh: float | None = None
    khat: float | None = None
    kl: float | None = None
    reliable: bool | None = None
    upper_bound_only: bool | None = None
    warnings: list | None = Field(default=None, sa_type=json_type())


class SampleRow(SQLModel, table=True):
    __tablename__ = "samples"
    __table_args__ = (
        # Judges score in [0, 1] (DESIGN section 4); anything else is a bug upstream.
        CheckConstraint("score >= 0 AND score <= 1", name="ck_samples_score"),
        Index("ix_samples_run", "run_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", ondelete="CASCADE")
    prompt_index: int
    response: str = Field(sa_type=Text)
    """Redacted."""
    score: float
    log_weight: float | None = None
    """None for Monte Carlo; -inf for a sample impossible under the target."""
    component: int | None = None
    """Index into the report's `components`: which mixture component drew the sample."""


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("monitor", "version", name="uq_model_versions_monitor_version"),)

    id: int | None = Field(default=None, primary_key=True)
    monitor: str
    version: int
    model_ref: str
    fingerprint: str
    first_seen: datetime = Field(sa_type=UTCDateTime)
    last_seen: datetime = Field(sa_type=UTCDateTime)


class MonitorLock(SQLModel, table=True):
    __tablename__ = "monitor_locks"

    monitor: str = Field(primary_key=True)
    owner_instance: str
    owner_token: str
    acquired_at: datetime = Field(sa_type=UTCDateTime)
    heartbeat_at: datetime = Field(sa_type=UTCDateTime)


class AlertEvent(SQLModel, table=True):
    __tablename__ = "alert_events"
    __table_args__ = (Index("ix_alert_events_monitor_at", "monitor", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    monitor: str
    rule: str
    state: str
    severity: str | None = None
    value: float | None = None
    threshold: float | None = None
    message: str | None = Field(default=None, sa_type=Text)
    labels: dict | None = Field(default=None, sa_type=json_type())
    at: datetime = Field(sa_type=UTCDateTime)
    # No foreign key: alert history is kept when old runs are pruned.
    run_id: int | None = None


class AlertState(SQLModel, table=True):
    __tablename__ = "alert_state"
    __table_args__ = (
        CheckConstraint("state IN ('inactive', 'pending', 'firing', 'resolved')", name="ck_alert_state_state"),
    )

    monitor: str = Field(primary_key=True)
    rule: str = Field(primary_key=True)
    state: str
    consecutive: int = 0
    since: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_notified: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_value: float | None = None
    labels: dict | None = Field(default=None, sa_type=json_type())


class AlertDelivery(SQLModel, table=True):
    """One attempt to deliver a notification to one sink: what the receiver answered, after how many
    HTTP tries. 'abandoned': the process stopped while the attempt was in flight."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        CheckConstraint("outcome IN ('delivered', 'failed', 'dropped', 'abandoned')",
                        name="ck_alert_deliveries_outcome"),
        Index("ix_alert_deliveries_monitor_at", "monitor", "at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    monitor: str
    rule: str
    sink: str
    status: str
    """The notification: 'firing' or 'resolved'."""
    repeat: bool = False
    outcome: str
    attempts: int = 0
    http_status: int | None = None
    error: str | None = Field(default=None, sa_type=Text)
    # No foreign key, like alert_events.run_id: a repeat notification has no event of its own.
    event_id: int | None = None
    at: datetime = Field(sa_type=UTCDateTime)
    notification_id: int | None = None
    """The alert_notifications row this attempt delivers (None: an Alertmanager keep-alive)."""


class AlertNotification(SQLModel, table=True):
    """One notification to one sink, until that sink takes it (revision 0004).

    'pending' until the sink answers 2xx ('delivered'); a failed attempt is retried from
    `next_attempt_at` on (the daemon's tick, with backoff), which is also a lease while an attempt
    is in flight. 'failed': given up (a 4xx that retrying cannot fix, or too old); 'superseded':
    a newer notification of the same rule to the same sink replaced it before it was delivered.
    """

    __tablename__ = "alert_notifications"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'failed', 'superseded')",
                        name="ck_alert_notifications_state"),
        Index("ix_alert_notifications_state_next", "state", "next_attempt_at"),
        Index("ix_alert_notifications_monitor_rule", "monitor", "rule", "sink"),
    )

    id: int | None = Field(default=None, primary_key=True)
    monitor: str
    rule: str
    sink: str
    status: str
    repeat: bool = False
    event_id: int | None = None
    payload: dict = Field(sa_type=json_type())
    """The notification (Notification.to_json()), to send it again."""
    state: str
    attempts: int = 0
    created_at: datetime = Field(sa_type=UTCDateTime)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


RUNS = Run.__table__
ESTIMATES = EstimateRow.__table__
SAMPLES = SampleRow.__table__
MODEL_VERSIONS = ModelVersion.__table__
LOCKS = MonitorLock.__table__
ALERT_EVENTS = AlertEvent.__table__
ALERT_STATE = AlertState.__table__
ALERT_DELIVERIES = AlertDelivery.__table__
ALERT_NOTIFICATIONS = AlertNotification.__table__
