"""The run store: every estimation run, its per-prompt estimates, optional samples, and alerts.

One `Store` per daemon process, on SQLite (the default, a file under the state directory) or
PostgreSQL (shared by several daemon instances). The guarantees the daemon relies on:

* A run is inserted as `running` before any model work and closed (`succeeded`, `failed` or
  `interrupted`) together with its figures, estimates and samples in ONE transaction, so a crash
  leaves a `running` row with no results, never results that look complete.
* Several instances may share one PostgreSQL database. A per-monitor lock (`try_lock`) keeps one
  monitor from running twice at once across instances. Runs and locks record their owner
  (instance id and a random per-process token) and a heartbeat; `interrupt_stale_runs` only
  touches runs whose heartbeat is stale or whose owner is a previous incarnation of this very
  instance, so a starting instance never interrupts a live peer's run.
* The schema is versioned: `schema_version` records every applied migration, `MIGRATIONS` is the
  ordered list, an upgrade keeps the data, and a database newer than this code is refused.
* Prompt and response texts go through `redact()` before they are stored.

Times are timezone-aware UTC `datetime`s in and out on both backends. Dicts returned by the
query methods hold plain values and these datetimes; `to_jsonable()` turns them into ISO 8601
strings for JSON output. Every database failure surfaces as
`RuntimeFailure("database <url with password masked>: <what>: <reason>")`.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from tailmon.errors import InputError, RuntimeFailure
from tailmon.redact import redact
from tailmon.paths import state_dir

SCHEMA_VERSION = 3
"""The schema this code reads and writes: the last entry of MIGRATIONS."""

RUN_STATUSES = ("running", "succeeded", "failed", "interrupted")
FINAL_STATUSES = ("succeeded", "failed", "interrupted")
ALERT_STATES = ("inactive", "pending", "firing", "resolved")
DELIVERY_OUTCOMES = ("delivered", "failed", "dropped")

DATABASE_URL_ENV = "TAILMON_DATABASE_URL"

# Every key of pg_advisory_xact_lock is global to the database: this one serialises schema
# upgrades when several instances start at once on an empty database.
_MIGRATION_LOCK_KEY = 0x7461696C6D6F6E  # "tailmon"


# --- URLs ---------------------------------------------------------------------------------------


def default_database_url() -> str:
    """SQLite file `tailmon.db` in the state directory (TAILMON_STATE_DIR or the user state dir)."""
    # Absolute, so the URL means the same file whatever the daemon's working directory later is.
    return f"sqlite:///{(state_dir() / 'tailmon.db').absolute()}"


def resolve_database_url(configured: str | None) -> str:
    """The configured URL, else TAILMON_DATABASE_URL, else `default_database_url()`."""
    if configured and configured.strip():
        return configured.strip()
    env = os.environ.get(DATABASE_URL_ENV, "").strip()
    return env or default_database_url()


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")


def safe_url(url: str) -> str:
    """`url` with its password (userinfo or `?password=` query) replaced by ***."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # Unparseable URLs still reach error messages: mask anything that looks like user:pass@.
        return _PASSWORD_IN_URL.sub(r"\1***@", url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def _engine_url(url: str) -> URL:
    """Parse and check `url`; PostgreSQL URLs without a driver get psycopg 3, the one we ship."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise InputError(f"database URL '{safe_url(url)}' is not valid: {e}") from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        # Plain postgresql:// would make SQLAlchemy load psycopg2, which tailmon does not depend on.
        if "+" not in parsed.drivername:
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif backend == "postgres":
            parsed = parsed.set(drivername="postgresql+" + parsed.drivername.split("+", 1)[1])
        return parsed
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:" or parsed.query.get("mode") == "memory":
            raise InputError(f"database URL '{safe_url(url)}': in-memory SQLite would lose every run; "
                             "give a file, e.g. sqlite:////var/lib/tailmon/tailmon.db")
        return parsed
    raise InputError(f"database URL '{safe_url(url)}': unsupported database '{backend}' "
                     "(use sqlite:///PATH or postgresql://USER@HOST/DB)")


def _json_default(value: Any) -> Any:
    # numpy scalars (.item()), datetimes and paths turn up in settings; anything else is a bug.
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")


def _finite_only(value: Any) -> Any:
    """nan/inf become None: PostgreSQL's json type rejects them, and they mean 'no figure' here."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_finite_only(value), default=_json_default, allow_nan=False)


def make_engine(url: str) -> Engine:
    """An SQLAlchemy engine for `url`, set up for the store (used by `Store.open` and by tests).

    Bad URLs raise InputError; a SQLite directory that cannot be created raises RuntimeFailure.
    """
    parsed = _engine_url(url)
    if parsed.get_backend_name() == "postgresql":
        try:
            # pre_ping: the daemon keeps connections for days, across PostgreSQL restarts.
            return create_engine(parsed, json_serializer=_dumps, pool_pre_ping=True,
                                 connect_args={"connect_timeout": 10})
        except (ImportError, NoSuchModuleError) as e:
            raise RuntimeFailure(f"database {safe_url(url)}: no PostgreSQL driver ({e}); "
                                 "install tailmon[postgres]") from None

    path = Path(parsed.database).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeFailure(f"database {safe_url(url)}: cannot create directory {path.parent}: "
                             f"{e.strerror or e}") from None
    # timeout: the heartbeat thread and the run thread write concurrently; a writer waits up to
    # 30 s for the other instead of failing with "database is locked".
    engine = create_engine(parsed, json_serializer=_dumps, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Take transaction control away from the sqlite3 module (it would not BEGIN before
        # SELECTs or DDL, which breaks transactional migrations and SAVEPOINTs) ...
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # WAL: readers never block the writer, so the CLI can list runs while the daemon writes.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # ... and begin every transaction IMMEDIATE: it takes the write lock up front (waiting
        # out the busy timeout), so a read-then-write transaction never fails half-way with
        # SQLITE_BUSY because another connection wrote in between.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


# --- Types --------------------------------------------------------------------------------------


def _pid_alive(token: str) -> bool:
    """Whether the process that wrote `token` ("<pid>-<random>") still runs on this host."""
    pid = token.split("-", 1)[0]
    if not pid.isdigit():
        return False  # a token from before pids were recorded: its process is long gone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def utcnow() -> datetime:
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


def _json_type():
    # none_as_null: a missing report or label set is SQL NULL, not the JSON text 'null'.
    return JSON(none_as_null=True)


# --- The current schema (what the code reads and writes) ----------------------------------------
#
# These models describe the schema as of SCHEMA_VERSION. The migrations below create it with
# their own frozen table definitions, so that migration 1 keeps creating the version-1 tables
# after a later migration alters them; test_store_schema checks that both agree.


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
    settings: dict | None = Field(default=None, sa_type=_json_type())
    timings: dict | None = Field(default=None, sa_type=_json_type())
    report: dict | None = Field(default=None, sa_type=_json_type())
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
    warnings: list | None = Field(default=None, sa_type=_json_type())


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
    labels: dict | None = Field(default=None, sa_type=_json_type())
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
    labels: dict | None = Field(default=None, sa_type=_json_type())


class AlertDelivery(SQLModel, table=True):
    """One notification's delivery to one sink: what the receiver answered, after how many tries."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        CheckConstraint("outcome IN ('delivered', 'failed', 'dropped')", name="ck_alert_deliveries_outcome"),
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


RUNS = Run.__table__
ESTIMATES = EstimateRow.__table__
SAMPLES = SampleRow.__table__
MODEL_VERSIONS = ModelVersion.__table__
LOCKS = MonitorLock.__table__
ALERT_EVENTS = AlertEvent.__table__
ALERT_STATE = AlertState.__table__
ALERT_DELIVERIES = AlertDelivery.__table__

# Bookkeeping of the migrations themselves; it never changes, so it lives outside them.
SCHEMA_TABLE = Table(
    "schema_version", MetaData(),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String, nullable=False),
    Column("applied_at", UTCDateTime(), nullable=False),
)


# --- Migrations ---------------------------------------------------------------------------------
#
# Append-only: never edit a migration that has shipped; add the next one. Each creates its tables
# from a frozen copy of their definition at that version (not from the models above).


def _migration_1(conn: Connection) -> None:
    md = MetaData()
    Table(
        "runs", md,
        Column("id", Integer, primary_key=True),
        Column("monitor", String, nullable=False),
        Column("model_ref", String, nullable=False),
        Column("model_version", Integer, nullable=False),
        Column("config_hash", String, nullable=False),
        Column("status", String, nullable=False),
        Column("owner_instance", String, nullable=False),
        Column("owner_token", String, nullable=False),
        Column("started_at", UTCDateTime(), nullable=False),
        Column("heartbeat_at", UTCDateTime(), nullable=False),
        Column("finished_at", UTCDateTime()),
        Column("duration_s", Float),
        Column("error", Text),
        Column("settings", _json_type()),
        Column("timings", _json_type()),
        Column("report", _json_type()),
        Column("method", String),
        Column("n_prompts", Integer),
        Column("n_samples", Integer),
        Column("n_harmful", Integer),
        *(Column(name, Float) for name in ("p_hat", "ci_low", "ci_high", "std_error", "ess", "khat")),
        Column("reliable", Boolean),
        Column("volume", Float),
        Column("window", String),
        *(Column(name, Float) for name in ("expected_per_window", "expected_ci_low", "expected_ci_high",
                                           "p_any_per_window", "p_any_ci_low", "p_any_ci_high",
                                           "worst_query_p")),
        CheckConstraint("status IN ('running', 'succeeded', 'failed', 'interrupted')", name="ck_runs_status"),
        Index("ix_runs_monitor_started", "monitor", "started_at"),
        Index("ix_runs_status", "status"),
    )
    Table(
        "estimates", md,
        Column("id", Integer, primary_key=True),
        Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        Column("prompt_index", Integer, nullable=False),
        Column("prompt", Text, nullable=False),
        Column("category", String),
        Column("method", String),
        Column("n_samples", Integer),
        *(Column(name, Float) for name in ("p_hat", "ci_low", "ci_high")),
        Column("n_harmful", Integer),
        *(Column(name, Float) for name in ("ess", "ess_wh", "khat", "kl")),
        Column("reliable", Boolean),
        Column("upper_bound_only", Boolean),
        Column("warnings", _json_type()),
        UniqueConstraint("run_id", "prompt_index", name="uq_estimates_run_prompt"),
    )
    Table(
        "samples", md,
        Column("id", Integer, primary_key=True),
        Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        Column("prompt_index", Integer, nullable=False),
        Column("response", Text, nullable=False),
        Column("score", Float, nullable=False),
        Column("log_weight", Float),
        Column("component", Integer),
        CheckConstraint("score >= 0 AND score <= 1", name="ck_samples_score"),
        Index("ix_samples_run", "run_id"),
    )
    Table(
        "model_versions", md,
        Column("id", Integer, primary_key=True),
        Column("monitor", String, nullable=False),
        Column("version", Integer, nullable=False),
        Column("model_ref", String, nullable=False),
        Column("fingerprint", String, nullable=False),
        Column("first_seen", UTCDateTime(), nullable=False),
        Column("last_seen", UTCDateTime(), nullable=False),
        UniqueConstraint("monitor", "version", name="uq_model_versions_monitor_version"),
    )
    Table(
        "monitor_locks", md,
        Column("monitor", String, primary_key=True),
        Column("owner_instance", String, nullable=False),
        Column("owner_token", String, nullable=False),
        Column("acquired_at", UTCDateTime(), nullable=False),
        Column("heartbeat_at", UTCDateTime(), nullable=False),
    )
    # checkfirst=False: a database that already has a `runs` table of some other program must
    # fail loudly, not be adopted.
    md.create_all(conn, checkfirst=False)


def _migration_2(conn: Connection) -> None:
    md = MetaData()
    Table(
        "alert_events", md,
        Column("id", Integer, primary_key=True),
        Column("monitor", String, nullable=False),
        Column("rule", String, nullable=False),
        Column("state", String, nullable=False),
        Column("severity", String),
        Column("value", Float),
        Column("threshold", Float),
        Column("message", Text),
        Column("labels", _json_type()),
        Column("at", UTCDateTime(), nullable=False),
        Column("run_id", Integer),
        Index("ix_alert_events_monitor_at", "monitor", "at"),
    )
    Table(
        "alert_state", md,
        Column("monitor", String, primary_key=True),
        Column("rule", String, primary_key=True),
        Column("state", String, nullable=False),
        Column("consecutive", Integer, nullable=False),
        Column("since", UTCDateTime()),
        Column("last_notified", UTCDateTime()),
        Column("last_value", Float),
        Column("labels", _json_type()),
        CheckConstraint("state IN ('inactive', 'pending', 'firing', 'resolved')", name="ck_alert_state_state"),
    )
    md.create_all(conn, checkfirst=False)


def _migration_3(conn: Connection) -> None:
    md = MetaData()
    Table(
        "alert_deliveries", md,
        Column("id", Integer, primary_key=True),
        Column("monitor", String, nullable=False),
        Column("rule", String, nullable=False),
        Column("sink", String, nullable=False),
        Column("status", String, nullable=False),
        Column("repeat", Boolean, nullable=False),
        Column("outcome", String, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("http_status", Integer),
        Column("error", Text),
        Column("event_id", Integer),
        Column("at", UTCDateTime(), nullable=False),
        CheckConstraint("outcome IN ('delivered', 'failed', 'dropped')", name="ck_alert_deliveries_outcome"),
        Index("ix_alert_deliveries_monitor_at", "monitor", "at"),
    )
    md.create_all(conn, checkfirst=False)


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "runs, estimates, samples, model_versions, monitor_locks", _migration_1),
    (2, "alert_events, alert_state", _migration_2),
    (3, "alert_deliveries", _migration_3),
]
assert [v for v, _, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def upgrade_schema(engine: Engine, target: int = SCHEMA_VERSION, *, display_url: str | None = None) -> int:
    """Apply the migrations up to `target` that the database lacks; return its version after.

    All pending migrations run in one transaction (both backends have transactional DDL), so a
    failed upgrade leaves the database as it was. A database newer than SCHEMA_VERSION is
    refused before anything is touched: this code would misread it. `display_url` names the
    database in errors (default: the engine's URL, password masked).
    """
    where = f"database {display_url or engine.url.render_as_string(hide_password=True)}"
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two instances starting together on an empty database must not both create tables.
            conn.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
        SCHEMA_TABLE.create(conn, checkfirst=True)
        current = conn.execute(select(func.max(SCHEMA_TABLE.c.version))).scalar() or 0
        if current > SCHEMA_VERSION:
            raise RuntimeFailure(f"{where}: schema version {current} is newer than this tailmon supports "
                                 f"({SCHEMA_VERSION}); upgrade tailmon")
        for version, description, migrate in MIGRATIONS:
            if current < version <= target:
                try:
                    migrate(conn)
                except DBAPIError as e:
                    raise RuntimeFailure(f"{where}: migration {version} ({description}) failed: "
                                         f"{_reason(e)}") from e
                conn.execute(insert(SCHEMA_TABLE).values(version=version, description=description,
                                                         applied_at=utcnow()))
                current = version
        return current


def _reason(error: DBAPIError) -> str:
    """The driver's message, first line only: errors are reported as one line."""
    text = str(error.orig if error.orig is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- Row conversion -----------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """A query result with datetimes as ISO 8601 strings, ready for json.dumps."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _float(value: Any, what: str, *, keep_inf: bool = False) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(x) or (math.isinf(x) and not keep_inf):
        return None
    return x


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        x = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be an integer, got {value!r}") from None
    if x != value:
        raise InputError(f"{what} must be an integer, got {value!r}")
    return x


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _aware(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InputError(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value


def _redacted_report(report: dict) -> dict:
    """The report to store: per-prompt texts and the system prompt through redact()."""
    out = dict(report)
    out["estimates"] = [{**e, "prompt": redact(e["prompt"])} for e in report["estimates"]]
    if isinstance(report.get("system_prompt"), str):
        out["system_prompt"] = redact(report["system_prompt"])
    return out


def _report_rows(run_id: int, report: dict) -> tuple[dict, list[dict]]:
    """Run columns from `report` (EstimationReport.to_dict()) and one estimates row per prompt."""
    if not isinstance(report, dict) or not isinstance(report.get("estimates"), list) \
            or not isinstance(report.get("aggregate"), dict):
        raise InputError("report must be EstimationReport.to_dict(): a dict with 'estimates' and 'aggregate'")
    ests = report["estimates"]
    rows = []
    for i, e in enumerate(ests):
        if not isinstance(e, dict) or not isinstance(e.get("prompt"), str):
            raise InputError(f"report estimate {i} must be a dict with a 'prompt' string")
        rows.append({
            "run_id": run_id, "prompt_index": i, "prompt": redact(e["prompt"]),
            "category": e.get("category"), "method": e.get("method"),
            "n_samples": _int(e.get("n_samples"), f"estimate {i} n_samples"),
            "n_harmful": _int(e.get("n_harmful"), f"estimate {i} n_harmful"),
            **{k: _float(e.get(k), f"estimate {i} {k}") for k in ("p_hat", "ci_low", "ci_high", "ess",
                                                                   "ess_wh", "khat", "kl")},
            "reliable": _bool(e.get("reliable")), "upper_bound_only": _bool(e.get("upper_bound_only")),
            "warnings": list(e.get("warnings") or []),
        })

    agg = report["aggregate"]
    ess = [r["ess"] for r in rows if r["ess"] is not None]
    khat = [r["khat"] for r in rows if r["khat"] is not None]
    epw = agg.get("expected_per_window") or {}
    pany = agg.get("p_any_per_window") or {}
    worst = agg.get("worst_query") or {}
    columns = {
        "report": _redacted_report(report),
        "method": report.get("method"),
        "n_prompts": _int(agg.get("n_prompts", len(rows)), "aggregate n_prompts"),
        "n_samples": _int(agg.get("n_samples"), "aggregate n_samples"),
        "n_harmful": _int(agg.get("n_harmful"), "aggregate n_harmful"),
        **{k: _float(agg.get(k), f"aggregate {k}") for k in ("p_hat", "ci_low", "ci_high", "std_error")},
        # The aggregate has no ESS or k-hat of its own (yet): take the worst prompt's.
        "ess": _float(agg["ess"], "aggregate ess") if "ess" in agg else (min(ess) if ess else None),
        "khat": _float(agg["khat"], "aggregate khat") if "khat" in agg else (max(khat) if khat else None),
        "reliable": _bool(agg.get("reliable")),
        "volume": _float(agg.get("volume"), "aggregate volume"),
        "window": agg.get("window"),
        "expected_per_window": _float(epw.get("expected"), "expected_per_window"),
        "expected_ci_low": _float(epw.get("ci_low"), "expected_per_window ci_low"),
        "expected_ci_high": _float(epw.get("ci_high"), "expected_per_window ci_high"),
        "p_any_per_window": _float(pany.get("p"), "p_any_per_window"),
        "p_any_ci_low": _float(pany.get("ci_low"), "p_any_per_window ci_low"),
        "p_any_ci_high": _float(pany.get("ci_high"), "p_any_per_window ci_high"),
        "worst_query_p": _float(worst.get("p"), "worst_query p"),
    }
    return columns, rows


SAMPLE_KEYS = ("prompt_index", "response", "score", "log_weight", "component")


def _sample_rows(run_id: int, samples: list[dict]) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise InputError(f"sample {i} must be a dict with keys {', '.join(SAMPLE_KEYS)}")
        unknown = set(s) - set(SAMPLE_KEYS)
        if unknown:
            raise InputError(f"sample {i} has unknown keys {sorted(unknown)}; expected {', '.join(SAMPLE_KEYS)}")
        if s.get("prompt_index") is None or not isinstance(s.get("response"), str) or s.get("score") is None:
            raise InputError(f"sample {i} needs prompt_index, response (a string) and score")
        rows.append({
            "run_id": run_id,
            "prompt_index": _int(s["prompt_index"], f"sample {i} prompt_index"),
            "response": redact(s["response"]),
            # Range checks are the database's (ck_samples_score, NOT NULL): an out-of-range or nan
            # score fails the whole close, as any other bad row would.
            "score": _float(s["score"], f"sample {i} score", keep_inf=True),
            "log_weight": _float(s.get("log_weight"), f"sample {i} log_weight", keep_inf=True),
            "component": _int(s.get("component"), f"sample {i} component"),
        })
    return rows


# --- The store ----------------------------------------------------------------------------------


class Store:
    """The run store on one database. Thread-safe: every method runs its own transaction."""

    def __init__(self, url: str, *, instance_id: str | None = None, stale_after_s: float = 300.0):
        if not (isinstance(stale_after_s, (int, float)) and stale_after_s > 0):
            raise InputError(f"stale_after_s must be > 0, got {stale_after_s!r}")
        self.url = url
        self.safe_url = safe_url(url)
        self.instance_id = instance_id or socket.gethostname()
        # A fresh token per Store object, "<pid>-<random>": tells this process's runs from those
        # of another process with the same instance id. That process is certainly dead when its
        # pid is gone from this host (killed and restarted); a live one (a `tailmon run --once`
        # beside the daemon) keeps its runs and locks.
        self.token = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.stale_after_s = float(stale_after_s)
        self.stale_after = timedelta(seconds=self.stale_after_s)
        self._engine: Engine | None = None

    # -- lifecycle

    def open(self) -> "Store":
        """Connect and create or upgrade the schema. Idempotent."""
        if self._engine is not None:
            return self
        engine = make_engine(self.url)
        try:
            upgrade_schema(engine, display_url=self.safe_url)
        except RuntimeFailure:
            engine.dispose()
            raise
        except DBAPIError as e:
            engine.dispose()
            raise RuntimeFailure(f"database {self.safe_url}: {self._mask(_reason(e))}") from e
        self._engine = engine
        return self

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> "Store":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeFailure(f"database {self.safe_url}: the store is not open")
        return self._engine

    def _mask(self, text: str) -> str:
        """`text` without this URL's password: a driver message might quote it."""
        try:
            password = make_url(self.url).password
        except (ArgumentError, ValueError):
            return text
        return text.replace(str(password), "***") if password else text

    @contextmanager
    def _tx(self, what: str) -> Iterator[Connection]:
        """One transaction; database errors become RuntimeFailure naming the database."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except DBAPIError as e:
            raise RuntimeFailure(f"database {self.safe_url}: {what}: {self._mask(_reason(e))}") from e

    def _now(self, conn: Connection) -> datetime:
        # On PostgreSQL the server's clock is the one clock every instance shares: heartbeats
        # written by one host and judged stale by another never depend on their clock skew.
        if conn.dialect.name == "postgresql":
            return conn.execute(select(func.now())).scalar_one().astimezone(timezone.utc)
        return utcnow()

    def _owned_by_me(self, table: Table):
        return (table.c.owner_instance == self.instance_id) & (table.c.owner_token == self.token)

    def _previous_incarnation(self, conn: Connection, table: Table):
        """Rows owned by a dead process of this instance id (same host, pid no longer running)."""
        tokens = conn.execute(select(table.c.owner_token).distinct().where(
            table.c.owner_instance == self.instance_id, table.c.owner_token != self.token)).scalars().all()
        dead = [t for t in tokens if not _pid_alive(t)]
        return (table.c.owner_instance == self.instance_id) & table.c.owner_token.in_(dead)

    # -- model versions

    def model_version(self, monitor: str, model_ref: str, fingerprint: str) -> int:
        """The monitor's model version: 1 at first, +1 whenever the fingerprint differs from the last."""
        t = MODEL_VERSIONS
        with self._tx(f"model version of monitor '{monitor}'") as conn:
            conflicts = 0
            while True:
                now = self._now(conn)
                last = conn.execute(select(t.c.id, t.c.version, t.c.fingerprint).where(t.c.monitor == monitor)
                                    .order_by(t.c.version.desc()).limit(1)).first()
                if last is not None and last.fingerprint == fingerprint:
                    conn.execute(update(t).where(t.c.id == last.id).values(last_seen=now, model_ref=model_ref))
                    return last.version
                version = 1 if last is None else last.version + 1
                try:
                    # A peer may register the same change concurrently (PostgreSQL): the unique
                    # (monitor, version) pair makes one of us retry and read the other's row.
                    with conn.begin_nested():
                        conn.execute(insert(t).values(monitor=monitor, version=version, model_ref=model_ref,
                                                      fingerprint=fingerprint, first_seen=now, last_seen=now))
                    return version
                except IntegrityError:
                    conflicts += 1
                    if conflicts == 3:  # not a race after all: report it
                        raise

    # -- runs

    def start_run(self, monitor: str, *, model_ref: str, model_version: int, config_hash: str,
                  settings: dict) -> int:
        """Insert a `running` run owned by this store; returns its id."""
        with self._tx(f"starting a run of monitor '{monitor}'") as conn:
            now = self._now(conn)
            result = conn.execute(insert(RUNS).values(
                monitor=monitor, model_ref=model_ref, model_version=int(model_version), config_hash=config_hash,
                status="running", owner_instance=self.instance_id, owner_token=self.token,
                started_at=now, heartbeat_at=now, settings=settings))
            return result.inserted_primary_key[0]

    def heartbeat(self, run_id: int) -> bool:
        """Mark the run alive. False (not an error) when it is no longer running: a heartbeat
        thread may tick just after finish_run, and a takeover surfaces in finish_run anyway."""
        with self._tx(f"heartbeat of run {run_id}") as conn:
            now = self._now(conn)
            result = conn.execute(update(RUNS).where(RUNS.c.id == run_id, RUNS.c.status == "running")
                                  .values(heartbeat_at=now))
            return result.rowcount == 1

    def finish_run(self, run_id: int, status: str, *, report: dict | None = None, error: str | None = None,
                   timings: dict | None = None, samples: list[dict] | None = None) -> None:
        """Close a running run with its results, all in one transaction.

        Refuses (RuntimeFailure) a run that does not exist or is no longer `running`; if
        anything fails, nothing is written and the run stays `running`.
        """
        if status not in FINAL_STATUSES:
            raise InputError(f"a run finishes as one of {', '.join(FINAL_STATUSES)}, not '{status}'")
        if status == "succeeded" and report is None:
            raise InputError(f"run {run_id}: a succeeded run needs its report")
        # Everything is converted (and validated) before the transaction opens.
        columns, estimate_rows = _report_rows(run_id, report) if report is not None else ({}, [])
        sample_rows = _sample_rows(run_id, samples) if samples else []

        with self._tx(f"closing run {run_id}") as conn:
            # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises): a peer's
            # interrupt_stale_runs cannot close the run between this check and our update.
            row = conn.execute(select(RUNS.c.status, RUNS.c.started_at).where(RUNS.c.id == run_id)
                               .with_for_update()).first()
            if row is None:
                raise RuntimeFailure(f"database {self.safe_url}: run {run_id} does not exist")
            if row.status != "running":
                raise RuntimeFailure(f"database {self.safe_url}: run {run_id} is already '{row.status}'; "
                                     f"refusing to close it again as '{status}'")
            now = self._now(conn)
            conn.execute(update(RUNS).where(RUNS.c.id == run_id, RUNS.c.status == "running").values(
                status=status, finished_at=now, heartbeat_at=now,
                duration_s=(now - row.started_at).total_seconds(),
                error=redact(error) if error is not None else None, timings=timings, **columns))
            if estimate_rows:
                conn.execute(insert(ESTIMATES), estimate_rows)
            if sample_rows:
                conn.execute(insert(SAMPLES), sample_rows)

    def interrupt_stale_runs(self) -> list[int]:
        """Mark dead runs `interrupted`; returns their ids.

        Dead means: heartbeat older than stale_after_s (any owner), or owned by a previous
        incarnation of this instance id (same name, another process token). A live peer's runs
        have fresh heartbeats and another instance id, so they are never touched.
        """
        with self._tx("interrupting stale runs") as conn:
            now = self._now(conn)
            running = RUNS.c.status == "running"
            previous = conn.execute(
                update(RUNS).where(running, self._previous_incarnation(conn, RUNS))
                .values(status="interrupted", finished_at=now,
                        error=f"interrupted: instance '{self.instance_id}' was restarted while this run was "
                              "in progress")
                .returning(RUNS.c.id)).scalars().all()
            stale = conn.execute(
                update(RUNS).where(running, RUNS.c.heartbeat_at < now - self.stale_after)
                .values(status="interrupted", finished_at=now,
                        error=f"interrupted: no heartbeat for over {self.stale_after_s:g} s (its daemon died or hung)")
                .returning(RUNS.c.id)).scalars().all()
            return sorted(previous + stale)

    # -- per-monitor locks

    def try_lock(self, monitor: str) -> bool:
        """Take the monitor's lock if it is free, stale, or held by a previous incarnation of
        this instance. Not re-entrant: False while this store itself holds it."""
        with self._tx(f"locking monitor '{monitor}'") as conn:
            now = self._now(conn)
            mine = dict(owner_instance=self.instance_id, owner_token=self.token, acquired_at=now, heartbeat_at=now)
            # The conditional UPDATE is atomic: on PostgreSQL a concurrent taker blocks on the row
            # and then re-checks the condition against the winner's fresh heartbeat.
            taken = conn.execute(update(LOCKS).where(
                LOCKS.c.monitor == monitor,
                (LOCKS.c.heartbeat_at < now - self.stale_after) | self._previous_incarnation(conn, LOCKS),
            ).values(**mine))
            if taken.rowcount == 1:
                return True
            try:
                # No row, or a live holder: the primary key makes exactly one inserter win.
                with conn.begin_nested():
                    conn.execute(insert(LOCKS).values(monitor=monitor, **mine))
                return True
            except IntegrityError:
                return False

    def refresh_lock(self, monitor: str) -> bool:
        """Renew the lock's heartbeat. False when this store does not hold it (any more): the
        caller has lost the lock to a takeover and should stop working on the monitor."""
        with self._tx(f"refreshing the lock of monitor '{monitor}'") as conn:
            now = self._now(conn)
            result = conn.execute(update(LOCKS).where(LOCKS.c.monitor == monitor, self._owned_by_me(LOCKS))
                                  .values(heartbeat_at=now))
            return result.rowcount == 1

    def release_lock(self, monitor: str) -> None:
        """Release the lock if this store holds it; a lock taken over by a peer stays the peer's."""
        with self._tx(f"releasing the lock of monitor '{monitor}'") as conn:
            conn.execute(delete(LOCKS).where(LOCKS.c.monitor == monitor, self._owned_by_me(LOCKS)))

    def lock_holder(self, monitor: str) -> dict | None:
        """The lock's row (owner_instance, owner_token, acquired_at, heartbeat_at), or None."""
        with self._tx(f"reading the lock of monitor '{monitor}'") as conn:
            row = conn.execute(select(LOCKS).where(LOCKS.c.monitor == monitor)).first()
            return dict(row._mapping) if row else None

    # -- queries

    _LIST_COLUMNS = [c for c in RUNS.c if c.name != "report"]

    def list_runs(self, monitor: str | None = None, status: str | None = None, limit: int = 20) -> list[dict]:
        """Newest first; every run column except the (large) `report`."""
        if status is not None and status not in RUN_STATUSES:
            raise InputError(f"status must be one of {', '.join(RUN_STATUSES)}, got '{status}'")
        if int(limit) < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        query = select(*self._LIST_COLUMNS).order_by(RUNS.c.started_at.desc(), RUNS.c.id.desc()).limit(int(limit))
        if monitor is not None:
            query = query.where(RUNS.c.monitor == monitor)
        if status is not None:
            query = query.where(RUNS.c.status == status)
        with self._tx("listing runs") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def get_run(self, run_id: int) -> dict | None:
        """Every run column (with `report`) plus `estimates`, one dict per prompt in order."""
        with self._tx(f"reading run {run_id}") as conn:
            return self._full_run(conn, RUNS.c.id == run_id)

    def last_run(self, monitor: str, status: str | None = "succeeded") -> dict | None:
        """The monitor's newest run with `status` (any status if None), as get_run returns it."""
        if status is not None and status not in RUN_STATUSES:
            raise InputError(f"status must be one of {', '.join(RUN_STATUSES)}, got '{status}'")
        with self._tx(f"reading the last run of monitor '{monitor}'") as conn:
            query = select(RUNS.c.id).where(RUNS.c.monitor == monitor)
            if status is not None:
                query = query.where(RUNS.c.status == status)
            run_id = conn.execute(query.order_by(RUNS.c.started_at.desc(), RUNS.c.id.desc()).limit(1)).scalar()
            return None if run_id is None else self._full_run(conn, RUNS.c.id == run_id)

    def _full_run(self, conn: Connection, where) -> dict | None:
        row = conn.execute(select(RUNS).where(where)).first()
        if row is None:
            return None
        run = dict(row._mapping)
        ests = conn.execute(select(ESTIMATES).where(ESTIMATES.c.run_id == run["id"])
                            .order_by(ESTIMATES.c.prompt_index))
        run["estimates"] = [{k: v for k, v in e._mapping.items() if k not in ("id", "run_id")} for e in ests]
        return run

    def get_samples(self, run_id: int) -> list[dict]:
        """The run's stored samples (prompt_index, response, score, log_weight, component), in order."""
        with self._tx(f"reading the samples of run {run_id}") as conn:
            rows = conn.execute(select(*(SAMPLES.c[k] for k in SAMPLE_KEYS)).where(SAMPLES.c.run_id == run_id)
                                .order_by(SAMPLES.c.id))
            return [dict(r._mapping) for r in rows]

    # -- alerts

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
        values = dict(fields, value=_float(fields.get("value"), "alert value"),
                      threshold=_float(fields.get("threshold"), "alert threshold"),
                      at=_aware(fields.get("at"), "alert event 'at'"))
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
        with self._tx("listing alert events") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def get_alert_state(self, monitor: str, rule: str) -> dict | None:
        with self._tx(f"reading alert state {monitor}/{rule}") as conn:
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
            values["consecutive"] = _int(values["consecutive"], "consecutive")
            if values["consecutive"] is None or values["consecutive"] < 0:
                raise InputError(f"consecutive must be an integer >= 0, got {fields['consecutive']!r}")
        for key in ("since", "last_notified"):
            if key in values:
                _aware(values[key], key)
        if "last_value" in values:
            values["last_value"] = _float(values["last_value"], "last_value")
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
                        "event_id", "at")

    def add_alert_delivery(self, **fields) -> int:
        """Record the outcome of one notification sent to one sink; `at` defaults to now."""
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
                      attempts=_int(fields.get("attempts", 0), "attempts"),
                      http_status=_int(fields.get("http_status"), "http_status"),
                      error=redact(fields["error"]) if fields.get("error") is not None else None,
                      at=_aware(fields.get("at"), "alert delivery 'at'"))
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
        with self._tx("listing alert deliveries") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def alert_states(self, state: str | None = None) -> list[dict]:
        """Every (monitor, rule) state, optionally only those in `state`, ordered by monitor, rule."""
        if state is not None and state not in ALERT_STATES:
            raise InputError(f"alert state must be one of {', '.join(ALERT_STATES)}, got '{state}'")
        query = select(ALERT_STATE).order_by(ALERT_STATE.c.monitor, ALERT_STATE.c.rule)
        if state is not None:
            query = query.where(ALERT_STATE.c.state == state)
        with self._tx("listing alert states") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
