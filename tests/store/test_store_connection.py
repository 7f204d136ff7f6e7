"""Connecting to the store's database: URL resolution and validation, passwords kept out of
messages, SQLite files and directories, unreachable or missing PostgreSQL databases."""

from __future__ import annotations

import socket
import sqlite3

import pytest
from sqlalchemy.engine import make_url

from tailmon.errors import InputError, RuntimeFailure
from tailmon.store import Store, default_database_url, resolve_database_url, safe_url


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
