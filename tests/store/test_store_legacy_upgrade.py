"""A database of the release before Alembic upgrades without loss.

tests/store/data (its README says how it was made) holds a database that release created and
filled, every row of it as that release read it, and what its Store methods returned. On SQLite the
test opens a copy of that very file; on PostgreSQL it restores the same rows into tables made by
that release's recorded DDL. Either way the upgrade stamps the database at revision 0003 and applies
0004 (which adds a column, empty, to each delivery and a schema_version row), every row and value
is still there, the Store returns what that release's Store returned, and the database goes on
working."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select, text
from sqlalchemy.engine import make_url

from tailmon.store import Store, to_jsonable
from tailmon.store.connection import connect_database
from tailmon.store.migrate import LEGACY_TABLE, legacy_version, recorded_revisions
from tailmon.store.schema import (
    ALERT_DELIVERIES,
    ALERT_EVENTS,
    ALERT_STATE,
    ESTIMATES,
    LOCKS,
    MODEL_VERSIONS,
    RUNS,
    SAMPLES,
    UTCDateTime,
)

DATA = Path(__file__).with_name("data")
RECORDED = json.loads((DATA / "legacy-v3.json").read_text())
TABLES = [RUNS, ESTIMATES, SAMPLES, MODEL_VERSIONS, LOCKS, ALERT_EVENTS, ALERT_STATE, ALERT_DELIVERIES, LEGACY_TABLE]


def upgraded(recorded: dict) -> dict:
    """The recorded rows as revision 0004 leaves them: each delivery with notification_id None
    (the attempts of that release tracked no notification)."""
    return {**recorded, "alert_deliveries": [{**d, "notification_id": None} for d in recorded["alert_deliveries"]]}


ADDED_BY_0004 = {"alert_deliveries": {"notification_id"}}


def every_row(engine, legacy: bool = False) -> dict[str, list[dict]]:
    """Every table's rows in primary-key order, datetimes as ISO 8601: the shape of RECORDED['tables'].
    `legacy`: the columns of schema version 3 only (a database not upgraded yet)."""
    def columns(t):
        return [c for c in t.columns if not (legacy and c.name in ADDED_BY_0004.get(t.name, ()))]

    with engine.connect() as conn:
        return {t.name: [to_jsonable(dict(r._mapping))
                         for r in conn.execute(select(*columns(t)).order_by(*t.primary_key))]
                for t in TABLES}


def restore(engine) -> None:
    """The recorded rows into a database at schema version 3, as a dump and restore would put them."""
    with engine.begin() as conn:
        # The replayed DDL wrote its own schema_version rows (applied now): the recorded ones replace them.
        conn.execute(delete(LEGACY_TABLE))
        for table in TABLES:
            times = [c.name for c in table.columns if isinstance(c.type, UTCDateTime)]
            rows = [{**row, **{k: datetime.fromisoformat(row[k]) for k in times if row[k] is not None}}
                    for row in RECORDED["tables"][table.name]]
            conn.execute(insert(table), rows)
            if "id" in table.c:
                # Explicit ids leave the sequence behind: move it on, or the next insert collides.
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                  f"(SELECT max(id) FROM {table.name}))"))


@pytest.fixture
def legacy_v3_url(db_url, legacy_database):
    """A URL of the recorded schema-version-3 database on the backend of `db_url`."""
    if db_url.startswith("sqlite"):
        # A copy: opening the file in place would upgrade the fixture itself.
        path = Path(make_url(db_url).database)
        path.parent.mkdir(parents=True)
        shutil.copyfile(DATA / "legacy-v3.sqlite", path)
    else:
        engine = legacy_database(db_url, 3)
        try:
            restore(engine)
        finally:
            engine.dispose()
    return db_url


def test_a_database_of_the_release_before_alembic_upgrades_without_loss(legacy_v3_url):
    api = RECORDED["api"]
    engine = connect_database(legacy_v3_url)
    try:
        with engine.connect() as conn:
            assert (recorded_revisions(conn), legacy_version(conn)) == ([], 3)  # as that release left it
        assert every_row(engine, legacy=True) == RECORDED["tables"]  # and as it was recorded (PostgreSQL: restored)
    finally:
        engine.dispose()

    # stale_after_s=1: the recorded running run's heartbeat is long past.
    with Store(legacy_v3_url, instance_id="host-b", stale_after_s=1) as store:
        with store.engine.connect() as conn:
            assert recorded_revisions(conn) == ["0004"]
        rows = every_row(store.engine)
        # schema_version included: rows 1..3 as they were, and one for revision 0004
        assert [v["version"] for v in rows.pop("schema_version")[3:]] == [4]
        assert rows == {k: v for k, v in upgraded(RECORDED["tables"]).items() if k != "schema_version"}
        assert every_row(store.engine)["schema_version"][:3] == RECORDED["tables"]["schema_version"]
        run_ids = [run["id"] for run in api["runs"]]
        assert [to_jsonable(store.get_run(i)) for i in run_ids] == api["runs"]
        assert to_jsonable(store.list_runs(limit=10)) == api["list_runs"]
        assert {i: to_jsonable(store.get_samples(int(i))) for i in api["samples"]} == api["samples"]
        assert to_jsonable(store.lock_holder("toxicity")) == api["lock_holder"]
        assert to_jsonable(store.alert_events()) == api["alert_events"]
        assert to_jsonable(store.alert_states()) == api["alert_states"]
        assert to_jsonable(store.alert_deliveries()) == upgraded(api)["alert_deliveries"]

        # ... and it goes on from there: versions, ids, locks, stale runs, alerts.
        assert store.model_version("toxicity", "smollm2-ft", "sha-B") == api["model_version_again"] == 2
        assert store.model_version("toxicity", "smollm2-ft", "sha-C") == 3
        running = [run["id"] for run in api["runs"] if run["status"] == "running"]
        assert len(running) == 1 and store.interrupt_stale_runs() == running
        assert store.get_run(running[0])["status"] == "interrupted"
        new_run = store.start_run("toxicity", model_ref="smollm2-ft", model_version=3, config_hash="cfg-4",
                                  settings={})
        assert new_run == max(run_ids) + 1
        assert store.try_lock("refusals") is True
        event = store.add_alert_event(monitor="toxicity", rule="p-high", state="resolved", run_id=new_run)
        assert event == max(e["id"] for e in api["alert_events"]) + 1
        delivery = store.add_alert_delivery(monitor="toxicity", rule="p-high", sink="oncall", status="resolved",
                                            outcome="delivered", event_id=event)
        assert delivery == max(d["id"] for d in api["alert_deliveries"]) + 1
