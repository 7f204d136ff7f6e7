"""The schema and its upgrades: Alembic's revisions against the models and against the DDL of the
release before Alembic, upgrades of that release's databases (tests/store/data), refusals of
databases newer than this code, and first opens at the same time."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import CheckConstraint, UniqueConstraint, insert, inspect, select, text
from sqlmodel import SQLModel

from tailmon.errors import RuntimeFailure
from tailmon.store import Store, migrate, safe_url
from tailmon.store.connection import connect_database
from tailmon.store.migrate import (
    LEGACY_TABLE,
    VERSION_TABLE,
    head_revision,
    history,
    recorded_revisions,
    upgrade_schema,
)
from tailmon.store.schema import ALERT_STATE, ESTIMATES, LOCKS, MODEL_VERSIONS, RUNS

LEGACY_TABLES = ["runs", "estimates", "samples", "model_versions", "monitor_locks", "alert_events", "alert_state",
                 "alert_deliveries"]
"""The tables of the release before Alembic (schema versions 1..3)."""
MODEL_TABLES = LEGACY_TABLES + ["alert_notifications"]
REVISION_4 = "alert_notifications; alert_deliveries.notification_id and outcome 'abandoned'"
BOOKKEEPING = ["schema_version", VERSION_TABLE]


def revisions(engine) -> list[str]:
    with engine.connect() as conn:
        return recorded_revisions(conn)


def legacy_versions(engine) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(select(LEGACY_TABLE.c.version).order_by(LEGACY_TABLE.c.version)).scalars().all()


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


def describe_ddl(engine, tables=LEGACY_TABLES) -> dict[str, list[tuple]]:
    """Each of `tables`' DDL as the database itself holds it: on SQLite its CREATE statements in
    sqlite_master, on PostgreSQL every column, constraint and index definition from the catalog."""
    names = {"names": tables}
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            rows = conn.execute(text("SELECT tbl_name, type, name, sql FROM sqlite_master "
                                     f"WHERE tbl_name IN ({', '.join(repr(t) for t in tables)})")).all()
        else:
            rows = conn.execute(text(
                "SELECT table_name, 'column', column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = 'public' AND table_name = ANY(:names)"),
                names).all()
            rows += conn.execute(text(
                "SELECT c.conrelid::regclass::text, 'constraint', c.conname, pg_get_constraintdef(c.oid) "
                "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                "WHERE n.nspname = 'public' AND c.conrelid::regclass::text = ANY(:names)"), names).all()
            rows += conn.execute(text(
                "SELECT tablename, 'index', indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = 'public' AND tablename = ANY(:names)"), names).all()
    described: dict[str, list[tuple]] = {}
    for table, *definition in rows:
        described.setdefault(table, []).append(tuple(definition))
    return {table: sorted(definitions, key=repr) for table, definitions in described.items()}


def test_a_fresh_database_is_created_at_head(store):
    """The frozen revision DDL and the models the queries use must describe the same tables."""
    assert [s.revision for s in history()] == ["0001", "0002", "0003", "0004"]
    assert revisions(store.engine) == [head_revision()] == ["0004"]
    insp = inspect(store.engine)
    assert set(insp.get_table_names()) == set(MODEL_TABLES) | set(BOOKKEEPING)
    for name in MODEL_TABLES:
        assert describe_reflected(insp, name) == describe_model(SQLModel.metadata.tables[name]), name
    # The release before Alembic reads schema_version: it sees version 4, above its own 3, and
    # refuses this database rather than misread the deliveries that revision 0004 changed.
    with store.engine.connect() as conn:
        assert conn.execute(select(LEGACY_TABLE.c.version, LEGACY_TABLE.c.description)
                            .order_by(LEGACY_TABLE.c.version)).all() == [
            (1, "runs, estimates, samples, model_versions, monitor_locks"),
            (2, "alert_events, alert_state"),
            (3, "alert_deliveries"),
            (4, REVISION_4),
        ]


def test_the_revisions_run_the_ddl_of_the_release_before_alembic(db_url, legacy_database):
    """Versions 1..3 as that release created them (its recorded SQL) and revisions 0001..0003 as
    this code creates them leave the same tables, constraints and indexes, to the letter."""
    engine = legacy_database(db_url, 3)
    try:
        legacy = describe_ddl(engine)
        with engine.begin() as conn:
            for name in reversed(LEGACY_TABLES + ["schema_version"]):
                conn.exec_driver_sql(f"DROP TABLE {name}")
        assert inspect(engine).get_table_names() == []
        assert upgrade_schema(engine, target="0003") == "0003"
        assert describe_ddl(engine) == legacy
        assert sorted(legacy) == sorted(LEGACY_TABLES)  # not comparing nothing
    finally:
        engine.dispose()


def migration_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tailmon.store.migrate"]


def test_upgrade_from_version_1_keeps_the_data(db_url, legacy_database, caplog):
    engine = legacy_database(db_url, 1)
    assert legacy_versions(engine) == [1]
    assert {"alert_events", VERSION_TABLE} & set(inspect(engine).get_table_names()) == set()

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

    with caplog.at_level(logging.INFO, logger="tailmon.store.migrate"):
        store = Store(db_url).open()
    try:
        where = f"database {safe_url(db_url)}"
        assert migration_log(caplog) == [
            f"{where}: schema version 1 of the release before Alembic recorded as revision 0001",
            f"{where}: schema revision 0002 applied (alert_events, alert_state)",
            f"{where}: schema revision 0003 applied (alert_deliveries)",
            f"{where}: schema revision 0004 applied ({REVISION_4})",
        ]
        assert revisions(store.engine) == ["0004"]
        assert legacy_versions(store.engine) == [1, 2, 3, 4]  # the release before Alembic reads it (and refuses)
        run = store.get_run(run_id)
        assert run["status"] == "succeeded" and run["started_at"] == t0
        assert run["p_hat"] == 1.5e-5 and run["reliable"] is True
        assert run["report"] == {"aggregate": {"p_hat": 1.5e-5}}
        assert [(e["prompt"], e["warnings"]) for e in run["estimates"]] == [("hello", ["few hits"])]
        assert store.model_version("m1", "smollm2", "sha-A") == 1  # the version history continues
        assert store.lock_holder("m1")["owner_instance"] == "old-host"
        # The tables of revision 0002 exist and work.
        event_id = store.add_alert_event(monitor="m1", rule="p_high", state="firing", run_id=run_id)
        assert store.alert_events("m1")[0]["id"] == event_id
        store.set_alert_state("m1", "p_high", state="firing", consecutive=2)
        assert store.get_alert_state("m1", "p_high")["consecutive"] == 2
        # ... and so does the table of revision 0003.
        store.add_alert_delivery(monitor="m1", rule="p_high", sink="oncall", status="firing", outcome="delivered",
                                 attempts=1, http_status=200, event_id=event_id)
        assert store.alert_deliveries("m1")[0]["event_id"] == event_id
    finally:
        store.close()


def test_upgrade_from_version_2_keeps_the_alert_state(db_url, legacy_database):
    """A version-2 database with a firing alert: revision 0003 adds deliveries, the state stays."""
    t0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    engine = legacy_database(db_url, 2)
    assert {"alert_deliveries", VERSION_TABLE} & set(inspect(engine).get_table_names()) == set()
    with engine.begin() as conn:
        conn.execute(insert(ALERT_STATE).values(monitor="m1", rule="harm-high", state="firing", consecutive=3,
                                                since=t0, last_notified=t0, last_value=2e-4,
                                                labels={"severity": "critical"}))
    engine.dispose()

    with Store(db_url) as store:
        assert revisions(store.engine) == ["0004"]
        assert legacy_versions(store.engine) == [1, 2, 3, 4]
        state = store.get_alert_state("m1", "harm-high")
        assert (state["state"], state["consecutive"], state["since"], state["last_notified"]) == ("firing", 3, t0, t0)
        store.add_alert_delivery(monitor="m1", rule="harm-high", sink="log", status="resolved", outcome="failed",
                                 attempts=4, error="HTTP 500")
        [row] = store.alert_deliveries(rule="harm-high")
        assert (row["outcome"], row["attempts"], row["repeat"], row["http_status"]) == ("failed", 4, False, None)


def test_upgrades_in_steps_record_each_revision(db_url):
    engine = connect_database(db_url)
    try:
        assert upgrade_schema(engine, target="0001") == "0001"
        assert (revisions(engine), legacy_versions(engine)) == (["0001"], [1])
        assert "alert_events" not in inspect(engine).get_table_names()
        assert upgrade_schema(engine, target="0002") == "0002"
        assert (revisions(engine), legacy_versions(engine)) == (["0002"], [1, 2])
        assert upgrade_schema(engine, target="0001") == "0002"  # never downwards
        assert upgrade_schema(engine, target="0003") == "0003"
        assert (revisions(engine), legacy_versions(engine)) == (["0003"], [1, 2, 3])
        assert upgrade_schema(engine) == "0004"
        assert (revisions(engine), legacy_versions(engine)) == (["0004"], [1, 2, 3, 4])
        with pytest.raises(ValueError, match="no revision '0009'"):
            upgrade_schema(engine, target="0009")
    finally:
        engine.dispose()


def test_reopening_applies_nothing_twice(db_url, caplog):
    with Store(db_url) as store:
        run_id = store.start_run("m1", model_ref="r", model_version=1, config_hash="c", settings={})
        with store.engine.connect() as conn:
            bookkeeping = conn.execute(select(LEGACY_TABLE)).all()
    with caplog.at_level(logging.INFO, logger="tailmon.store.migrate"), Store(db_url) as store:
        assert migration_log(caplog) == []
        assert revisions(store.engine) == [head_revision()]
        with store.engine.connect() as conn:
            assert conn.execute(select(LEGACY_TABLE)).all() == bookkeeping
        assert store.get_run(run_id)["status"] == "running"


def _assert_refused_untouched(db_url, message, run_id, tables):
    newer = Store(db_url)
    with pytest.raises(RuntimeFailure) as info:
        newer.open()
    assert str(info.value) == message
    with pytest.raises(RuntimeFailure, match="not open"):
        newer.list_runs()
    # Refused, not touched: the tables and the data are as they were.
    engine = connect_database(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == tables
        with engine.connect() as conn:
            assert conn.execute(select(RUNS.c.status).where(RUNS.c.id == run_id)).scalar() == "running"
    finally:
        engine.dispose()


def test_a_newer_schema_version_of_the_release_before_alembic_is_refused(db_url, legacy_database):
    """Version 5 in schema_version and no Alembic revision: a database this code cannot know."""
    engine = legacy_database(db_url, 3)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        run_id = conn.execute(insert(RUNS).values(
            monitor="m1", model_ref="r", model_version=1, config_hash="c", status="running", owner_instance="h",
            owner_token="t", started_at=now, heartbeat_at=now)).inserted_primary_key[0]
        conn.execute(insert(LEGACY_TABLE).values(version=5, description="from the future", applied_at=now))
    engine.dispose()
    _assert_refused_untouched(
        db_url, f"database {safe_url(db_url)}: schema version 5 is newer than this tailmon supports (4); "
                "upgrade tailmon", run_id, set(LEGACY_TABLES) | {"schema_version"})
    engine = connect_database(db_url)
    try:
        assert legacy_versions(engine) == [1, 2, 3, 5]
    finally:
        engine.dispose()


def test_an_unknown_revision_is_refused(db_url):
    with Store(db_url) as store:
        run_id = store.start_run("m1", model_ref="r", model_version=1, config_hash="c", settings={})
        with store.engine.begin() as conn:
            conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '0005'"))
    _assert_refused_untouched(
        db_url, f"database {safe_url(db_url)}: schema revision 0005 is newer than this tailmon supports (0004); "
                "upgrade tailmon", run_id, set(MODEL_TABLES) | set(BOOKKEEPING))
    engine = connect_database(db_url)
    try:
        assert revisions(engine) == ["0005"]
    finally:
        engine.dispose()


def test_a_failed_revision_leaves_the_database_as_it_was(db_url):
    """Another program's `runs` table: revision 0001 fails on it, and nothing of ours stays behind."""
    engine = connect_database(db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE runs (id INTEGER PRIMARY KEY, what VARCHAR)")
            conn.exec_driver_sql("INSERT INTO runs (id, what) VALUES (1, 'not tailmon')")
        with pytest.raises(RuntimeFailure) as info:
            Store(db_url).open()
        message = str(info.value)
        assert message.startswith(f"database {safe_url(db_url)}: migration 0001 (runs, estimates, samples, "
                                  "model_versions, monitor_locks) failed: ")
        assert "already exists" in message and "\n" not in message
        assert inspect(engine).get_table_names() == ["runs"]
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT id, what FROM runs").all() == [(1, "not tailmon")]
    finally:
        engine.dispose()


def test_first_opens_at_the_same_time_upgrade_once(postgres_url):
    """Instances starting together on an empty PostgreSQL database: the advisory lock lets one create
    the schema while the others wait, then they find it at head. (Not on SQLite: there BEGIN
    IMMEDIATE serialises the upgrades, but the first connections to a new file may fail at once on
    `PRAGMA journal_mode=WAL` with "database is locked", with or without Alembic.)"""
    barrier = threading.Barrier(4)
    opened, errors = [], []

    def start(i):
        store = Store(postgres_url, instance_id=f"host-{i}")
        barrier.wait()
        try:
            opened.append(store.open())
        except Exception as e:  # noqa: BLE001  (reported below, with the others)
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == [] and len(opened) == 4
        assert revisions(opened[0].engine) == ["0004"]
        assert legacy_versions(opened[0].engine) == [1, 2, 3, 4]
    finally:
        for store in opened:
            store.close()


def test_alembic_operations_are_applied_one_database_at_a_time(tmp_path):
    """alembic.op is one proxy per process: an upgrade waits while another thread applies revisions."""
    url = f"sqlite:///{tmp_path / 'tailmon.db'}"
    done = []
    with migrate._ALEMBIC_OP:
        thread = threading.Thread(target=lambda: done.append(Store(url).open()))
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive() and not done
    thread.join(timeout=30)
    try:
        assert revisions(done[0].engine) == ["0004"]
    finally:
        done[0].close()


def test_importing_the_store_adds_nothing_to_the_log():
    """The daemon sets up logging (INFO) before it imports the store, which imports alembic: that
    import must not fill the daemon's log with alembic's plugin registrations."""
    code = ("import logging; logging.basicConfig(level=logging.INFO); import tailmon.store.migrate as m; "
            "m.history(); import alembic.operations, alembic.runtime.migration")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, "")
