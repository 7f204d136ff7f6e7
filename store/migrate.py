"""Creating and upgrading the store's schema: the ordered, append-only MIGRATIONS, in one transaction.

The schema is versioned: `schema_version` records every applied migration, an upgrade keeps the
data, and a database newer than this code is refused.
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
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
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from tailmon.errors import RuntimeFailure
from tailmon.store.engine import error_reason
from tailmon.store.schema import UTCDateTime, json_type, utcnow

SCHEMA_VERSION = 3
"""The schema this code reads and writes: the last entry of MIGRATIONS."""

# Every key of pg_advisory_xact_lock is global to the database: this one serialises schema
# upgrades when several instances start at once on an empty database.
_MIGRATION_LOCK_KEY = 0x7461696C6D6F6E  # "tailmon"

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
# from a frozen copy of their definition at that version (not from tailmon.store.schema's models).


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
        Column("settings", json_type()),
        Column("timings", json_type()),
        Column("report", json_type()),
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
        Column("warnings", json_type()),
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
        Column("labels", json_type()),
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
        Column("labels", json_type()),
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
                                         f"{error_reason(e)}") from e
                conn.execute(insert(SCHEMA_TABLE).values(version=version, description=description,
                                                         applied_at=utcnow()))
                current = version
        return current
