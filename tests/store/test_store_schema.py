"""Schema versioning, upgrades, refusals, connection errors and database URL resolution."""

from __future__ import annotations

import socket
import sqlite3
from datetime import datetime, timezone

import pytest
from sqlalchemy import CheckConstraint, UniqueConstraint, inspect, insert, select
from sqlmodel import SQLModel

from tailmon.errors import InputError, RuntimeFailure
from tailmon.store.database import (
    ALERT_STATE,
    ESTIMATES,
    LOCKS,
    MIGRATIONS,
    MODEL_VERSIONS,
    RUNS,
    SCHEMA_TABLE,
    SCHEMA_VERSION,
    Store,
    default_database_url,
    make_engine,
    resolve_database_url,
    safe_url,
    upgrade_schema,
)

MODEL_TABLES = ["runs", "estimates", "samples", "model_versions", "monitor_locks", "alert_events", "alert_state",
                "alert_deliveries"]


def versions(engine):
    with engine.connect() as conn:
        return conn.execute(select(SCHEMA_TABLE.c.version).order_by(SCHEMA_TABLE.c.version)).scalars().all()


def describe_reflected(insp, name):
    """Columns (type family, nullability), keys, indexes and constraints of a table as reflected."""
    return {
        "columns": {c["name"]: (c["type"]._type_affinity, c["nullable"]) for c in insp.get_columns(name)},
        "primary_key": sorted(insp.get_pk_constraint(name)["constrained_columns"]),
        # PostgreSQL also lists the index behind each unique constraint: that one is compared below.
        "indexes": sorted(i["name"] for i in insp.get_indexes(name) if not i.get("duplicates_constraint")),
        "checks": sorted(c["name"] for c in insp.get_check_constraints(name)),
        "uniques": sorted(u["name"] for u in insp.get_unique_constraints(name)),
        "foreign_keys": sorted((tuple(f["constrained_columns"]), f["referred_table"], f["options"].get("ondelete"))
                               for f in insp.get_foreign_keys(name)),
    }


def describe_model(table):
    return {
        "columns": {c.name: (c.type._type_affinity, c.nullable) for c in table.columns},
        "primary_key": sorted(c.name for c in table.primary_key.columns),
        "indexes": sorted(i.name for i in table.indexes),
        "checks": sorted(c.name for c in table.constraints if isinstance(c, CheckConstraint)),
        "uniques": sorted(c.name for c in table.constraints if isinstance(c, UniqueConstraint)),
        "foreign_keys": sorted((tuple(f.constraint.column_keys), f.column.table.name, f.ondelete)
                               for f in table.foreign_keys),
    }


def test_migrations_build_exactly_the_schema_the_code_uses(store):
    """The frozen migration DDL and the models the queries use must describe the same tables."""
    assert [v for v, _, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    assert versions(store.engine) == list(range(1, SCHEMA_VERSION + 1))
    insp = inspect(store.engine)
    assert set(insp.get_table_names()) == set(MODEL_TABLES) | {"schema_version"}
    for name in MODEL_TABLES:
        assert describe_reflected(insp, name) == describe_model(SQLModel.metadata.tables[name]), name


def test_upgrade_from_version_1_keeps_the_data(db_url):
    engine = make_engine(db_url)
    assert upgrade_schema(engine, target=1) == 1
    assert versions(engine) == [1]
    assert "alert_events" not in inspect(engine).get_table_names()

    # A version-1 database in use: a finished run with an estimate, a model version, a lock.
    t0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    with engine.begin() as conn:
        run_id = conn.execute(insert(RUNS).values(
            monitor="m1", model_ref="smollm2", model_version=1, config_hash="cfg", status="succeeded",
            owner_instance="old-host", owner_token="t0", started_at=t0, heartbeat_at=t0, finished_at=t0,
            p_hat=1.5e-5, ci_low=1e-6, ci_high=4e-5, reliable=True, report={"aggregate": {"p_hat": 1.5e-5}},
        )).inserted_primary_key[0]
        conn.execute(insert(ESTIMATES).values(run_id=run_id, prompt_index=0, prompt="hello", p_hat=1.5e-5,
                                              warnings=["few hits"]))
        conn.execute(insert(MODEL_VERSIONS).values(monitor="m1", version=1, model_ref="smollm2", fingerprint="sha-A",
                                                   first_seen=t0, last_seen=t0))
        conn.execute(insert(LOCKS).values(monitor="m1", owner_instance="old-host", owner_token="t0",
                                          acquired_at=t0, heartbeat_at=t0))
    engine.dispose()

    store = Store(db_url).open()
    try:
        assert versions(store.engine) == [1, 2, 3]
        run = store.get_run(run_id)
        assert run["status"] == "succeeded" and run["started_at"] == t0
        assert run["p_hat"] == 1.5e-5 and run["reliable"] is True
        assert run["report"] == {"aggregate": {"p_hat": 1.5e-5}}
        assert [(e["prompt"], e["warnings"]) for e in run["estimates"]] == [("hello", ["few hits"])]
        assert store.model_version("m1", "smollm2", "sha-A") == 1  # the version history continues
        assert store.lock_holder("m1")["owner_instance"] == "old-host"
        # The tables of migration 2 exist and work.
        event_id = store.add_alert_event(monitor="m1", rule="p_high", state="firing", run_id=run_id)
        assert store.alert_events("m1")[0]["id"] == event_id
        store.set_alert_state("m1", "p_high", state="firing", consecutive=2)
        assert store.get_alert_state("m1", "p_high")["consecutive"] == 2
        # ... and so does the table of migration 3.
        store.add_alert_delivery(monitor="m1", rule="p_high", sink="oncall", status="firing", outcome="delivered",
                                 attempts=1, http_status=200, event_id=event_id)
        assert store.alert_deliveries("m1")[0]["event_id"] == event_id
    finally:
        store.close()


def test_upgrade_from_version_2_keeps_the_alert_state(db_url):
    """A version-2 database with a firing alert: migration 3 adds deliveries, the state stays."""
    t0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    engine = make_engine(db_url)
    assert upgrade_schema(engine, target=2) == 2
    assert "alert_deliveries" not in inspect(engine).get_table_names()
    with engine.begin() as conn:
        conn.execute(insert(ALERT_STATE).values(monitor="m1", rule="harm-high", state="firing", consecutive=3,
                                                since=t0, last_notified=t0, last_value=2e-4,
                                                labels={"severity": "critical"}))
    engine.dispose()

    with Store(db_url) as store:
        assert versions(store.engine) == [1, 2, 3]
        state = store.get_alert_state("m1", "harm-high")
        assert (state["state"], state["consecutive"], state["since"], state["last_notified"]) == ("firing", 3, t0, t0)
        store.add_alert_delivery(monitor="m1", rule="harm-high", sink="log", status="resolved", outcome="failed",
                                 attempts=4, error="HTTP 500")
        [row] = store.alert_deliveries(rule="harm-high")
        assert (row["outcome"], row["attempts"], row["repeat"], row["http_status"]) == ("failed", 4, False, None)


def test_reopening_applies_nothing_twice(db_url):
    with Store(db_url) as store:
        run_id = store.start_run("m1", model_ref="r", model_version=1, config_hash="c", settings={})
    with Store(db_url) as store:
        assert versions(store.engine) == list(range(1, SCHEMA_VERSION + 1))
        assert store.get_run(run_id)["status"] == "running"


def test_newer_schema_is_refused(db_url):
    with Store(db_url) as store:
        run_id = store.start_run("m1", model_ref="r", model_version=1, config_hash="c", settings={})
        with store.engine.begin() as conn:
            conn.execute(insert(SCHEMA_TABLE).values(version=SCHEMA_VERSION + 1, description="from the future",
                                                     applied_at=datetime.now(timezone.utc)))
    newer = Store(db_url)
    with pytest.raises(RuntimeFailure) as info:
        newer.open()
    message = str(info.value)
    assert message == (f"database {safe_url(db_url)}: schema version {SCHEMA_VERSION + 1} is newer than this "
                       f"tailmon supports ({SCHEMA_VERSION}); upgrade tailmon")
    with pytest.raises(RuntimeFailure, match="not open"):
        newer.list_runs()
    # Refused, not touched: the data and the version record are as they were.
    engine = make_engine(db_url)
    try:
        assert versions(engine)[-1] == SCHEMA_VERSION + 1
        with engine.connect() as conn:
            assert conn.execute(select(RUNS.c.status).where(RUNS.c.id == run_id)).scalar() == "running"
    finally:
        engine.dispose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_postgres_is_a_runtime_failure_with_the_password_masked():
    url = f"postgresql://tailmon:s3cret-pw@127.0.0.1:{_closed_port()}/tailmon"
    with pytest.raises(RuntimeFailure) as info:
        Store(url).open()
    message = str(info.value)
    assert message.startswith("database postgresql://tailmon:***@127.0.0.1:")
    assert "s3cret-pw" not in message and "\n" not in message
    assert "refused" in message.lower() or "failed" in message.lower()


def test_missing_postgres_database_is_a_runtime_failure(postgres_url):
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(database="tailmon_no_such_db", password="pw-123")
    url = url.render_as_string(hide_password=False)
    with pytest.raises(RuntimeFailure, match='database "tailmon_no_such_db" does not exist') as info:
        Store(url).open()
    assert "pw-123" not in str(info.value) and ":***@" in str(info.value)


def test_bad_urls_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="is not valid"):
        Store("not a database url").open()
    with pytest.raises(InputError, match="unsupported database 'mysql'"):
        Store("mysql://u:pw@db/tailmon").open()
    with pytest.raises(InputError, match="in-memory SQLite"):
        Store("sqlite://").open()
    with pytest.raises(InputError, match="in-memory SQLite"):
        Store("sqlite:///:memory:").open()
    with pytest.raises(InputError, match="stale_after_s must be > 0"):
        Store(f"sqlite:///{tmp_path}/x.db", stale_after_s=0)


def test_sqlite_file_that_cannot_be_opened(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(RuntimeFailure, match="cannot create directory"):
        Store(f"sqlite:///{blocker}/sub/tailmon.db").open()
    (tmp_path / "a-directory.db").mkdir()
    with pytest.raises(RuntimeFailure, match=r"^database sqlite:///.*a-directory\.db: .*unable to open"):
        Store(f"sqlite:///{tmp_path}/a-directory.db").open()


def test_sqlite_creates_its_directory_and_uses_wal(tmp_path):
    path = tmp_path / "new" / "nested" / "tailmon.db"
    with Store(f"sqlite:///{path}") as store:
        store.start_run("m1", model_ref="r", model_version=1, config_hash="c", settings={})
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        # WAL is a property of the file: a reader (the CLI) never blocks the daemon's writes.
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]


def test_database_url_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("TAILMON_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("TAILMON_DATABASE_URL", raising=False)
    default = f"sqlite:///{tmp_path / 'state' / 'tailmon.db'}"
    assert default_database_url() == default
    assert resolve_database_url(None) == default
    assert resolve_database_url("") == default

    monkeypatch.setenv("TAILMON_DATABASE_URL", "postgresql://env@db/tailmon")
    assert resolve_database_url(None) == "postgresql://env@db/tailmon"
    assert resolve_database_url("  ") == "postgresql://env@db/tailmon"
    assert resolve_database_url("sqlite:////srv/tailmon.db") == "sqlite:////srv/tailmon.db"  # config wins

    # The default database is usable as is: the state directory is created on open.
    monkeypatch.delenv("TAILMON_DATABASE_URL")
    with Store(resolve_database_url(None)) as store:
        assert store.list_runs() == []
    assert (tmp_path / "state" / "tailmon.db").is_file()


def test_safe_url_masks_passwords():
    assert safe_url("postgresql://tailmon:hunter2@db:5432/tailmon") == "postgresql://tailmon:***@db:5432/tailmon"
    assert safe_url("postgresql+psycopg://u:p%40ss@db/x") == "postgresql+psycopg://u:***@db/x"
    assert safe_url("postgresql://u@db/x?password=hunter2&sslmode=require") == \
        "postgresql://u@db/x?password=***&sslmode=require"
    assert safe_url("postgresql://u@db/x") == "postgresql://u@db/x"
    assert safe_url("sqlite:////var/lib/tailmon/tailmon.db") == "sqlite:////var/lib/tailmon/tailmon.db"
    assert safe_url("garbage://u:hunter2@host") == "garbage://u:***@host"
    assert "hunter2" not in safe_url("not a url with ://u:hunter2@host")
