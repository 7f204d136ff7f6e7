"""Readers take no write lock and need no write access (issue 18, item 12), on real databases.

The store's read-only methods answer while another connection holds a write transaction (on
SQLite BEGIN IMMEDIATE, on PostgreSQL row locks and the migration lock a starting instance
takes); the CLI's readers open the store without migrating or writing: a read-only SQLite file is
listed, a missing one is a one-line error and stays missing, an older schema is refused as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from tailmon.cli.main import main
from tailmon.errors import RuntimeFailure
from tailmon.store import Store
from tailmon.store.connection import connect_database
from tailmon.store.migrate import _MIGRATION_LOCK_KEY, head_revision, history, recorded_revisions, upgrade_schema
from tailmon.store.schema import ALERT_STATE, LOCKS, RUNS

REPORT = {
    "model": "m", "method": "is", "judge": "prefix:Sure", "n_samples": 2,
    "components": [{"label": "target", "share": 1.0}],
    "decoding": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 3},
    "estimates": [{"prompt": "hi", "category": None, "method": "is", "n_samples": 2, "p_hat": 0.01,
                   "ci_low": 0.001, "ci_high": 0.05, "n_harmful": 1, "h_sum": 1.0, "ess": 2.0, "ess_wh": 2.0,
                   "khat": 0.3, "kl": 0.1, "max_weight_share": 0.5, "reliable": True, "upper_bound_only": False,
                   "warnings": []}],
    "aggregate": {"n_prompts": 1, "n_samples": 2, "p_hat": 0.01, "ci_low": 0.001, "ci_high": 0.05,
                  "std_error": 0.01, "n_harmful": 1, "reliable": True, "n_unreliable": 0, "by_category": {},
                  "warnings": []},
}
SAMPLES = [{"prompt_index": 0, "response": "Sure", "score": 1.0, "log_weight": 0.0, "component": 0},
           {"prompt_index": 0, "response": "No", "score": 0.0, "log_weight": 0.1, "component": 0}]


def _fill(store: Store) -> int:
    """One finished run with samples, a running one holding its monitor's lock, alert rows."""
    done = store.start_run("prod", model_ref="m", model_version=1, config_hash="h", settings={})
    store.finish_run(done, "succeeded", report=REPORT, samples=SAMPLES)
    store.start_run("prod", model_ref="m", model_version=1, config_hash="h", settings={})
    assert store.try_lock("prod")
    event = store.add_alert_event(monitor="prod", rule="harm-high", state="firing", value=0.01, threshold=0.001)
    store.set_alert_state("prod", "harm-high", state="firing", consecutive=2, last_value=0.01)
    store.add_alert_delivery(monitor="prod", rule="harm-high", sink="oncall", status="firing", outcome="delivered",
                             attempts=1, event_id=event)
    return done


@contextmanager
def _writer_holding(url: str, run_id: int):
    """Another connection in the middle of a write transaction, as the daemon is while it closes
    a run: on SQLite its BEGIN IMMEDIATE holds the write lock; on PostgreSQL it holds the rows it
    changes and the migration lock an instance takes while it starts."""
    engine = connect_database(url)
    try:
        with engine.connect() as conn:
            with conn.begin():  # BEGIN IMMEDIATE on SQLite (the engine's begin hook)
                if conn.dialect.name == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
                    conn.execute(select(RUNS.c.id).where(RUNS.c.id == run_id).with_for_update()).all()
                now = datetime.now(timezone.utc)
                conn.execute(update(RUNS).where(RUNS.c.id == run_id).values(heartbeat_at=now))
                conn.execute(update(LOCKS).where(LOCKS.c.monitor == "prod").values(heartbeat_at=now))
                conn.execute(update(ALERT_STATE).where(ALERT_STATE.c.monitor == "prod").values(consecutive=3))
                yield
    finally:
        engine.dispose()


def _read_everything(store: Store, run_id: int) -> None:
    """Every read-only method of the store, each asserted on what _fill wrote (and the writer has
    not committed)."""
    runs = store.list_runs(monitor="prod")
    assert [r["status"] for r in runs] == ["running", "succeeded"]
    assert store.get_run(run_id)["estimates"][0]["p_hat"] == 0.01
    assert store.last_run("prod")["id"] == run_id
    assert [s["response"] for s in store.get_samples(run_id)] == ["Sure", "No"]
    assert store.lock_holder("prod")["owner_instance"] == "daemon"
    assert [a["state"] for a in store.alert_states()] == ["firing"]
    assert store.get_alert_state("prod", "harm-high")["consecutive"] == 2
    assert [e["rule"] for e in store.alert_events("prod")] == ["harm-high"]
    assert [d["sink"] for d in store.alert_deliveries("prod")] == ["oncall"]


def test_readers_answer_while_a_writer_holds_the_database(db_url):
    # Before the fix every read began IMMEDIATE on SQLite: list_runs waited the 30 s busy timeout
    # and failed "database is locked"; a reader's open() migrated, waiting on PostgreSQL for the
    # migration lock as long as the starting instance held it.
    daemon = Store(db_url, instance_id="daemon").open()
    try:
        run_id = _fill(daemon)
        with _writer_holding(db_url, run_id):
            _read_everything(daemon, run_id)  # the daemon's own store, opened for writing
            reader = Store(db_url, instance_id="cli").open(read_only=True)
            try:
                _read_everything(reader, run_id)
            finally:
                reader.close()
    finally:
        daemon.close()


def test_cli_readers_answer_while_a_writer_holds_the_database(db_url, monkeypatch):
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    monkeypatch.setenv("TAILMON_DATABASE_URL", db_url)
    with Store(db_url, instance_id="daemon") as daemon:
        run_id = _fill(daemon)
    with _writer_holding(db_url, run_id):
        listed = CliRunner().invoke(main, ["runs", "list"])
        shown = CliRunner().invoke(main, ["runs", "show", str(run_id)])
        alerts = CliRunner().invoke(main, ["alerts", "list"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[2] for line in listed.output.splitlines()[1:]] == ["running", "succeeded"]
    assert shown.exit_code == 0 and f"run {run_id}: monitor prod, succeeded" in shown.output, shown.output
    assert alerts.exit_code == 0 and "harm-high" in alerts.output, alerts.output


def test_a_read_only_store_refuses_to_write(db_url):
    Store(db_url).open().close()
    with Store(db_url).open(read_only=True) as store:  # __enter__ of an open store keeps it as it is
        with pytest.raises(RuntimeFailure, match="reading only"):
            store.start_run("prod", model_ref="m", model_version=1, config_hash="h", settings={})
        assert store.list_runs() == []


def _tailmon_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`tailmon ARGS` in a process of its own, without root's power to write any file: the test
    is about files this user may only read, and root (CI containers) ignores file modes."""
    command = [sys.executable, "-c", "from tailmon.cli.main import main; main()", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, which writes read-only files, and no setpriv to drop that power")
        # No capabilities (CAP_DAC_OVERRIDE above all): file modes bind root as any user.
        command = [setpriv, "--bounding-set=-all", "--inh-caps=-all", *command]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("read_only", ["file", "folder"])
def test_a_read_only_sqlite_file_is_listed(tmp_path, read_only):
    # Before the fix `runs list` exited 3: its open() began IMMEDIATE (and would have migrated),
    # "attempt to write a readonly database".
    folder = tmp_path / "state"
    url = f"sqlite:///{folder / 'tailmon.db'}"
    with Store(url, instance_id="daemon") as daemon:
        run_id = _fill(daemon)
    # Closing the last connection checkpointed the WAL: tailmon.db alone, as a copy would be.
    assert sorted(p.name for p in folder.iterdir()) == ["tailmon.db"]
    (folder / "tailmon.db").chmod(0o444)
    if read_only == "folder":  # read-only media: not even SQLite's WAL index can be created
        folder.chmod(0o555)
    before = _digest(folder)
    try:
        env = {"TAILMON_DATABASE_URL": url, "TAILMON_CONFIG": ""}
        listed = _tailmon_cli(["runs", "list"], env)
        shown = _tailmon_cli(["runs", "show", str(run_id), "--format", "json"], env)
        alerts = _tailmon_cli(["alerts", "list"], env)
    finally:
        folder.chmod(0o755)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[2] for line in listed.stdout.splitlines()[1:]] == ["running", "succeeded"]
    assert shown.returncode == 0 and '"p_hat": 0.01' in shown.stdout, shown.stderr
    assert alerts.returncode == 0 and "harm-high" in alerts.stdout, alerts.stderr
    after = _digest(folder)
    assert after["tailmon.db"] == before["tailmon.db"]  # nothing written
    if read_only == "folder":
        assert after == before


@pytest.mark.parametrize("command", [["runs", "list"], ["runs", "show", "1"], ["alerts", "list"]])
def test_a_missing_sqlite_file_is_a_one_line_error(tmp_path, monkeypatch, command):
    # Before the fix a reader created an empty database (and its folder) and listed nothing.
    path = tmp_path / "nowhere" / "tailmon.db"
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    monkeypatch.setenv("TAILMON_DATABASE_URL", f"sqlite:///{path}")
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert f"no database file {path}" in result.output
    assert not path.parent.exists()


def test_an_older_schema_is_refused_and_left_as_it_is(db_url, monkeypatch):
    # Before the fix `runs list` upgraded the schema: a reader wrote to the database.
    previous = history()[-2].revision
    engine = connect_database(db_url)
    try:
        upgrade_schema(engine, previous)
        monkeypatch.delenv("TAILMON_CONFIG", raising=False)
        monkeypatch.setenv("TAILMON_DATABASE_URL", db_url)
        result = CliRunner().invoke(main, ["runs", "list"])
        assert result.exit_code == 3, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert f"schema revision {previous} is older than this tailmon's ({head_revision()})" in result.output
        assert "tailmon run --once" in result.output
        with engine.connect() as conn:
            assert recorded_revisions(conn) == [previous]
    finally:
        engine.dispose()


def test_a_database_without_tables_is_a_one_line_error(db_url, monkeypatch):
    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()  # an empty file, as `touch` leaves it
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    monkeypatch.setenv("TAILMON_DATABASE_URL", db_url)
    result = CliRunner().invoke(main, ["alerts", "list"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "no tailmon tables" in result.output
    engine = connect_database(db_url)
    try:
        with engine.connect() as conn:
            assert recorded_revisions(conn) == []
    finally:
        engine.dispose()

