"""Connecting to the database: SQLAlchemy connection settings per backend, JSON columns, one-line errors."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, NoSuchModuleError

from tailmon.errors import InputError, RuntimeFailure
from tailmon.store.url import engine_url, safe_url


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


READING = "tailmon_reading"
"""Execution option of a connection whose transaction only reads: on SQLite it begins DEFERRED."""


def connect_database(url: str, *, read_only: bool = False, immutable: bool = False) -> Engine:
    """An SQLAlchemy engine for `url`, set up for the store (used by `Store.open` and by tests).

    Bad URLs raise InputError; a SQLite directory that cannot be created raises RuntimeFailure.
    read_only (SQLite): open the existing file read-only (a missing file is an InputError, never
    a new database) and leave its journal mode alone; immutable: also tell SQLite that nobody
    changes the file, for read-only media where not even the WAL index can be created.
    """
    parsed = engine_url(url)
    if parsed.get_backend_name() == "postgresql":
        # read_only needs nothing here: PostgreSQL readers never wait on writers' row locks, and
        # Store.open(read_only=True) does not migrate.
        try:
            # pre_ping: the daemon keeps connections for days, across PostgreSQL restarts.
            return create_engine(parsed, json_serializer=_dumps, pool_pre_ping=True,
                                 connect_args={"connect_timeout": 10})
        except (ImportError, NoSuchModuleError) as e:
            raise RuntimeFailure(f"database {safe_url(url)}: no PostgreSQL driver ({e}); "
                                 "install tailmon[postgres]") from None

    path = Path(parsed.database).expanduser()
    if read_only:
        if not path.is_file():
            raise InputError(f"database {safe_url(url)}: no database file {path} (the daemon creates it "
                             "when it first starts)")
        # An SQLite URI filename: mode=ro never writes (nor creates) the file.
        options = {"mode": "ro", "uri": "true", **({"immutable": "1"} if immutable else {})}
        parsed = parsed.set(database="file:" + quote(str(path.absolute())),
                            query={**parsed.query, **options})
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RuntimeFailure(f"database {safe_url(url)}: cannot create directory {path.parent}: "
                                 f"{e.strerror or e}") from None
    # timeout: the heartbeat thread and the run thread write concurrently; a writer waits up to
    # 30 s for the other instead of failing with "database is locked". (A reader in WAL mode waits
    # on nobody, save a moment while another connection recovers the WAL.)
    engine = create_engine(parsed, json_serializer=_dumps, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Take transaction control away from the sqlite3 module (it would not BEGIN before
        # SELECTs or DDL, which breaks transactional migrations and SAVEPOINTs) ...
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not read_only:
            # WAL: readers never block the writer nor wait for it, so the CLI can list runs while
            # the daemon writes. The mode is stored in the file: a reader finds it set.
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # ... and begin every writing transaction IMMEDIATE: it takes the write lock up front
        # (waiting out the busy timeout), so a read-then-write transaction never fails half-way
        # with SQLITE_BUSY because another connection wrote in between. A transaction that only
        # reads begins DEFERRED: it takes no write lock, so it neither waits for a writer that
        # holds one nor needs write access to the file.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READING) else "BEGIN IMMEDIATE")

    return engine


def error_reason(error: DBAPIError) -> str:
    """The driver's message, first line only: errors are reported as one line."""
    text = str(error.orig if error.orig is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__
