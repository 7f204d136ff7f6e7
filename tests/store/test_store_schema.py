"""Schema versioning, upgrades and refusals of databases newer than this code."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import CheckConstraint, UniqueConstraint, inspect, insert, select
from sqlmodel import SQLModel

from tailmon.errors import RuntimeFailure
from tailmon.store import Store, safe_url
from tailmon.store.engine import make_engine
from tailmon.store.migrate import MIGRATIONS, SCHEMA_TABLE, SCHEMA_VERSION, upgrade_schema
from tailmon.store.schema import ALERT_STATE, ESTIMATES, LOCKS, MODEL_VERSIONS, RUNS

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
